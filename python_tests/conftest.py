"""Shared test set-up. Triton's interpreter must be chosen before triton is first imported."""

import os

import torch

if not torch.cuda.is_available():
    # No GPU: run the Triton kernels through the interpreter (DESIGN.md section 5).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    """Every test taking `device` runs on the CPU and, when present, on the GPU."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    # Fresh random inputs every run; the seed is printed (shown on failure) to replay one.
    seed = int(os.environ.get("BISAM_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"seed: BISAM_TEST_SEED={seed}")
    torch.manual_seed(seed)
