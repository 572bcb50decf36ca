"""The fused BiSAM loss (forward + backward) against PyTorch-native implementations of the same loss.

Implementations, side by side in one run (bisam_kernels.references):
  fused     bk.bisam_loss (Triton kernels on CUDA, the composite path on the CPU)
  released  the released code's Python row loop (`bisam_loss_released`); its backward is O(N^2 K)
            (each row's in-place update is a CopySlices node that copies the whole gradient), so it
            is only run where N^2 K <= 2e9: (128, 10), (128, 100), (1024, 1000)
  eager     vectorised eager PyTorch, gather / logsumexp (`bisam_loss_eager`)
  compiled  torch.compile of `eager` (on CUDA; it compiles for minutes on a CPU)
One call = forward + backward on fresh logits (torch.autograd.grad: the gradient is returned, not kept,
so its allocation counts in every call's peak), phi="log", mu=1, mean.
Bytes moved (docs/design.md section 4), the floor every implementation is measured against: the logits
read once and the gradient written once when a row fits on chip (K <= 8192), read twice otherwise.

    python -m pytest bench/bench_bisam_loss.py --benchmark-enable
"""

from __future__ import annotations

import itertools

import pytest
import torch

import bisam_kernels as bk
from bench.harness import Case, rotation_count, synchronize
from bisam_kernels import references as ref
from bisam_kernels.ops.row_loss.launch import SINGLE_PASS_MAX_K

IMPLS = ("fused", "released", "eager", "compiled")
CPU_SHAPES = [(128, 10), (128, 100), (1024, 1000)]
GPU_SHAPES = [(128, 10), (1024, 1000), (8192, 32000), (4096, 128256)]


def floor_bytes(N: int, K: int, dtype: torch.dtype) -> int:
    """Forward + backward traffic of the fused design: (1 or 2 reads) + 1 write of the logits."""
    reads = 1 if K <= SINGLE_PASS_MAX_K else 2
    return (reads + 1) * N * K * torch.empty((), dtype=dtype).element_size()


def _loss_fn(impl: str):
    if impl == "fused":
        return bk.bisam_loss
    if impl == "released":
        return ref.bisam_loss_released
    if impl == "eager":
        return ref.bisam_loss_eager
    if impl == "compiled":
        return torch.compile(ref.bisam_loss_eager)
    raise ValueError(f"unknown implementation {impl!r}")


RELEASED_MAX_N2K = 2e9


def loss_cases(device: str, dtype=torch.float32, shapes=None, impls=IMPLS) -> list[Case]:
    shapes = shapes or (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    cases = []
    for (N, K), impl in itertools.product(shapes, impls):
        if impl == "released" and N * N * K > RELEASED_MAX_N2K:
            continue
        elem = torch.empty((), dtype=dtype).element_size()
        copies = rotation_count(2 * N * K * elem, device)

        def make(N=N, K=K, impl=impl, copies=copies):
            sets = [(torch.randn(N, K, device=device, dtype=dtype).requires_grad_(),
                     torch.randint(0, K, (N,), device=device)) for _ in range(copies)]
            loss_fn = _loss_fn(impl)
            rotation = itertools.cycle(sets)

            def run():  # the gradient is returned, not kept: every call's allocation shows in the peak
                z, t = next(rotation)
                return torch.autograd.grad(loss_fn(z, t), z)

            return run

        cases.append(Case(workload=f"loss_{N}x{K}", impl=impl, make=make, floor_bytes=floor_bytes(N, K, dtype),
                          params={"N": N, "K": K, "dtype": str(dtype).replace("torch.", "")}))
    return cases


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_BENCH_IMPLS = IMPLS if DEVICE == "cuda" else ("fused", "released", "eager")
_DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
_CASES = [c for dtype in _DTYPES for c in loss_cases(DEVICE, dtype, impls=_BENCH_IMPLS)]


@pytest.mark.parametrize("case", _CASES, ids=lambda c: f"{c.workload}-{c.params['dtype']}-{c.impl}")
def test_bisam_loss_forward_backward(benchmark, case):
    benchmark.group = f"{case.workload}-{case.params['dtype']}"
    benchmark.extra_info.update(case.params, floor_bytes=case.floor_bytes, impl=case.impl)
    fn = case.make()

    def timed():
        fn()
        synchronize(DEVICE)

    slow = case.impl == "released" and case.params["N"] >= 1024  # the row loop: seconds per call
    benchmark.pedantic(timed, rounds=3 if slow else 30, warmup_rounds=1, iterations=1)
