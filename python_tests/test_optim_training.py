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
from bisam_kernels import references as R

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


def test_overflowed_first_pass_skips_the_step_and_backs_off():
    """A skipped perturbation (non-finite pass-1 norm) counts as an overflowed step for the scaler: no
    update (not a silent SGD step at w), and the scale backs off, also when the caller unscaled first."""
    for unscale_first in (False, True):
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
        if unscale_first:
            scaler.unscale_(opt)  # e.g. to clip
        opt.second_step(zero_grad=True, scaler=scaler)
        scaler.update()
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)), "step not skipped"
        assert scaler.get_scale() == 2.0**19


def _fp16_mlp(device):
    torch.manual_seed(torch.initial_seed() % 2**31)
    return nn.Sequential(nn.Linear(20, 32), nn.SiLU(), nn.BatchNorm1d(32), nn.Linear(32, 10)).to(device)


def _weights_seen_in_pass_two(model):
    """Records the first layer's weight at every forward: pass 2 sees w + e, so a change shows a perturbation."""
    seen = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append(m.weight.detach().clone()))
    return seen


def test_fp16_autocast_with_a_default_grad_scaler_perturbs_every_step(device):
    """Issue 9.1: with fp16 autocast and GradScaler() (scale 65536) every step perturbs: finite norm, the
    weights moved in pass 2, no step skipped. (The loss used to be float16: 65536 overflowed it.)"""
    model = _fp16_mlp(device)
    opt = bk.BiSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler(device)
    seen = _weights_seen_in_pass_two(model)
    for step in range(5):
        x, y = torch.randn(16, 20, device=device), torch.randint(0, 10, (16,), device=device)
        out = bk.bisam_step(model, opt, x, y, autocast_dtype=torch.float16, scaler=scaler)
        assert out.logits.dtype == torch.float16 and out.ascent_loss.dtype == torch.float32
        assert torch.isfinite(out.ascent_norm) and out.ascent_norm > 0, f"step {step}: perturbation skipped"
        w_pass1, w_pass2 = seen[-2], seen[-1]
        assert not torch.equal(w_pass1, w_pass2), f"step {step}: weights not perturbed in pass 2"
    assert scaler.get_scale() == 65536.0  # no step overflowed


def test_real_fp16_overflow_in_pass_one_makes_the_scaler_back_off():
    """A pass-1 loss whose scaled gradient overflows float16 for real (not an injected inf): the steps are
    skipped and the scale backs off until pass 1 fits, after which the steps perturb."""
    model = _fp16_mlp("cpu")
    opt = bk.BiSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05)
    scaler = torch.amp.GradScaler("cpu")
    x, y = torch.randn(8, 20), torch.randint(0, 10, (8,))

    def steep_ascent_loss(z, t):  # gradients 1e4 x those of the lower bound: 65536 x 1e4 / 8 overflows fp16
        return 1e4 * bk.bisam_loss(z, t)

    overflows, perturbed = 0, 0
    for _ in range(20):
        before = [p.detach().clone() for p in model.parameters()]
        out = bk.bisam_step(model, opt, x, y, ascent_loss=steep_ascent_loss, autocast_dtype=torch.float16,
                            scaler=scaler)
        finite = bool(torch.isfinite(out.ascent_norm))
        moved = not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        assert moved == finite, "an overflowed pass 1 must skip the step; a finite one must take it"
        overflows += not finite
        perturbed += finite
        assert scaler.get_scale() == 65536.0 / 2**overflows  # each overflow backed off once
    assert overflows >= 5 and perturbed >= 5, (overflows, perturbed)


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


def test_parameters_outside_the_optimizer_get_pass_two_gradients_only():
    """A parameter the BiSAM optimizer does not hold (another optimizer's) ends the step with the gradient it
    had plus pass 2's, as after one forward/backward of the training loss: not pass 1's surrogate gradient
    as well."""
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    reference = copy.deepcopy(model)
    x, y = torch.randn(16, 6), torch.randint(0, 5, (16,))
    outside = model[0].weight
    earlier = torch.randn_like(outside)
    outside.grad = earlier.clone()
    opt = bk.BiSAM([p for p in model.parameters() if p is not outside], torch.optim.SGD, rho=0.1, lr=0.1)
    bk.bisam_step(model, opt, x, y, label_smoothing=0.0)

    ref_opt = bk.BiSAM([p for p in reference.parameters() if p is not reference[0].weight], torch.optim.SGD,
                       rho=0.1, lr=0.1)
    bk.bisam_loss(reference(x), y).backward()
    reference[0].weight.grad = None
    ref_opt.first_step(zero_grad=True)
    F.cross_entropy(reference(x), y).backward()
    expected = earlier + reference[0].weight.grad
    ref_opt.second_step(zero_grad=True)
    torch.testing.assert_close(outside.grad, expected, rtol=1e-6, atol=1e-7)
    assert_models_close(model, reference, 1e-6)


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
    with pytest.raises(TypeError, match="inputs must be a tensor, a tuple/list or a dict of tensors, got str"):
        bk.bisam_step(model, opt, "x", y)
    assert not opt.perturbed


class _ByName(nn.Module):
    """A model called with keyword tensors, as a Hugging Face model is."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, pixels, scale):
        return self.net(pixels * scale)


def test_dict_inputs_are_passed_by_name_and_split_into_micro_batches():
    net = small_cnn(norm="gn")
    keyed = _ByName(copy.deepcopy(net))
    opt = bk.BiSAM(net.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    opt_keyed = bk.BiSAM(keyed.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    for x, y in make_batches(2, n=6):
        bk.bisam_step(net, opt, x * 2.0, y)
        bk.bisam_step(keyed, opt_keyed, {"pixels": x, "scale": torch.full((len(y), 1, 1, 1), 2.0)}, y, micro_batches=3)
    assert_models_close(keyed.net, net, 2e-6)


# ---------------------------------------------------------------------------------------------
# classes-last logits, the released smoothing, torch.compile, the documented loops
# ---------------------------------------------------------------------------------------------


class _TinyLM(nn.Module):
    """Tokens (B, T) -> logits (B, T, V), the classes last."""

    def __init__(self, vocab=11, width=8):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, width), nn.Linear(width, vocab)

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens)))


@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("style", ["pytorch", "released"])
def test_bisam_step_on_language_model_logits(micro_batches, style):
    """Issue 9.4: (B, T, V) logits go through both built-in passes the same way, as rows of (B*T, V)."""
    model = _TinyLM()
    flat = copy.deepcopy(model)
    opt = bk.BiSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    opt_flat = bk.BiSAM(flat.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    for _ in range(3):
        tokens, targets = torch.randint(0, 11, (4, 6)), torch.randint(0, 11, (4, 6))
        targets[0, :2] = -100
        style_kw = {} if style == "pytorch" else {"label_smoothing_style": style}  # the default pass 2 as it was
        out = bk.bisam_step(model, opt, tokens, targets, micro_batches=micro_batches, **style_kw)
        assert out.logits.shape == (4, 6, 11)
        # the reference: the same rows, flattened by hand, one micro-batch, the loss written out
        z = flat(tokens).reshape(-1, 11)
        bk.bisam_loss(z, targets.reshape(-1)).backward()
        opt_flat.first_step(zero_grad=True)
        z = flat(tokens).reshape(-1, 11)
        valid = targets.reshape(-1) != -100
        if style == "released":
            rows = R.smooth_crossentropy_released(z[valid], targets.reshape(-1)[valid], 0.1)
            rows.mean().backward()
        else:
            F.cross_entropy(z, targets.reshape(-1), label_smoothing=0.1).backward()
        opt_flat.second_step(zero_grad=True)
        assert_models_close(model, flat, 1e-6)


def test_released_label_smoothing_in_bisam_step_follows_the_released_script():
    """label_smoothing_style="released": pass 2 is the released smooth_crossentropy (mean over rows)."""
    model = small_cnn()
    ref = copy.deepcopy(model)
    opt = bk.BiSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for x, y in make_batches(3):
        bk.bisam_step(model, opt, x, y, label_smoothing=0.2, label_smoothing_style="released")
        R.released_enable_running_stats(ref)
        R.bisam_loss_released(ref(x), y, "log").backward()
        params = [p for p in ref.parameters() if p.grad is not None]
        old = R.sam_first_step_loop(params, [p.grad for p in params], 0.1)
        ref_opt.zero_grad()
        R.released_disable_running_stats(ref)
        R.smooth_crossentropy_released(ref(x), y, 0.2).mean().backward()
        R.sam_restore_loop(params, old)
        ref_opt.step()
        ref_opt.zero_grad()
        R.released_enable_running_stats(ref)
        assert_models_close(model, ref, 1e-5)


def test_bisam_step_under_torch_compile_equals_eager():
    """Issue 9.2: a compiled bisam_step (the optimizer steps are graph breaks) trains like the eager one."""
    model = small_cnn()
    other = copy.deepcopy(model)
    opt = bk.BiSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    opt2 = bk.BiSAM(other.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    compiled_step = torch.compile(bk.bisam_step, backend="eager")
    for x, y in make_batches(3):
        compiled_step(model, opt, x, y)
        bk.bisam_step(other, opt2, x, y)
        assert not opt.perturbed
        assert_models_close(model, other, 1e-6)


def _documented_snippet(path: str, marker: str) -> str:
    """The python code block of a doc that contains ``marker``."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / path).read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if marker in b]
    assert len(blocks) == 1, f"{path}: expected one python block containing {marker!r}, found {len(blocks)}"
    return blocks[0]


def test_documented_closure_form_equals_bisam_step():
    """Issue 9.6: the closure form of docs/optimizer.md, as written there, trains exactly like bisam_step
    (BatchNorm statistics included)."""
    snippet = _documented_snippet("docs/optimizer.md", "opt.step(closure)")
    model = small_cnn()
    other = copy.deepcopy(model)
    opt = bk.BiSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    opt2 = bk.BiSAM(other.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    for x, y in make_batches(3):
        exec(snippet, {"bk": bk, "F": F, "torch": torch, "model": model, "opt": opt, "x": x, "y": y})
        bk.bisam_step(other, opt2, x, y)
        assert_models_close(model, other, 1e-6)
