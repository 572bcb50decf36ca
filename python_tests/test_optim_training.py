"""Training helpers: frozen BatchNorm statistics, the one-call step, AMP (GradScaler fp16, bf16 autocast)
and gradient accumulation, all on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_optim import BASES, assert_models_close, make_batches, small_cnn, state_tensors

import bisam_kernels as bk

# ---------------------------------------------------------------------------------------------
# frozen_bn_stats
# ---------------------------------------------------------------------------------------------

NORMS = {
    "BatchNorm1d": (lambda: nn.BatchNorm1d(5), (9, 5)),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(5), (4, 5, 3, 3)),
    "BatchNorm3d": (lambda: nn.BatchNorm3d(5), (3, 5, 2, 2, 2)),
    "SyncBatchNorm": (lambda: nn.SyncBatchNorm(5), (4, 5, 3, 3)),
    "LazyBatchNorm2d": (lambda: nn.LazyBatchNorm2d(), (4, 5, 3, 3)),
    "InstanceNorm2d": (lambda: nn.InstanceNorm2d(5, affine=True, track_running_stats=True), (4, 5, 3, 3)),
    "BatchNorm2d_cma": (lambda: nn.BatchNorm2d(5, momentum=None), (4, 5, 3, 3)),
}


@pytest.mark.parametrize("kind", list(NORMS))
def test_frozen_bn_stats_freezes_running_statistics(kind):
    make, shape = NORMS[kind]
    bn = make()
    model = nn.Sequential(nn.Identity(), bn)
    model(torch.randn(shape) * 3 + 1)  # materialise lazy modules; statistics move off their init
    momentum = bn.momentum
    stats = {n: b.clone() for n, b in bn.named_buffers()}
    x = torch.randn(shape) * 2 - 1
    with bk.frozen_bn_stats(model):
        out = model(x)
        out = model(x)  # twice: still frozen
    # the normalisation used the batch statistics (training mode), like a non-frozen forward
    expected = copy.deepcopy(model)(x)
    torch.testing.assert_close(out, expected)
    assert bn.momentum == momentum
    for n, b in bn.named_buffers():
        if n == "num_batches_tracked" and momentum is not None:
            counted = 2 if isinstance(bn, nn.modules.batchnorm._BatchNorm) else 0  # InstanceNorm never counts
            assert b == stats[n] + counted  # counts as in the released script
        else:
            assert torch.equal(b, stats[n]), n
    # and they move again after the block
    model(x)
    assert not torch.equal(bn.running_mean, stats["running_mean"])


def test_frozen_bn_stats_restores_on_error_and_nests():
    model = small_cnn()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    bns[0].momentum = 0.3
    with pytest.raises(KeyError):
        with bk.frozen_bn_stats(model):
            with bk.frozen_bn_stats(model):
                assert all(m.momentum == 0.0 for m in bns)
            assert all(m.momentum == 0.0 for m in bns)
            raise KeyError("boom")
    assert [m.momentum for m in bns] == [0.3, 0.1]


def test_cumulative_average_bn_counts_only_updating_passes():
    """With momentum=None the count is the averaging denominator: frozen passes must not count."""
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6, momentum=None))
    plain = copy.deepcopy(model)
    xs = [torch.randn(8, 4) for _ in range(4)]
    for x in xs:
        model(x)
        plain(x)
        with bk.frozen_bn_stats(model):
            model(x * 5)
    for n, b in model[1].named_buffers():
        torch.testing.assert_close(b, dict(plain[1].named_buffers())[n], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# gradient accumulation
# ---------------------------------------------------------------------------------------------


def _ignore_some(y: torch.Tensor) -> torch.Tensor:
    y = y.clone()
    y[torch.rand(y.shape) < 0.25] = -100
    return y


@pytest.mark.parametrize("micro_batches", [2, 3])
@pytest.mark.parametrize("losses", ["builtin", "callables"])
def test_micro_batches_equal_one_big_batch(micro_batches, losses):
    base_cls, kw = BASES["sgd_momentum"]
    model = small_cnn(norm="gn")  # no batch statistics: micro-batches are exactly one batch
    other = copy.deepcopy(model)
    opt = bk.BiSAM(model.parameters(), base_cls, rho=0.1, **kw)
    opt2 = bk.BiSAM(other.parameters(), base_cls, rho=0.1, **kw)
    if losses == "builtin":  # some rows ignored, unevenly over the micro-batches
        kwargs = dict(ascent_loss="tanh", mu=4.0)
        batches = [(x, _ignore_some(y)) for x, y in make_batches(4, n=13)]
    else:
        kwargs = dict(
            ascent_loss=lambda z, y: F.multi_margin_loss(z, y), loss_fn=lambda z, y: F.cross_entropy(z, y)
        )
        batches = make_batches(4, n=12)
    for x, y in batches:
        big = bk.bisam_step(model, opt, x, y, **kwargs)
        small = bk.bisam_step(other, opt2, x, y, micro_batches=micro_batches, **kwargs)
        assert_models_close(other, model, 2e-6)
        torch.testing.assert_close(small.loss, big.loss, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(small.ascent_loss, big.ascent_loss, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(small.logits, big.logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_all_rows_ignored_gives_zero_gradients(micro_batches):
    model = small_cnn(norm="gn")
    opt = bk.BiSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    x, _ = make_batches(1, n=6)[0]
    before = [p.detach().clone() for p in model.parameters()]
    out = bk.bisam_step(model, opt, x, torch.full((6,), -100), micro_batches=micro_batches)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    expected = float("nan") if micro_batches == 1 else 0.0  # F.cross_entropy's mean of nothing is NaN
    torch.testing.assert_close(out.loss, torch.tensor(expected), equal_nan=True)


# ---------------------------------------------------------------------------------------------
# AMP
# ---------------------------------------------------------------------------------------------


def test_grad_scaler_leaves_the_trajectory_unchanged():
    """Loss scaling by powers of two: pass 1 needs no unscale (direction invariant), pass 2 is unscaled
    by scaler.step; the fp32 trajectory equals the unscaled one. Also with an explicit unscale_ (clipping)."""
    base_cls, kw = BASES["adamw"]
    model = small_cnn()
    copies = [copy.deepcopy(model) for _ in range(3)]
    opts = [bk.BiSAM(m.parameters(), base_cls, rho=0.1, **kw) for m in [model, *copies]]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**e, growth_interval=2) for e in (12, 5)]
    for step, (x, y) in enumerate(make_batches(6)):
        bk.bisam_step(model, opts[0], x, y)
        bk.bisam_step(copies[0], opts[1], x, y, scaler=scalers[0])
        # explicit loop with gradient clipping, the pattern that used to hit "unscale_() has already been called"
        for m, opt, scaler in ((copies[1], opts[2], scalers[1]), (copies[2], opts[3], None)):
            loss = bk.bisam_loss(m(x), y)
            (scaler.scale(loss) if scaler else loss).backward()
            opt.first_step(zero_grad=True)
            with bk.frozen_bn_stats(m):
                loss = F.cross_entropy(m(x), y, label_smoothing=0.1)
                (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            opt.second_step(zero_grad=True, scaler=scaler)
            if scaler:
                scaler.update()
        assert_models_close(copies[0], model, 1e-6, f"step {step}: ")
        assert_models_close(copies[1], copies[2], 1e-6, f"clipped, step {step}: ")
    assert scalers[0].get_scale() > 2.0**12  # it grew: no step was skipped


def test_overflowed_first_pass_skips_the_perturbation():
    model = small_cnn()
    opt = bk.BiSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    x, y = make_batches(1)[0]
    loss = bk.bisam_loss(model(x), y)
    scaler.scale(loss * float("inf")).backward()  # what an fp16 overflow leaves in the gradients
    before = [p.detach().clone() for p in model.parameters()]
    assert not torch.isfinite(opt.first_step(zero_grad=True))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with bk.frozen_bn_stats(model):
        scaler.scale(F.cross_entropy(model(x), y)).backward()
    opt.second_step(zero_grad=True, scaler=scaler)
    scaler.update()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # plain step taken


def test_overflowed_second_pass_restores_and_skips_the_step():
    model = small_cnn()
    opt = bk.BiSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = make_batches(1)[0]
    scaler.scale(bk.bisam_loss(model(x), y)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.first_step(zero_grad=True)
    scaler.scale(F.cross_entropy(model(x), y) * float("inf")).backward()
    opt.second_step(zero_grad=True, scaler=scaler)
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert scaler.get_scale() == 2.0**9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_steps_track_the_fp32_run(dtype):
    base_cls, kw = BASES["sgd_momentum"]
    model = small_cnn()
    start, amp_model = copy.deepcopy(model), copy.deepcopy(model)
    opt = bk.BiSAM(model.parameters(), base_cls, rho=0.1, **kw)
    amp_opt = bk.BiSAM(amp_model.parameters(), base_cls, rho=0.1, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if dtype == torch.float16 else None
    for x, y in make_batches(4, n=32):
        ref = bk.bisam_step(model, opt, x, y)
        out = bk.bisam_step(amp_model, amp_opt, x, y, autocast_dtype=dtype, scaler=scaler)
        assert out.logits.dtype == dtype and torch.isfinite(out.loss)
        torch.testing.assert_close(out.loss.float(), ref.loss, rtol=0.05, atol=0.05)
    assert all(p.dtype == torch.float32 for p in amp_model.parameters())
    # the two runs disagree by much less than the distance they travelled from the shared start
    # (over 30 seeds the ratio peaked at 0.08 in bf16 and 0.05 in fp16)
    def flat(m):
        return torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    assert (flat(amp_model) - flat(model)).norm() <= 0.2 * (flat(model) - flat(start)).norm()


# ---------------------------------------------------------------------------------------------
# the one-call helper
# ---------------------------------------------------------------------------------------------


def test_bisam_step_sam_mode_uses_the_training_loss_twice():
    model = small_cnn()
    other = copy.deepcopy(model)
    opt = bk.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    opt2 = bk.SAM(other.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    for x, y in make_batches(2):
        out = bk.bisam_step(model, opt, x, y, ascent_loss="cross_entropy", label_smoothing=0.2)
        F.cross_entropy(other(x), y, label_smoothing=0.2).backward()
        opt2.first_step(zero_grad=True)
        with bk.frozen_bn_stats(other):
            F.cross_entropy(other(x), y, label_smoothing=0.2).backward()
        opt2.second_step(zero_grad=True)
        assert_models_close(model, other, 1e-6)
        assert out.ascent_loss.shape == () and out.logits.shape == (x.shape[0], 10)


def test_bisam_step_restores_the_weights_when_pass_two_fails():
    model = small_cnn()
    opt = bk.BiSAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    x, y = make_batches(1)[0]
    before = {n: t.clone() for n, t in state_tensors(model).items() if t.is_floating_point()}

    def bad_loss(z, y):
        raise FloatingPointError("pass 2")

    with pytest.raises(FloatingPointError):
        bk.bisam_step(model, opt, x, y, loss_fn=bad_loss, freeze_bn=True, ascent_loss="log")
    assert not opt.perturbed
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_bisam_step_bad_input():
    model = small_cnn()
    opt = bk.BiSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = make_batches(1, n=4)[0]
    with pytest.raises(TypeError, match="optimizer"):
        bk.bisam_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y)
    with pytest.raises(ValueError, match="micro_batches"):
        bk.bisam_step(model, opt, x, y, micro_batches=0)
    with pytest.raises(ValueError, match="micro_batches"):
        bk.bisam_step(model, opt, x, y, micro_batches=5)
    with pytest.raises(ValueError, match="ascent_loss"):
        bk.bisam_step(model, opt, x, y, ascent_loss="hinge")
    with pytest.raises(TypeError, match="inputs"):
        bk.bisam_step(model, opt, {"x": x}, y)
    assert not opt.perturbed
