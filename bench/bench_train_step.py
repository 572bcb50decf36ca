"""A whole training step of ResNet-56 on CIFAR-shaped random data.

Implementations, side by side in one run:
  fused     bk.BiSAM + bk.bisam_step (BiSAM: the fused lower-bound loss for pass 1, fused perturbation)
  released  the canonical per-parameter SAM loop with the released code's row-loop loss and BN bypass
  passes    the two forward/backward passes of a BiSAM step alone (fused loss, then cross-entropy),
            no optimizer: the part no optimizer can remove
  sgd       one plain SGD step (one forward/backward), for scale
`overhead` in the runner's table: the share of the fused BiSAM step spent outside the two passes.
No byte floor: this workload is compute-bound.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

import bisam_kernels as bk
from bench import models
from bench.harness import Case
from bisam_kernels import references as ref

IMPLS = ("fused", "released", "passes", "sgd")
RHO = 0.05
PHI = "tanh"
SGD_KWARGS = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}


def _step(impl: str, model):
    """The callable doing one step of `impl` on a (inputs, targets) batch."""
    if impl == "fused":
        opt = bk.BiSAM(model.parameters(), torch.optim.SGD, rho=RHO, **SGD_KWARGS)
        return lambda x, y: bk.bisam_step(model, opt, x, y, ascent_loss=PHI)
    if impl == "released":
        base = torch.optim.SGD(model.parameters(), **SGD_KWARGS)
        ascent = lambda z, y: ref.bisam_loss_released(z, y, phi=PHI)  # noqa: E731
        return lambda x, y: ref.canonical_sam_step(model, base, x, y, RHO, False, ascent)
    if impl == "passes":
        def two_passes(x, y):
            bk.bisam_loss(model(x), y, phi=PHI).backward()
            F.cross_entropy(model(x), y, label_smoothing=0.1).backward()
            model.zero_grad(set_to_none=False)
        return two_passes
    if impl == "sgd":
        opt = torch.optim.SGD(model.parameters(), **SGD_KWARGS)

        def sgd(x, y):
            F.cross_entropy(model(x), y, label_smoothing=0.1).backward()
            opt.step()
            opt.zero_grad()
        return sgd
    raise ValueError(f"unknown implementation {impl!r}")


def train_step_cases(device: str, batch: int, impls=IMPLS, batches: int = 4) -> list[Case]:
    cases = []
    for impl in impls:
        def make(impl=impl):
            torch.manual_seed(0)
            model = models.resnet56_cifar().to(device)
            data = [(torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device))
                    for _ in range(batches)]
            step = _step(impl, model)
            rotation = itertools.cycle(data)
            return lambda: step(*next(rotation))

        cases.append(Case(workload="train_step_resnet56", impl=impl, make=make, floor_bytes=0,
                          params={"batch": batch, "dtype": "float32"}))
    return cases
