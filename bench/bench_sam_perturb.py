"""SAM perturbation + restore: the fused multi-tensor ops against PyTorch-native SAM.

Implementations, side by side in one run:
  fused     bk.ops.sam_perturb_ + bk.ops.sam_restore_
  released  the canonical per-parameter SAM loop (first_step loop, restore by `p.data = old_p`)
  eager     vectorised eager PyTorch (torch._foreach_*)
  compiled  torch.compile of `eager` (slow to compile on the CPU: GPU and full runner runs only)
  peer_pytorch_optimizer  the `SAM` of the pytorch-optimizer package (foreach on CUDA, a loop on the
            CPU, its defaults): first_step + second_step over a base optimizer whose step does nothing,
            so that it does the fused row's work (perturb + restore); measured where the package imports
Bytes moved per call (docs/design.md section 4): norm reads g (P*b), apply reads g, w and writes
backup, w (4*P*b), restore reads backup and writes w (2*P*b): 7*P*b.

    python -m pytest bench/bench_sam_perturb.py --benchmark-enable
"""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch

import bisam_kernels as bk
from bench import models
from bench.harness import Case, rotation_count, synchronize
from bisam_kernels import references as ref

RHO = 0.05
PEER = "peer_pytorch_optimizer"
PEERS = (PEER,) if importlib.util.find_spec("pytorch_optimizer") else ()  # the peer packages installed here
IMPLS = ("fused", "released", "eager", "compiled") + PEERS


def param_sets(device: str) -> dict:
    """Parameter-shape sets of real architectures, built without downloads. The 1.1B decoder needs
    about 18 GB per implementation in float32 (params, grads, backups, the loop's clones): GPU only."""
    sets = {
        "resnet56": models.resnet56_param_shapes(),
        "wrn28_10": models.wrn28_10_param_shapes(),
        "vit_b16": models.vit_b16_param_shapes(),
        "gpt2_small": models.gpt2_small_param_shapes(),
    }
    if device == "cuda":
        sets["decoder_1b"] = models.decoder_1b_param_shapes()
    return sets


def _make_sets(shapes, dtype, device, copies):
    """`copies` independent (params, grads, backups) sets of random data (rotated between calls)."""
    sets = []
    for _ in range(copies):
        params = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
        grads = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
        backups = [torch.empty(s, dtype=dtype, device=device) for s in shapes]
        sets.append((params, grads, backups))
    return sets


class _NoStep(torch.optim.Optimizer):
    """A base optimizer whose step does nothing: the peer SAM's two steps then do perturb + restore only."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


def _peer_step():
    """pytorch-optimizer's SAM on (params, grads, backups); its own backups replace ours. One optimizer per
    parameter set, built on first use (the steps read the gradients from ``.grad``)."""
    from pytorch_optimizer import SAM

    optimizers = {}

    def step(params, grads, backups):
        opt = optimizers.get(id(params))
        if opt is None:
            for p, g in zip(params, grads):
                p.grad = g
            opt = optimizers[id(params)] = SAM(params, _NoStep, rho=RHO)
        opt.first_step()
        opt.second_step()

    return step


def _step(impl: str):
    """One SAM ascent + restore on (params, grads, backups) for the named implementation."""
    if impl == "fused":
        def step(params, grads, backups):
            bk.ops.sam_perturb_(params, grads, backups, RHO)
            bk.ops.sam_restore_(params, backups)
    elif impl == "released":
        def step(params, grads, backups):
            old = ref.sam_first_step_loop(params, grads, RHO)
            ref.sam_restore_loop(params, old)
    elif impl in ("eager", "compiled"):
        first = ref.sam_first_step_foreach if impl == "eager" else torch.compile(ref.sam_first_step_foreach)

        def step(params, grads, backups):
            first(params, grads, backups, RHO)
            ref.sam_restore_foreach(params, backups)
    elif impl == PEER:
        step = _peer_step()
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    return step


def sam_cases(device: str, dtype=torch.float32, workloads=None, impls=IMPLS) -> list[Case]:
    cases = []
    for name, shapes in param_sets(device).items():
        if workloads is not None and name not in workloads:
            continue
        numel = sum(torch.Size(s).numel() for s in shapes)
        elem = torch.empty((), dtype=dtype).element_size()
        copies = rotation_count(3 * numel * elem, device)

        for impl in impls:
            def make(shapes=shapes, impl=impl, copies=copies):
                sets = _make_sets(shapes, dtype, device, copies)
                step = _step(impl)
                rotation = itertools.cycle(sets)

                def run():
                    step(*next(rotation))

                return run

            cases.append(
                Case(
                    workload=f"sam_{name}",
                    impl=impl,
                    make=make,
                    floor_bytes=7 * numel * elem,
                    params={"tensors": len(shapes), "numel": numel, "dtype": str(dtype).replace("torch.", "")},
                )
            )
    return cases


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The compiled baseline compiles for minutes on a CPU: benchmarked on the GPU, and by the runner.
_BENCH_IMPLS = IMPLS if DEVICE == "cuda" else ("fused", "released", "eager") + PEERS


@pytest.mark.parametrize(
    "case", sam_cases(DEVICE, workloads=["resnet56", "vit_b16"], impls=_BENCH_IMPLS), ids=lambda c: f"{c.workload}-{c.impl}"
)
def test_sam_perturb_restore(benchmark, case):
    benchmark.group = case.workload
    benchmark.extra_info.update(case.params, floor_bytes=case.floor_bytes, impl=case.impl)
    fn = case.make()

    def timed():
        fn()
        synchronize(DEVICE)

    rounds = 5 if "vit" in case.workload else 50
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
