"""BiSAM under torch.distributed on the CPU: 2 processes over gloo.

- DDP, per-replica perturbation (pass 1 under ``no_sync``) and synchronised pass 1, with and without
  micro-batches, and a ``torch.compile``d DDP model: the ranks hold identical weights after every step, and the step equals a
  single-process recomputation (the mean over replicas of the pass-2 gradients, each taken at that
  replica's own perturbation; or one perturbation from the whole batch).
- DDP with a GradScaler: a pass-1 overflow on one replica skips the step on every replica.
- FSDP2 (``fully_shard``): the sharded run matches a single-process run on the whole batch (the
  squared norm of the local shards is all-reduced before the perturbation), and resumes identically
  through torch.distributed.checkpoint's ``get_state_dict`` / ``set_state_dict``.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import bisam_kernels as bk

WORLD = 2

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    try:
        from torch.distributed._composable.fsdp import fully_shard
    except ImportError:
        fully_shard = None

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _spawn(worker, tmp_path, *args):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_run_rank, args=(worker, init, *args), nprocs=WORLD, join=True)


def _run_rank(rank: int, worker, init: str, *args) -> None:
    """One rank: the process group around `worker(rank, *args)`. A failing check raises (the test
    fails); after a pass both ranks meet at a barrier before tearing the group down, and the process
    ends with os._exit: gloo's threads destroyed by C++ static destructors at interpreter exit have
    been seen to abort a rank ('terminate called without an active exception') after its work."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        worker(rank, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _mlp(with_bn: bool = False) -> nn.Module:
    norm = nn.BatchNorm1d(16) if with_bn else nn.LayerNorm(16)
    return nn.Sequential(nn.Linear(6, 16, bias=False), norm, nn.ReLU(), nn.Linear(16, 13), nn.ReLU(), nn.Linear(13, 5))


def _batches(steps: int, n: int):
    """The same global batches on every rank (a shared seed)."""
    gen = torch.Generator().manual_seed(1234)
    return [(torch.randn(n, 6, generator=gen), torch.randint(0, 5, (n,), generator=gen)) for _ in range(steps)]


def _shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t.chunk(WORLD)[rank]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _assert_same_on_all_ranks(tensors, what: str) -> None:
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    for r, g in enumerate(gathered[1:], 1):
        assert torch.equal(g, gathered[0]), f"{what}: rank {r} differs from rank 0 by {(g - gathered[0]).abs().max()}"


# ---------------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------------


def _per_replica_reference_step(model, opt, x, y):
    """Single process: each replica's own perturbation, pass-2 gradients averaged, one base step."""
    total = None
    for r in range(WORLD):
        xs, ys = _shard(x, r), _shard(y, r)
        bk.bisam_loss(model(xs), ys).backward()
        opt.first_step(zero_grad=True)
        with bk.frozen_bn_stats(model):
            F.cross_entropy(model(xs), ys, label_smoothing=0.1).backward()
        opt.restore()
        grads = [p.grad / WORLD for p in model.parameters()]
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
        opt.zero_grad()
    for p, g in zip(model.parameters(), total):
        p.grad = g
    opt.base_optimizer.step()
    opt.zero_grad()


def _ddp_worker(rank: int) -> None:
    for with_bn in (False, True):
        for synced in (False, True):
            torch.manual_seed(0)
            ref = _mlp(with_bn)
            ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(ref))
            opt = bk.BiSAM(ddp.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
            ref_opt = bk.BiSAM(ref.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
            what = f"DDP {'synchronised' if synced else 'per-replica'}{' + BN' if with_bn else ''}"
            for step, (x, y) in enumerate(_batches(4, 2 * 10)):
                micro = 1 if with_bn else 2  # accumulation under DDP: no_sync until the last micro-batch
                xs, ys = _shard(x, rank), _shard(y, rank)
                bk.bisam_step(ddp, opt, xs, ys, sync_first_pass=synced, micro_batches=micro)
                _assert_same_on_all_ranks(list(ddp.parameters()), f"{what}, step {step}")
                if with_bn:
                    continue  # per-rank batch statistics: no single-process equivalent
                if synced:
                    bk.bisam_step(ref, ref_opt, x, y)
                else:
                    _per_replica_reference_step(ref, ref_opt, x, y)
                for (name, p), q in zip(ddp.module.named_parameters(), ref.parameters()):
                    err = _rel(p, q)
                    assert err <= 1e-5, f"{what}, step {step}, {name}: relative error {err:.3g}"
            if not with_bn:  # the two modes do differ (the test can tell them apart)
                flat = torch.cat([p.detach().reshape(-1) for p in ddp.parameters()])
                if synced:
                    assert _rel(flat, per_replica_flat) > 1e-4, "per-replica and synchronised runs coincide"
                else:
                    per_replica_flat = flat
    # torch.compile(DDP(model)), the order PyTorch recommends: its wrapper hides the DDP module, whose no_sync
    # bisam_step must still find (the per-replica default; it once silently ran a synchronised pass 1).
    torch.manual_seed(0)
    ref = _mlp()
    ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(ref))
    compiled = torch.compile(ddp, backend="eager")
    opt = bk.BiSAM(ddp.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    ref_opt = bk.BiSAM(ref.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    for step, (x, y) in enumerate(_batches(2, 2 * 10)):
        bk.bisam_step(compiled, opt, _shard(x, rank), _shard(y, rank))
        _per_replica_reference_step(ref, ref_opt, x, y)
        for (name, p), q in zip(ddp.module.named_parameters(), ref.parameters()):
            err = _rel(p, q)
            assert err <= 1e-5, f"compiled DDP per-replica, step {step}, {name}: relative error {err:.3g}"


def test_ddp_per_replica_and_synchronised_first_pass(tmp_path):
    _spawn(_ddp_worker, tmp_path)


def _ddp_overflow_worker(rank: int) -> None:
    """Per-replica pass 1 with a GradScaler: pass 1 overflows on rank 0 only. Both replicas must skip the
    step and back off (rank 1's own pass 1 was finite: the overflow reaches it through pass 2's all-reduce),
    so the weights stay identical across ranks; the next, finite, step is taken on both."""
    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(_mlp())
    opt = bk.BiSAM(ddp.parameters(), torch.optim.SGD, rho=0.2, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    (x, y), (x2, y2) = _batches(2, 2 * 8)
    overflow_here = rank == 0

    def ascent(z, t):  # what an fp16 overflow leaves in one replica's pass-1 gradients
        return bk.bisam_loss(z, t) * (float("inf") if overflow_here else 1.0)

    before = [p.detach().clone() for p in ddp.parameters()]
    out = bk.bisam_step(ddp, opt, _shard(x, rank), _shard(y, rank), ascent_loss=ascent, scaler=scaler)
    assert bool(torch.isfinite(out.ascent_norm)) != overflow_here
    assert all(torch.equal(p, b) for p, b in zip(ddp.parameters(), before)), f"rank {rank} stepped"
    assert scaler.get_scale() == 2.0**9, f"rank {rank}: scale {scaler.get_scale()}"
    overflow_here = False
    bk.bisam_step(ddp, opt, _shard(x2, rank), _shard(y2, rank), ascent_loss=ascent, scaler=scaler)
    assert not any(torch.equal(p, b) for p, b in zip(ddp.parameters(), before)), f"rank {rank} did not step"
    _assert_same_on_all_ranks(list(ddp.parameters()), "after a one-replica pass-1 overflow")


def test_ddp_per_replica_overflow_skips_the_step_on_every_replica(tmp_path):
    _spawn(_ddp_overflow_worker, tmp_path)


# ---------------------------------------------------------------------------------------------
# FSDP2
# ---------------------------------------------------------------------------------------------

FSDP_CONFIGS = [
    # (base, base kwargs, adaptive, per-group rho for the last layer, micro-batches)
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9), False, 0.3, 1),
    (torch.optim.AdamW, dict(lr=3e-3, weight_decay=1e-2), True, None, 2),
]


def _groups(model: nn.Module, last_rho):
    if last_rho is None:
        return model.parameters()
    last = list(model[-1].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in last)]
    return [{"params": rest}, {"params": last, "rho": last_rho}]


def _fsdp_worker(rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    mesh = init_device_mesh("cpu", (WORLD,))
    for base, kw, adaptive, last_rho, micro in FSDP_CONFIGS:
        rho = 0.5 if adaptive else 0.1

        def sharded(model):
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            return model, bk.BiSAM(_groups(model, last_rho), base, rho=rho, adaptive=adaptive, **kw)

        torch.manual_seed(0)
        ref = _mlp()
        model, opt = sharded(copy.deepcopy(ref))
        ref_opt = bk.BiSAM(_groups(ref, last_rho), base, rho=rho, adaptive=adaptive, **kw)
        what = f"FSDP2 {base.__name__} adaptive={adaptive} micro_batches={micro}"
        for step, (x, y) in enumerate(_batches(4, 2 * 12)):
            out = bk.bisam_step(model, opt, _shard(x, rank), _shard(y, rank), micro_batches=micro)
            bk.bisam_step(ref, ref_opt, x, y)
            assert torch.isfinite(out.loss)
            for (name, p), q in zip(model.named_parameters(), ref.parameters()):
                full = p.full_tensor()
                err = _rel(full, q)
                assert err <= 1e-5, f"{what}, step {step}, {name}: relative error {err:.3g}"
        local = [p.to_local() for p in model.parameters()]
        assert sum(t.numel() for t in local) < sum(p.numel() for p in ref.parameters())  # really sharded
        # torch.distributed.checkpoint's state-dict API, into a fresh sharded model: the next step is identical
        resumed, resumed_opt = sharded(_mlp())
        model_sd, opt_sd = copy.deepcopy(get_state_dict(model, opt))  # (its tensors are the live ones)
        set_state_dict(resumed, resumed_opt, model_state_dict=model_sd, optim_state_dict=opt_sd)
        x, y = _batches(5, 2 * 12)[-1]
        for m, o in ((model, opt), (resumed, resumed_opt)):
            bk.bisam_step(m, o, _shard(x, rank), _shard(y, rank), micro_batches=micro)
        for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
            assert torch.equal(p.to_local(), q.to_local()), f"{what}, resumed through get/set_state_dict: {name}"


@pytest.mark.skipif(fully_shard is None, reason="FSDP2 (fully_shard) not available in this torch")
def test_fsdp2_matches_a_single_process_run(tmp_path):
    _spawn(_fsdp_worker, tmp_path)
