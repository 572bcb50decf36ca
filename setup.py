"""Builds bisam_kernels._C: a CUDAExtension when nvcc is found, a CppExtension otherwise.

Environment:
  BISAM_REQUIRE_CUDA=1   fail the build instead of falling back to CPU-only when nvcc is missing
  BISAM_FORCE_CPU=1      build the CPU-only extension even when nvcc is present
  CUDA_HOME              toolkit root; found from the nvcc on PATH when unset (wrapper scripts resolved)
  TORCH_CUDA_ARCH_LIST   target architectures, e.g. "9.0" (default: the local GPU's, as torch decides)
"""

import glob
import os
import shutil
import subprocess

from setuptools import setup


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """The toolkit root, even when the nvcc on PATH is a wrapper script (torch would guess wrong)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`: ask nvcc where it lives
            out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True).stderr
            for line in out.splitlines():
                if "TOP=" in line:
                    candidates.append(os.path.normpath(line.split("TOP=", 1)[1].strip()))
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")) and os.path.exists(
            os.path.join(root, "bin", "nvcc")
        ):
            return root
    return None


cuda_home = None if _truthy("BISAM_FORCE_CPU") else _find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

use_cuda = cuda_home is not None and torch.version.cuda is not None
if _truthy("BISAM_REQUIRE_CUDA") and not use_cuda:
    raise RuntimeError(
        "BISAM_REQUIRE_CUDA=1 but the CUDA extension cannot be built: "
        f"CUDA toolkit {'found at ' + cuda_home if cuda_home else 'not found'}, "
        f"torch CUDA version {torch.version.cuda!r}"
    )

root = os.path.dirname(os.path.abspath(__file__))
sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
# at::parallel_for is an inline OpenMP region in torch's headers: without -fopenmp it runs serially.
# -ffp-contract=off: no fused multiply-adds, so the baseline and AVX2 loops give the same bits.
cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
extension_kwargs = dict(
    name="bisam_kernels._C",
    include_dirs=[os.path.join(root, "csrc")],
    extra_compile_args={"cxx": cxx_flags},
    extra_link_args=["-fopenmp"],
    py_limited_api=True,
)
if use_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    extension_kwargs["extra_compile_args"]["cxx"] = cxx_flags + ["-DBISAM_WITH_CUDA"]
    extension_kwargs["extra_compile_args"]["nvcc"] = [
        "-O3",
        "-DBISAM_WITH_CUDA",
        "--expt-relaxed-constexpr",
        "-Xptxas=-warn-spills",
        "-lineinfo",
    ]
    extension = CUDAExtension(sources=sources, **extension_kwargs)
else:
    extension = CppExtension(sources=sources, **extension_kwargs)
print(f"bisam_kernels: building the {'CUDA' if use_cuda else 'CPU-only'} extension", flush=True)

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
