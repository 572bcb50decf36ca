"""The second build path: CMakeLists.txt builds the same sources with find_package(Torch)."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import bisam_kernels as bk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_a_loadable_library(tmp_path):
    with_cuda = bk.built_with_cuda()  # build what setup.py built: CUDA when it found nvcc
    configure = [
        "cmake", "-S", ROOT, "-B", str(tmp_path),
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DBISAM_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
    ]
    if with_cuda and os.environ.get("CUDA_HOME"):
        configure.append(f"-DCMAKE_CUDA_COMPILER={os.path.join(os.environ['CUDA_HOME'], 'bin', 'nvcc')}")
    subprocess.run(configure, check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(tmp_path), f"-j{os.cpu_count()}"], check=True, capture_output=True)
    library = os.path.join(tmp_path, "libbisam_kernels.so")
    # A fresh interpreter: the ops must come from this library, not from bisam_kernels._C.
    probe = textwrap.dedent(f"""
        import torch
        torch.ops.load_library({library!r})
        g = [torch.full((5,), 2.0), torch.full((3,), 1.0)]
        assert torch.ops.bisam.grad_sq_norm(g, [], False).item() == 23.0
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("bisam::grad_sq_norm", "CUDA")
        assert has_cuda == {with_cuda}, has_cuda
    """)
    subprocess.run([sys.executable, "-c", probe], check=True)
