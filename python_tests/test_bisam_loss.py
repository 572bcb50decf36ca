"""The fused BiSAM loss against the float64 reference of docs/design.md section 1.

Every check runs through the Triton kernels (under TRITON_INTERPRET=1 on CPU tensors when there is no
GPU, on CUDA tensors when there is one) and through the composite CPU path. Buffers the kernels write
are NaN-poisoned first (the launcher allocates them through one function, replaced here).
"""

import math
import os

import numpy as np
import pytest
import torch
from conftest import Route, assert_close, compile_counting_graphs, requires_cuda

import bisam_kernels as bk
from bisam_kernels.ops import row_loss
from bisam_kernels.ops.row_loss import launch, modes
from bisam_kernels.ops.row_loss.modes import Phi, Reduction
from bisam_kernels.references import bisam_loss_eager, bisam_loss_fp64, bisam_loss_released

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
PHIS = ["tanh", "log"]
REDUCTIONS = ["mean", "sum", "none"]
IGNORE = -100

# Every K in {1, 2, 10, 100, 1000, 32001} and N in {0, 1, 7, 128}; K = 32001 (two-pass kernel) with few rows.
SHAPES = [(0, 10), (1, 1), (7, 1), (128, 2), (7, 10), (128, 10), (1, 100), (128, 100), (7, 1000), (1, 32001),
          (7, 32001)]


pytestmark = pytest.mark.usefixtures("poison_row_buffers")


def make_inputs(N, K, device, dtype=torch.float32, scale=3.0, ignored=0.2, target_dtype=torch.int64):
    z = (torch.randn(N, K, dtype=torch.float64) * scale).to(dtype).to(device)
    t = torch.randint(0, K, (N,), dtype=target_dtype)
    t[torch.rand(N) < ignored] = IGNORE
    return z, t.to(device)


def reference(z, t, weights=None, **kw):
    """(loss, d(sum(weights * loss))/dz) in float64, from the float64 reference by autograd."""
    z64 = z.detach().double().cpu().requires_grad_()
    loss = bisam_loss_fp64(z64, t.cpu(), **kw)
    w = torch.ones_like(loss) if weights is None else weights.double().cpu()
    (loss * w).sum().backward()
    return loss.detach(), z64.grad


def run(z, t, weights=None, **kw):
    """(loss, gradient) of the public function on a leaf copy of z."""
    leaf = z.detach().clone().requires_grad_()
    loss = bk.bisam_loss(leaf, t, **kw)
    w = torch.ones_like(loss) if weights is None else weights.to(loss)
    (loss * w).sum().backward()
    return loss.detach(), leaf.grad


def check(z, t, ctx, weights=None, rtol=1e-5, floor=1e-7, **kw):
    """The public function (inside ctx) against the float64 reference: loss and gradient."""
    ref_loss, ref_grad = reference(z, t, weights, **kw)
    with ctx:
        loss, grad = run(z, t, weights, **kw)
    assert loss.dtype == z.dtype and grad.dtype == z.dtype
    assert_close(loss, ref_loss, rtol, "loss", floor=floor)
    assert_close(grad, ref_grad, rtol, "gradient", floor=floor)
    return loss, grad


# ---------------------------------------------------------------------------------------------
# Accuracy against the float64 reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("phi", PHIS)
def test_matches_fp64_reference(backend, phi, reduction, N, K):
    device, ctx = backend
    z, t = make_inputs(N, K, device)
    weights = torch.randn(N, dtype=torch.float64) if reduction == "none" else None
    check(z, t, ctx, weights, phi=phi, mu=2.5, alpha=0.3, reduction=reduction, ignore_index=IGNORE)


@pytest.mark.parametrize("phi", PHIS)
@pytest.mark.parametrize("mu,scale", [(100.0, 1.0), (1.0, 1e4), (100.0, 1e4), (0.01, 30.0)])
def test_extreme_logits_and_mu(backend, phi, mu, scale):
    device, ctx = backend
    z, t = make_inputs(33, 130, device, scale=scale)
    z[0, :] = 0.0  # every margin 0: phi = 0 everywhere, loss = log K
    z[1, 5] = 1e4  # one huge wrong logit
    z[2] = -1e4
    z[2, int(t[2].clamp(min=0))] = 1e4  # a very confident correct row: loss ~ 0
    y3 = int(t[3].clamp(min=0))  # near ties among large logits: the margins must keep their digits
    z[3] = -1e4
    z[3, y3] = 12345.678
    z[3, (y3 + 1) % 130] = 12345.678 + 0.75
    z[3, (y3 + 2) % 130] = 12345.678 - 0.5
    weights = torch.rand(33, dtype=torch.float64) + 0.5
    # s = mu * phi is rounded to float32 before the log-sum-exp: an error of ~mu * 2^-24 per term.
    loss, grad = check(z, t, ctx, weights, floor=1e-7 * max(1.0, mu), phi=phi, mu=mu, alpha=0.1, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("phi", PHIS)
@pytest.mark.parametrize("N,K,reduction", [(128, 10, "mean"), (7, 1000, "none"), (3, 32001, "sum")])
def test_low_precision_within_twice_pytorch_error(backend, dtype, phi, N, K, reduction):
    """bf16/fp16 logits: error against float64 at most 2x PyTorch's own same-dtype error, plus one unit of
    the dtype's rounding at the reference's scale (the error of merely storing the exact answer)."""
    device, ctx = backend
    z, t = make_inputs(N, K, device, dtype=dtype)
    kw = dict(phi=phi, mu=2.0, alpha=0.3, reduction=reduction)
    weights = torch.rand(N, dtype=torch.float64) if reduction == "none" else None
    ref_loss, ref_grad = reference(z, t, weights, **kw)
    leaf = z.detach().clone().requires_grad_()
    eager = bisam_loss_eager(leaf, t, **kw)
    (eager * (1.0 if weights is None else weights.to(eager))).sum().backward()
    with ctx:
        loss, grad = run(z, t, weights, **kw)
    assert loss.dtype == dtype and grad.dtype == dtype
    eps = torch.finfo(dtype).eps
    for what, out, theirs, ref in [("loss", loss, eager, ref_loss), ("gradient", grad, leaf.grad, ref_grad)]:
        ours = (out.double().cpu() - ref).abs().max().item()
        pytorch = (theirs.detach().double().cpu() - ref).abs().max().item()
        assert ours <= 2 * pytorch + eps * ref.abs().max().item(), f"{what}: error {ours:.3g} vs PyTorch {pytorch:.3g}"


# ---------------------------------------------------------------------------------------------
# Direct launcher calls: the Triton kernels under the interpreter, every code path
# ---------------------------------------------------------------------------------------------

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def needs_kernels(test):
    """On the GPU when there is one (then marked `cuda`), else under the interpreter."""
    test = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                              reason="Triton kernels need a GPU or TRITON_INTERPRET=1")(test)
    return pytest.mark.cuda(test) if KERNEL_DEVICE == "cuda" else test


@needs_kernels
@pytest.mark.parametrize("K", [1, 10, 1000, 8192, 8193, 32001])
@pytest.mark.parametrize("phi", PHIS)
def test_launcher_forward_with_and_without_gradient(phi, K):
    """Single-pass (K <= 8192) and two-pass kernels, the fused gradient written into a poisoned buffer."""
    N = 3 if K > 1000 else 37
    z, t = make_inputs(N, K, KERNEL_DEVICE)
    ref_loss, ref_grad = reference(z, t, phi=phi, mu=3.0, alpha=0.2, reduction="mean")
    g = torch.full_like(z, float("nan"))
    loss, out = launch.triton_forward(z, t, modes.PHIS[phi], 3.0, 0.2, IGNORE, Reduction.MEAN, 1.0, g)
    assert out is g
    assert_close(loss, ref_loss, 1e-5, "loss")
    assert_close(g, ref_grad, 1e-5, "gradient")
    loss_only, none = launch.triton_forward(z, t, modes.PHIS[phi], 3.0, 0.2, IGNORE, Reduction.MEAN, 1.0, None)
    assert none is None
    torch.testing.assert_close(loss_only, loss, rtol=0, atol=0, equal_nan=True)


def test_reduction_partition_covers_every_value():
    """Slabs are whole blocks, cover n, number at most _MAX_PARTIALS; small n is one program."""
    for n in [0, 1, launch.REDUCE_SLAB, launch.REDUCE_SLAB + 1, 10**6, launch.REDUCE_SLAB * launch.MAX_PARTIALS + 1, 2**31 - 1]:
        per, programs = launch.partition(n)
        assert per % launch.REDUCE_BLOCK == 0 and per >= launch.REDUCE_SLAB
        assert 1 <= programs <= launch.MAX_PARTIALS and per * programs >= n and per * (programs - 1) < max(n, 1)
    assert launch.partition(launch.REDUCE_SLAB) == (launch.REDUCE_SLAB, 1)


@needs_kernels
def test_two_stage_count_and_reduce():
    """N past one slab: per-slab partial counts and sums, then one program; fixed order, same bits twice."""
    n = 2 * launch.REDUCE_SLAB + 777
    assert launch.partition(n)[1] == 3
    values = torch.randn(n, dtype=torch.float64).to(torch.float32).to(KERNEL_DEVICE)
    t = torch.randint(0, 5, (n,))
    t[torch.rand(n) < 0.3] = IGNORE
    count = launch.triton_count(t.to(KERNEL_DEVICE), IGNORE)
    assert count.item() == (t != IGNORE).sum().item()
    total = launch.triton_reduce(values, None, torch.float32)
    mean = launch.triton_reduce(values, count, torch.float32)
    expected = values.double().sum().item()
    assert total.shape == () and abs(total.item() - expected) <= 1e-5 * values.double().abs().sum().item()
    assert abs(mean.item() - expected / count.item()) <= 1e-5 * values.double().abs().mean().item()
    assert torch.equal(launch.triton_reduce(values, None, torch.float32), total)


@needs_kernels
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_many_rows_reduce_in_two_stages(reduction):
    """The whole loss with N past one reduction slab (per-pixel-like losses) against the reference."""
    z, t = make_inputs(launch.REDUCE_SLAB + 4099, 2, KERNEL_DEVICE)
    check(z, t, Route(True), phi="log", reduction=reduction, ignore_index=IGNORE)


@needs_kernels
def test_launcher_configs_are_the_aot_compiled_ones():
    """Every tile the launcher can pick is in kernel_configs() (compiled ahead of time in test_triton_aot)."""
    listed = {tuple(sorted(c.items())) for name, c in launch.kernel_configs() if name == "_bisam_loss_kernel"}
    for K in list(range(1, 70)) + [2**i + d for i in range(6, 19) for d in (-1, 0, 1)]:
        for phi in (Phi.TANH, Phi.LOG):
            assert tuple(sorted(dict(launch.forward_config(K), PHI=phi).items())) in listed, K
    scale = [c for name, c in launch.kernel_configs() if name == "_scale_grad_kernel"]
    for K in [1, 16, 17, 128, 129, 1024, 1025, 10**6]:
        assert launch.scale_config(K) in scale


@needs_kernels
@pytest.mark.parametrize("K", [10, 300, 9000])
def test_scale_kernel_skips_rows_whose_factor_is_one(K):
    """The in-place backward: rows with factor 1 are not touched (poison survives), others are scaled."""
    g = torch.randn(40, K, device=KERNEL_DEVICE)
    g[::3] = float("nan")  # rows 0, 3, 6, ... get factor 1: must stay NaN, i.e. never written
    go = torch.randn(40, device=KERNEL_DEVICE)
    go[::3] = 1.0
    expected = g * go[:, None]
    copy = launch.triton_scale_grad_(g, go)
    torch.testing.assert_close(g, expected, equal_nan=True)
    torch.testing.assert_close(copy, go)
    before = g.clone()
    launch.triton_scale_grad_(g, torch.tensor(1.0, device=KERNEL_DEVICE))  # loss.backward(): nothing happens
    torch.testing.assert_close(g, before, equal_nan=True, rtol=0, atol=0)
    launch.triton_scale_grad_(g, torch.tensor(-2.0, device=KERNEL_DEVICE))
    torch.testing.assert_close(g, -2 * before, equal_nan=True)


@needs_kernels
@pytest.mark.parametrize("K", [5, 1000, 20000])
def test_bad_target_in_kernel_gives_nan_row(K):
    """On the device a target outside [0, K) that is not ignore_index makes that row's loss and gradient
    NaN (no host synchronisation to raise); the other rows are unaffected."""
    z, t = make_inputs(6, K, KERNEL_DEVICE, ignored=0.0)
    t[1], t[4] = K, -3
    good = torch.tensor([0, 2, 3, 5])
    ref_loss, ref_grad = reference(z[good], t[good], phi="log", reduction="none")
    g = torch.full_like(z, 0.5)
    loss, _ = launch.triton_forward(z, t, Phi.LOG, 1.0, 0.1, IGNORE, Reduction.NONE, 1.0, g)
    assert torch.isnan(loss[[1, 4]]).all() and torch.isnan(g[[1, 4]]).all()
    assert_close(loss[good], ref_loss, 1e-5, "loss")
    assert_close(g[good], ref_grad, 1e-5, "gradient")
    mean, _ = launch.triton_forward(z, t, Phi.LOG, 1.0, 0.1, IGNORE, Reduction.MEAN, 1.0, None)
    assert torch.isnan(mean)


@needs_kernels
@pytest.mark.parametrize("K", [777, 9000])
def test_row_grad_kernel_matches_reference(K):
    """The backward of reduction="none": the kernel re-reads the logits with one scale per row, from the
    row statistics the forward wrote (wide rows then skip their first pass) or without them."""
    z, t = make_inputs(5, K, KERNEL_DEVICE)
    w = torch.randn(5, dtype=torch.float64)
    kw = dict(phi="tanh", mu=4.0, alpha=0.5, reduction="none", scale_by_mu=True)
    ref_loss, ref_grad = reference(z, t, w, **kw)
    stats = torch.full((2, 5), float("nan"), device=KERNEL_DEVICE)
    loss, _ = launch.triton_forward(z, t, Phi.TANH, 4.0, 0.5, IGNORE, Reduction.NONE, 0.25, None, stats)
    assert_close(loss, ref_loss, 1e-5, "loss")
    for s in (stats, None):
        g = launch.triton_row_grad(z, t, w.float().to(KERNEL_DEVICE), s, Phi.TANH, 4.0, 0.5, IGNORE, 0.25)
        assert_close(g, ref_grad, 1e-5, "gradient")


# ---------------------------------------------------------------------------------------------
# API behaviour
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored_and_empty_batch(backend, reduction):
    """As F.cross_entropy: the mean over no rows is NaN (gradient 0); sum is 0; none gives zeros."""
    device, ctx = backend
    with ctx:
        for N in (0, 5):
            z = torch.randn(N, 7, device=device, requires_grad=True)
            t = torch.full((N,), IGNORE, device=device)
            loss = bk.bisam_loss(z, t, reduction=reduction)
            loss.sum().backward()
            if reduction == "mean":
                assert torch.isnan(loss)
            else:
                assert (loss == 0).all() and loss.shape == ((N,) if reduction == "none" else ())
            assert (z.grad == 0).all()
    if reduction == "mean":  # the same convention as PyTorch's cross-entropy
        assert torch.isnan(torch.nn.functional.cross_entropy(torch.randn(3, 4), torch.full((3,), IGNORE)))


@pytest.mark.parametrize("layout", ["row_slice", "column_slice", "transposed", "3d"])
def test_non_contiguous_and_nd_logits(backend, layout):
    device, ctx = backend
    base = torch.randn(30, 2 * 50, device=device, dtype=torch.float64).float()
    if layout == "row_slice":
        z = base[::2, :50]  # row stride 200
    elif layout == "column_slice":
        z = base[:15, ::2]  # column stride 2
    elif layout == "transposed":
        z = base[:, :15].t()  # (15, 30), column stride 100
    else:
        z = base.reshape(3, 10, 100)[:, ::2, :]  # (3, 5, 100): classes last, rows strided
    t = torch.randint(0, z.shape[-1], z.shape[:-1], device=device)
    loss, grad = check(z, t, ctx, torch.randn(t.shape, dtype=torch.float64), phi="tanh", mu=3.0, reduction="none")
    assert loss.shape == t.shape and grad.shape == z.shape


@pytest.mark.parametrize("mu, alpha", [(1e4, 1e-3), (1e4, 1e-4), (1e5, 1e-5)])
def test_tanh_with_a_large_mu_and_a_small_slope(backend, mu, alpha):
    """phi = tanh(alpha F) near 0, scaled by a large mu: float32 accuracy of the gradient (relative to its largest
    entry) as good as PyTorch's own float32. tanh as (1 - u) / (1 + u) cancels there: 6e-4 before the series."""
    device, ctx = backend
    z, t = make_inputs(8, 100, device, scale=1.0, ignored=0.0)
    _, ref = reference(z, t, phi="tanh", mu=mu, alpha=alpha, reduction="mean")
    with ctx:
        _, grad = run(z, t, phi="tanh", mu=mu, alpha=alpha)
    leaf = z.detach().cpu().clone().requires_grad_()
    bisam_loss_eager(leaf, t.cpu(), "tanh", mu, alpha).backward()
    def error(g):
        return ((g.double().cpu() - ref).abs().max() / ref.abs().max()).item()
    assert error(grad) <= max(2 * error(leaf.grad), 1e-6)


@pytest.mark.parametrize("inplace", [False, True])
def test_strided_targets_and_self_overlapping_logits(backend, inplace):
    """Targets that are a strided view; logits whose rows share memory (expanded): no in-place write
    into them even with inplace_backward, the gradient is still right."""
    device, ctx = backend
    row = torch.randn(1, 40, device=device)
    t = torch.randint(0, 40, (24,), device=device)[::2]
    assert not t.is_contiguous()
    ref_loss, ref_grad = reference(row.expand(12, 40), t, phi="log", mu=2.0)
    leaf = row.clone().requires_grad_()
    with ctx:
        loss = bk.bisam_loss((leaf * 1.0).expand(12, 40), t, phi="log", mu=2.0, inplace_backward=inplace)
        loss.backward()
    assert_close(loss, ref_loss, 1e-5, "loss")
    assert_close(leaf.grad, ref_grad.sum(0, keepdim=True), 1e-5, "gradient")


def test_inplace_none_with_sum_backward_twice(backend):
    """reduction="none", inplace: loss.sum().backward() hands an expanded (stride 0) grad_output to the
    in-place per-row scaling; a second backward through the graph still gets the right gradient."""
    device, ctx = backend
    x, t = make_inputs(9, 50, device)
    _, ref = reference(x, t, reduction="none")
    with ctx:
        leaf = x.clone().requires_grad_()
        loss = bk.bisam_loss(leaf * 1.0, t, reduction="none", inplace_backward=True)
        (g1,) = torch.autograd.grad(loss.sum(), leaf, retain_graph=True)
        (g2,) = torch.autograd.grad(loss.sum() * 3.0, leaf)
    assert_close(g1, ref, 1e-5, "first backward")
    assert_close(g2, 3 * ref, 1e-5, "second backward")


def test_int32_targets_and_scale_by_mu(backend):
    device, ctx = backend
    z, t = make_inputs(64, 33, device, target_dtype=torch.int32)
    scaled, _ = check(z, t, ctx, phi="log", mu=7.0, scale_by_mu=True)
    unscaled, _ = check(z, t, ctx, phi="log", mu=7.0)
    assert_close(unscaled, 7.0 * scaled.double(), 1e-5, "1/mu")


def test_module_matches_function(backend):
    device, ctx = backend
    z, t = make_inputs(20, 9, device)
    crit = bk.BiSAMLoss(phi="tanh", mu=10.0, alpha=0.1, reduction="sum")
    assert "phi='tanh'" in repr(crit) and "mu=10.0" in repr(crit)
    with ctx:
        assert crit(z, t).item() == bk.bisam_loss(z, t, "tanh", 10.0, 0.1, "sum").item()


def test_default_matches_released_code(backend):
    """With the defaults (no 1/mu, mean, no ignored rows) the loss and its gradient are the released code's."""
    device, ctx = backend
    z, t = make_inputs(16, 10, device, ignored=0.0)
    for phi, mu in (("tanh", 10.0), ("log", 1.0)):
        leaf = z.clone().requires_grad_()
        released = bisam_loss_released(leaf, t, phi=phi, mu=mu)
        released.backward()
        with ctx:
            loss, grad = run(z, t, phi=phi, mu=mu)
        torch.testing.assert_close(loss, released.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, leaf.grad, rtol=1e-5, atol=1e-7)


def test_higher_order_derivatives_are_refused(backend):
    """First-order only: backward(create_graph=True), the first step of a Hessian-vector product or a gradient
    penalty, raises instead of returning a gradient with no graph (a silently missing curvature)."""
    device, ctx = backend
    z, t = make_inputs(4, 5, device)
    leaf = z.clone().requires_grad_()
    with ctx, pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(bk.bisam_loss(leaf, t), leaf, create_graph=True)
    w = torch.randn(5, 5, dtype=z.dtype, device=device, requires_grad=True)
    with ctx, pytest.raises(RuntimeError, match="differentiable once"):
        bk.bisam_loss(leaf @ w, t).backward(create_graph=True)


def test_released_reference_shifts_a_clone(backend):
    device, _ = backend
    z, t = make_inputs(4, 6, device, ignored=0.0)
    before = z.clone()
    bisam_loss_released(z, t)
    assert torch.equal(z, before)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_forward_only_builds_no_graph(backend, reduction):
    device, ctx = backend
    z, t = make_inputs(12, 40, device)
    ref_loss, _ = reference(z, t, reduction=reduction)
    with ctx:
        with torch.no_grad():
            a = bk.bisam_loss(z.clone().requires_grad_(), t, reduction=reduction)
        b = bk.bisam_loss(z, t, reduction=reduction)  # logits without requires_grad
    assert a.grad_fn is None and b.grad_fn is None
    assert_close(a, ref_loss, 1e-5, "loss (no_grad)")
    assert_close(b, ref_loss, 1e-5, "loss (no requires_grad)")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_output_not_one_and_repeated_backward(backend, reduction):
    """loss * c scales the stored gradient in place; a second backward through the same graph (with
    another factor) returns a new, correctly scaled tensor and leaves the first result alone."""
    device, ctx = backend
    z, t = make_inputs(25, 300, device)
    _, ref = reference(z, t, reduction=reduction)
    with ctx:
        leaf = z.clone().requires_grad_()
        loss = bk.bisam_loss(leaf, t, reduction=reduction)
        (g2,) = torch.autograd.grad(loss * 2.0, leaf, retain_graph=True)
        (g3,) = torch.autograd.grad(loss * -3.0, leaf, retain_graph=True)
        (g2b,) = torch.autograd.grad(loss * 2.0, leaf, retain_graph=True)
        (g0,) = torch.autograd.grad(loss * 0.0, leaf)
    assert g3.data_ptr() != g2.data_ptr()
    assert_close(g2, 2 * ref, 1e-5, "first backward")
    assert_close(g3, -3 * ref, 1e-5, "second backward")
    assert_close(g2b, 2 * ref, 1e-5, "third backward")
    assert (g0 == 0).all()


def test_repeated_backward_after_zero_factor_is_nan_not_wrong(backend):
    """Documented limit: after a first backward with factor 0 the stored gradient is gone; a second
    backward with another factor gives NaN, not a silent 0."""
    device, ctx = backend
    z, t = make_inputs(5, 8, device, ignored=0.0)
    with ctx:
        leaf = z.clone().requires_grad_()
        loss = bk.bisam_loss(leaf, t)
        torch.autograd.grad(loss * 0.0, leaf, retain_graph=True)
        (g,) = torch.autograd.grad(loss * 2.0, leaf)
    assert torch.isnan(g).all()


def test_repeated_backward_into_grad_accumulates_or_raises(backend):
    """.backward() twice accumulates into the leaf's .grad (which the first backward may have made the
    stored gradient itself): right result, and a loud error once that tensor has been modified."""
    device, ctx = backend
    z, t = make_inputs(9, 20, device, ignored=0.0)
    _, ref = reference(z, t)
    with ctx:
        leaf = z.clone().requires_grad_()
        loss = bk.bisam_loss(leaf, t)
        loss.backward(retain_graph=True)
        loss.backward(retain_graph=True)
        assert_close(leaf.grad, 2 * ref, 1e-5, "two accumulated backwards")
        with pytest.raises(RuntimeError, match="modified in place"):
            loss.backward(retain_graph=True)
        leaf2 = z.clone().requires_grad_()
        loss2 = bk.bisam_loss(leaf2, t)
        loss2.backward(retain_graph=True)
        leaf2.grad.zero_()
        with pytest.raises(RuntimeError, match="modified in place"):
            loss2.backward()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_float16_gradient_survives_a_loss_scale(backend, reduction):
    """AMP: the float16 gradient of a mean over many rows is below float16's range until the loss scale
    multiplies it; it must be rounded after the scale, not flushed to zero before it."""
    device, ctx = backend
    N, K, scale = 1024, 24, 4096.0
    z, t = make_inputs(N, K, device, dtype=torch.float16, scale=4.0, ignored=0.0)
    _, ref = reference(z, t, reduction=reduction)
    with ctx:
        leaf = z.clone().requires_grad_()
        (bk.bisam_loss(leaf, t, reduction=reduction) * scale).backward()
    want = ref * scale
    normal = want.abs() > 2 * torch.finfo(torch.float16).tiny  # float16 holds these to full precision
    got = leaf.grad.double().cpu()
    rel = ((got - want).abs() / want.abs())[normal]
    # one rounding to float16 (half an ulp: 4.9e-4) with room for float32 math; rounded to float16
    # before the scale, the small entries were subnormal and lost up to all their digits
    assert rel.max().item() <= 1.5e-3, f"worst relative error {rel.max().item():.3g} on normal float16 entries"


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_inplace_backward_writes_gradient_into_logits(backend, reduction):
    device, ctx = backend
    x, t = make_inputs(31, 200, device)
    weights = torch.randn(31, dtype=torch.float64) if reduction == "none" else None
    _, ref = reference(2.0 * x, t, weights, reduction=reduction, phi="tanh", mu=3.0)
    with ctx:
        leaf = x.clone().requires_grad_()
        logits = leaf * 2.0  # MulBackward with a Python scalar saves nothing of its output
        loss = bk.bisam_loss(logits, t, reduction=reduction, phi="tanh", mu=3.0, inplace_backward=True)
        w = torch.ones_like(loss) if weights is None else weights.to(loss)
        (loss * w).sum().backward()
    assert_close(leaf.grad, 2.0 * ref, 1e-5, "gradient")
    # The logits' buffer now holds dl/dlogits (scaled in place by the row weights for "none").
    assert_close(logits.detach(), ref, 1e-5, "logits buffer")


def test_inplace_backward_refuses_logits_another_node_saved(backend):
    """The logits are overwritten: a node that saved them must fail loudly, not use clobbered values."""
    device, ctx = backend
    x, t = make_inputs(4, 6, device)
    leaf = x.clone().requires_grad_()
    logits = leaf.exp()  # exp's backward reads its output
    with ctx:
        loss = bk.bisam_loss(logits, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck, torch.compile, gradcheck
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(backend, reduction):
    device, ctx = backend
    z, t = make_inputs(9, 13, device)
    z.requires_grad_()
    with ctx:
        torch.library.opcheck(torch.ops.bisam.bisam_loss_forward, (z, t, Phi.LOG, 2.0, 0.1, IGNORE, reduction, 1.0, False, True))
        torch.library.opcheck(torch.ops.bisam.bisam_loss_forward, (z, t, Phi.TANH, 2.0, 0.1, IGNORE, reduction, 0.5, True, False))
        stats = torch.ops.bisam.bisam_loss_forward(z, t, Phi.TANH, 2.0, 0.1, IGNORE, Reduction.NONE, 1.0, False, True)[1]
        for s in (stats, stats.new_empty((0,))):
            torch.library.opcheck(torch.ops.bisam.bisam_loss_row_grad,
                                  (z.detach(), t, torch.randn(9, device=device), s, Phi.TANH, 2.0, 0.1, IGNORE, 1.0))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_op_autograd_matches_reference(backend, reduction):
    """The torch.library operator (what torch.compile traces) with its registered autograd, in eager."""
    device, ctx = backend
    z, t = make_inputs(17, 50, device)
    ref_loss, ref_grad = reference(z, t, reduction=reduction, phi="tanh", mu=2.0)
    leaf = z.clone().requires_grad_()
    with ctx:
        loss, _ = torch.ops.bisam.bisam_loss_forward(leaf, t, Phi.TANH, 2.0, 0.1, IGNORE, modes.REDUCTIONS[reduction],
                                                     1.0, False, True)
        loss.sum().backward()
    assert_close(loss, ref_loss, 1e-5, "loss")
    assert_close(leaf.grad, ref_grad, 1e-5, "gradient")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_compile_fullgraph(backend, reduction):
    # Compile the current code: the on-disk caches do not notice a change of the operator's implementation.
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        _compile_and_check(backend, reduction)


def _compile_and_check(backend, reduction):
    device, ctx = backend
    z, t = make_inputs(11, 37, device)
    weights = torch.randn(11, dtype=torch.float64) if reduction == "none" else None
    ref_loss, ref_grad = reference(z, t, weights, reduction=reduction, phi="log", mu=3.0)
    w = (torch.ones(()) if weights is None else weights.float()).to(device)

    def f(logits, targets, w):
        return (bk.bisam_loss(logits, targets, phi="log", mu=3.0, reduction=reduction) * w).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    leaf = z.clone().requires_grad_()
    with ctx:
        compiled(leaf, t, w).backward()
    assert_close(leaf.grad, ref_grad, 1e-5, "gradient")
    with ctx:
        loss = torch.compile(lambda a, b: bk.bisam_loss(a, b, phi="log", mu=3.0, reduction=reduction),
                             fullgraph=True)(z, t)
    assert_close(loss, ref_loss, 1e-5, "loss")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("phi", PHIS)
def test_gradcheck_float64(phi, reduction):
    z = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 9, (6,))
    t[2] = IGNORE
    for inplace in ([False] if reduction == "none" else [False, True]):
        assert torch.autograd.gradcheck(
            lambda x: bk.bisam_loss(x * 1.0, t, phi, 3.0, 0.4, reduction, inplace_backward=inplace), (z,))
    assert torch.autograd.gradcheck(
        lambda x: torch.ops.bisam.bisam_loss_forward(x, t, modes.PHIS[phi], 3.0, 0.4, IGNORE, modes.REDUCTIONS[reduction],
                                                     0.5, False, True)[0], (z,))


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(logits=torch.randn(5)), ValueError, "logits"),
        (dict(logits=torch.randn(5, 0), targets=torch.zeros(5, dtype=torch.long)), ValueError, "logits"),
        (dict(logits=torch.randint(0, 3, (5, 3))), TypeError, "logits"),
        (dict(logits=[[0.0, 1.0]]), TypeError, "logits"),
        (dict(targets=torch.zeros(5)), TypeError, "targets"),
        (dict(targets=torch.zeros(5, dtype=torch.uint8)), TypeError, "targets"),
        (dict(targets=torch.zeros(4, dtype=torch.long)), ValueError, "targets"),
        (dict(targets=torch.zeros(5, 1, dtype=torch.long)), ValueError, "targets"),
        (dict(phi="sigmoid"), ValueError, "phi"),
        (dict(reduction="max"), ValueError, "reduction"),
        (dict(mu=0.0), ValueError, "mu"),
        (dict(mu=-1.0), ValueError, "mu"),
        (dict(mu=float("nan")), ValueError, "mu"),
        (dict(mu=float("inf")), ValueError, "mu"),
        (dict(mu=True), TypeError, "mu"),
        (dict(alpha=float("inf")), ValueError, "alpha"),
        (dict(alpha=float("nan")), ValueError, "alpha"),
        (dict(alpha=0.0), ValueError, "alpha"),
        (dict(mu=1e39), ValueError, "mu must be .* at most 1e\\+30"),  # near float32's range: NaN or inf
        (dict(alpha=1e31), ValueError, "alpha must be .* at most 1e\\+30"),
        (dict(phi="tanh", mu=1e16, alpha=1e16), ValueError, "mu \\* alpha"),
        (dict(ignore_index=1.5), TypeError, "ignore_index"),
    ],
)
def test_bad_input(backend, kwargs, error, match):
    device, ctx = backend
    args = dict(logits=torch.randn(5, 3), targets=torch.tensor([0, 1, 2, IGNORE, 1]))
    args.update(kwargs)
    for key in ("logits", "targets"):
        if isinstance(args[key], torch.Tensor):
            args[key] = args[key].to(device)
    with ctx, pytest.raises(error, match=match):
        bk.bisam_loss(**args)


@pytest.mark.parametrize("form", ["leaf", "view of a leaf", "leaf that is a view"])
def test_inplace_backward_refuses_a_leaf_that_requires_grad(backend, form):
    """Its values, or those of the leaf it views, would become its own gradient (PyTorch refuses in-place
    operations on such leaves and their views, even where this call would skip the write)."""
    device, ctx = backend
    z, t = make_inputs(4, 5, device)
    if form == "leaf that is a view":  # a leaf whose _base does not require grad
        leaf = z.clone().reshape(20).view(4, 5).requires_grad_()
    else:
        leaf = z.clone().requires_grad_()
    before = leaf.detach().clone()
    with ctx, pytest.raises(RuntimeError, match="leaf that requires grad"):
        bk.bisam_loss(leaf.view(4, 5) if form == "view of a leaf" else leaf, t, inplace_backward=True)
    assert torch.equal(leaf.detach(), before)


@pytest.mark.parametrize("bad", [3, -1, 1000])
def test_out_of_range_target_raises_on_cpu(bad):
    """The composite CPU path checks target values (free on the host); the kernels give NaN instead."""
    t = torch.tensor([0, 1, bad, IGNORE, 1])
    with row_loss.triton_on_cpu(False), pytest.raises(ValueError, match=rf"targets .*\[0, 3\).*got {bad}"):
        bk.bisam_loss(torch.randn(5, 3), t)


def test_triton_route_really_runs_the_kernels(backend, monkeypatch):
    """The "triton" backend of these tests calls the Triton launcher (not silently the composite path)."""
    device, ctx = backend
    calls = []
    launch_rows = launch.launch_rows
    monkeypatch.setattr(launch, "launch_rows", lambda *a, **k: calls.append(1) or launch_rows(*a, **k))
    z, t = make_inputs(4, 5, device)
    with ctx:
        run(z, t)
        run(z, t, reduction="none")
    assert len(calls) == (0 if device == "cpu" and not ctx.triton else 3)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="phi"):
        bk.BiSAMLoss(phi="exp")
    with pytest.raises(ValueError, match="reduction"):
        bk.BiSAMLoss(reduction="avg")
    with pytest.raises(ValueError, match="mu"):
        bk.BiSAMLoss(mu=0.0)
    with pytest.raises(ValueError, match="alpha"):
        bk.BiSAMLoss(alpha=float("nan"))


def test_module_checks_its_arguments_at_construction():
    """Issue 9.8: the module rejects what the function would reject, when it is built (not at forward)."""
    with pytest.raises(TypeError, match="ignore_index"):
        bk.BiSAMLoss(ignore_index=None)
    with pytest.raises(TypeError, match="mu"):
        bk.BiSAMLoss(mu="1")
    assert bk.BiSAMLoss(ignore_index=np.int64(3)).ignore_index == 3


@pytest.mark.parametrize("scalar", [np.float32, np.float64, np.int32, int, float])
def test_numpy_and_integer_scalars_are_accepted(backend, scalar):
    """Issue 9.8: any real number for mu / alpha (np.float32 was a TypeError)."""
    device, ctx = backend
    z, t = make_inputs(6, 7, device)
    with ctx:
        got = bk.bisam_loss(z, t, phi="tanh", mu=scalar(2), alpha=scalar(1))
        ref = bk.bisam_loss(z, t, phi="tanh", mu=2.0, alpha=1.0)
    assert torch.equal(got, ref)


def test_classes_in_dimension_one_get_a_hint():
    """Issue 9.8: (B, V, T) logits, laid out for F.cross_entropy, are told the classes go last."""
    with pytest.raises(ValueError, match=r"movedim\(1, -1\)"):
        bk.bisam_loss(torch.randn(2, 5, 7), torch.randint(0, 5, (2, 7)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_is_float32_under_autocast(backend, dtype, reduction):
    """Issue 9.1: under autocast the loss is float32 (as F.cross_entropy's), the gradient stays in the
    logits' dtype, and a default GradScaler's 65536 times the loss does not overflow."""
    device, ctx = backend
    z, t = make_inputs(8, 10, device, dtype=dtype, ignored=0.0)
    leaf = z.clone().requires_grad_()
    with ctx, torch.autocast(device, dtype=dtype):
        loss = bk.bisam_loss(leaf, t, reduction=reduction)
        ce = torch.nn.functional.cross_entropy(leaf, t, reduction=reduction)
    assert loss.dtype == ce.dtype == torch.float32
    with ctx:
        (loss.sum() * 65536.0).backward()
    assert leaf.grad.dtype == dtype and torch.isfinite(leaf.grad).all()
    ref_loss, ref_grad = reference(z, t, reduction=reduction)
    assert_close(loss, ref_loss, 1e-2, "loss", floor=1e-2)
    assert_close(leaf.grad.double() / 65536.0, ref_grad, 1e-2, "gradient", floor=1e-2)
    with ctx:
        assert bk.bisam_loss(z, t).dtype == dtype  # outside autocast: the logits' dtype, as F.cross_entropy


def test_torch_compile_dynamic_fullgraph_has_no_graph_break(backend):
    """Issue 9.3: dynamic shapes (symbolic mu, N) trace in one graph; new N do not recompile."""
    device, ctx = backend
    graphs = []
    f = compile_counting_graphs(lambda z, t, mu: bk.bisam_loss(z, t, phi="log", mu=mu, ignore_index=IGNORE), graphs)
    for N in (5, 9, 13):
        z, t = make_inputs(N, 7, device)
        leaf = z.clone().requires_grad_()
        with ctx:
            loss = f(leaf, t, 2.0)
            loss.backward()
        ref_loss, ref_grad = reference(z, t, mu=2.0)
        assert_close(loss, ref_loss, 1e-5, "loss")
        assert_close(leaf.grad, ref_grad, 1e-5, "gradient")
    assert len(graphs) == 1


def test_k_equals_one_is_zero(backend):
    """One class: every margin is 0, the loss is 0 and so is its gradient."""
    device, ctx = backend
    z = torch.randn(9, 1, device=device) * 100
    t = torch.zeros(9, dtype=torch.long, device=device)
    with ctx:
        for phi in PHIS:
            loss, grad = run(z, t, phi=phi, mu=50.0, reduction="none")
            assert (loss == 0).all() and (grad == 0).all()


# ---------------------------------------------------------------------------------------------
# CUDA only: the same path on the device, no host synchronisation, 64-bit offsets
# ---------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("K", [10, 32001])
def test_cuda_no_host_sync(dtype, reduction, inplace, K):
    z, t = make_inputs(64, K, "cuda", dtype=dtype)
    t[3] = K + 5  # a bad target: NaN row, still no synchronisation
    leaf = z.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits = leaf * 1.0
        loss = bk.bisam_loss(logits, t, reduction=reduction, inplace_backward=inplace)
        (loss.sum() * 3.0).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rows = [i for i in range(64) if i != 3]
    assert torch.isnan(leaf.grad[3]).all() and torch.isfinite(leaf.grad[rows]).all()


@requires_cuda
def test_cuda_offsets_beyond_int32():
    """N * K > 2**31 elements: row offsets are 64-bit."""
    K = 131072
    N = (2**31) // K + 3
    z = torch.empty(N, K, dtype=torch.bfloat16, device="cuda").normal_()
    t = torch.randint(0, K, (N,), device="cuda")
    rows = [0, N // 2, N - 1]
    ref_loss, ref_grad = reference(z[rows].float(), t[rows].cpu(), reduction="none")
    g = torch.empty_like(z)
    loss, _ = launch.triton_forward(z, t, Phi.LOG, 1.0, 0.1, IGNORE, Reduction.NONE, 1.0, g)
    assert_close(loss[rows].float(), ref_loss, 1e-2, "loss", floor=1e-2)
    assert_close(g[rows].float(), ref_grad, 1e-2, "gradient", floor=1e-2)


def test_float64_logits_use_the_composite_path(backend):
    """float64 is not a Triton dtype: it runs the composite path (on CUDA too), with float64 accuracy."""
    device, ctx = backend
    z, t = make_inputs(10, 20, device, dtype=torch.float64, ignored=0.0)
    loss, _ = check(z, t, ctx, rtol=1e-12, floor=1e-14, phi="tanh", mu=5.0)
    assert not math.isnan(loss.item())
