"""The fused linear + loss (BiSAM lower bound and cross-entropy) against the float64 materialised path:
``F.linear`` in float64, then the float64 reference of the loss, differentiated by autograd.

Every check runs through the composite CPU path and through the Triton row kernel (under the interpreter
without a GPU; on CUDA with one). Buffers the kernels write are NaN-poisoned first.
"""


import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, compile_counting_graphs, requires_cuda

import bisam_kernels as bk
from bisam_kernels.ops import fused_linear
from bisam_kernels.ops.row_loss.modes import Phi, Reduction
from bisam_kernels.references import bisam_loss_eager, bisam_loss_fp64

REDUCTIONS = ["mean", "sum", "none"]
IGNORE = -100
# (name, fused function's keyword arguments, reference on logits)
LOSSES = {
    "bisam_tanh": (dict(phi="tanh", mu=2.0, alpha=0.3), lambda z, t, red: bisam_loss_fp64(z, t, "tanh", 2.0, 0.3, red)),
    "bisam_log": (dict(phi="log", mu=1.5), lambda z, t, red: bisam_loss_fp64(z, t, "log", 1.5, 0.1, red)),
    "ce": (dict(), lambda z, t, red: F.cross_entropy(z, t, reduction=red)),
    "ce_smoothed": (dict(label_smoothing=0.2), lambda z, t, red: F.cross_entropy(z, t, reduction=red, label_smoothing=0.2)),
}


pytestmark = pytest.mark.usefixtures("poison_row_buffers")


def fused(loss, hidden, weight, targets, bias=None, **kw):
    kwargs, _ = LOSSES[loss]
    fn = bk.fused_linear_cross_entropy if loss.startswith("ce") else bk.fused_linear_bisam_loss
    return fn(hidden, weight, targets, bias, **kwargs, **kw)


def make_inputs(N, H, V, device, dtype=torch.float32, bias=True, ignored=0.2):
    hidden = torch.randn(N, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64) / H ** 0.5 * 2.0
    b = torch.randn(V, dtype=torch.float64) if bias else None
    t = torch.randint(0, V, (N,))
    t[torch.rand(N) < ignored] = IGNORE
    cast = lambda x: None if x is None else x.to(dtype).to(device)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), t.to(device)


def reference(loss, hidden, weight, bias, targets, reduction, go):
    """(loss, d(sum(go * loss))/d(hidden, weight, bias)) in float64, materialised. loss: a key of LOSSES or a
    reference (logits, targets, reduction) -> loss."""
    leaves = [None if x is None else x.detach().double().cpu().requires_grad_() for x in (hidden, weight, bias)]
    z = F.linear(leaves[0], leaves[1], leaves[2])
    fn = LOSSES[loss][1] if isinstance(loss, str) else loss
    out = fn(z.reshape(-1, z.shape[-1]), targets.cpu().reshape(-1), reduction)
    out = out.reshape(targets.shape) if reduction == "none" else out
    (out * go.double().cpu()).sum().backward()
    return out.detach(), [None if x is None else x.grad for x in leaves]


def run(loss, hidden, weight, bias, targets, reduction, go, ctx, **kw):
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in (hidden, weight, bias)]
    with ctx:
        out = fused(loss, leaves[0], leaves[1], targets, leaves[2], reduction=reduction, **kw)
        (out * go.to(out)).sum().backward()
    return out.detach(), [None if x is None else x.grad for x in leaves]


def check(loss, inputs, reduction, ctx, rtol=2e-5, go=None, **kw):
    hidden, weight, bias, targets = inputs
    if go is None:
        go = torch.rand(targets.shape, dtype=torch.float64) + 0.5 if reduction == "none" else torch.tensor(2.5)
    ref, ref_grads = reference(loss, hidden, weight, bias, targets, reduction, go)
    out, grads = run(loss, hidden, weight, bias, targets, reduction, go, ctx, **kw)
    assert out.dtype == (torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    assert_close(out, ref, rtol, "loss")
    # A gradient is a sum over V (hidden) or N (weight) terms: float32 rounding grows with its square root.
    floor = 1e-7 * max(targets.numel(), weight.shape[0]) ** 0.5
    for what, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        if r is None:
            assert g is None
            continue
        assert g.dtype == hidden.dtype, what
        assert_close(g, r, rtol, f"gradient of {what}", floor=floor)
    return out, grads


# ---------------------------------------------------------------------------------------------
# Values and the three gradients against the float64 materialised path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_materialised_fp64(backend, loss, reduction, bias):
    """13 rows in chunks of 5 (not a multiple), ignored rows, a grad_output that is not 1."""
    device, ctx = backend
    check(loss, make_inputs(13, 8, 11, device, bias=bias), reduction, ctx, chunk_rows=5)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("N,H,V,chunk", [(6, 4, 1, 4), (9, 5, 37, 2), (5, 3, 8193, 3), (7, 6, 20, None)])
def test_shapes(backend, loss, N, H, V, chunk):
    """V = 1, odd V, V past the single-pass width (the two-pass row kernel), the default chunking."""
    device, ctx = backend
    for reduction in ("mean", "none"):
        check(loss, make_inputs(N, H, V, device), reduction, ctx, chunk_rows=chunk)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored_and_no_rows(backend, reduction):
    device, ctx = backend
    hidden, weight, bias, t = make_inputs(6, 4, 9, device)
    t.fill_(IGNORE)
    for loss in LOSSES:
        out, grads = run(loss, hidden, weight, bias, t, reduction, torch.tensor(1.0), ctx, chunk_rows=4)
        if reduction == "mean":
            assert torch.isnan(out)  # as F.cross_entropy: the mean over no rows
        else:
            assert (out == 0).all()
        for g in grads:
            assert (g == 0).all()
    empty = [x[:0] for x in (hidden, t)]
    for reduction_check in (reduction,):
        check("ce", (empty[0], weight, bias, empty[1]), reduction_check, ctx, chunk_rows=4)


@pytest.mark.parametrize("layout", ["transposed", "3d"])
def test_non_contiguous_and_nd_hidden(backend, layout):
    device, ctx = backend
    if layout == "transposed":
        hidden = torch.randn(8, 10, device=device).t()  # (10, 8), strides (1, 10)
        t = torch.randint(0, 13, (10,), device=device)
    else:
        hidden = torch.randn(3, 5, 16, device=device)[:, :, ::2]  # (3, 5, 8), strided
        t = torch.randint(0, 13, (3, 5), device=device)
    weight = torch.randn(13, 8, device=device)
    for loss in ("bisam_log", "ce_smoothed"):
        for reduction in REDUCTIONS:
            check(loss, (hidden, weight, None, t), reduction, ctx, chunk_rows=4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", ["bisam_tanh", "ce_smoothed"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_within_twice_pytorch_error(backend, dtype, loss, reduction):
    """bf16/fp16: each error against float64 at most 2x that of PyTorch's own same-dtype materialised path
    (F.linear, then the eager loss), plus one unit of the dtype's rounding at the reference's scale."""
    device, ctx = backend
    hidden, weight, bias, t = make_inputs(40, 16, 50, device, dtype=dtype)
    go = torch.rand(t.shape, dtype=torch.float64) + 0.5 if reduction == "none" else torch.tensor(1.0)
    ref, ref_grads = reference(loss, hidden, weight, bias, t, reduction, go)
    leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight, bias)]
    z = F.linear(*leaves)
    kwargs = LOSSES[loss][0]
    if loss.startswith("ce"):
        theirs = F.cross_entropy(z, t, reduction=reduction, **kwargs)
    else:
        theirs = bisam_loss_eager(z, t, reduction=reduction, **kwargs)
    (theirs * go.to(theirs)).sum().backward()
    out, grads = run(loss, hidden, weight, bias, t, reduction, go, ctx, chunk_rows=16)
    eps = torch.finfo(dtype).eps
    pairs = [("loss", out, theirs.detach(), ref)] + [
        (f"gradient of {w}", g, leaf.grad, r) for w, g, leaf, r in zip(("hidden", "weight", "bias"), grads, leaves,
                                                                        ref_grads)]
    for what, ours_t, theirs_t, r in pairs:
        ours = (ours_t.double().cpu() - r).abs().max().item()
        pytorch = (theirs_t.double().cpu() - r).abs().max().item()
        assert ours <= 2 * pytorch + eps * r.abs().max().item(), f"{what}: error {ours:.3g} vs PyTorch {pytorch:.3g}"


@pytest.mark.parametrize("loss", ["bisam_log", "ce"])
def test_bfloat16_weight_gradient_over_many_chunks(backend, loss):
    """16 chunks: each rounds the bfloat16 weight gradient once more. With accum_dtype=torch.float32 the
    error is at most PyTorch's own (max within 2x, mean within 1.1x); the default's mean error is
    measurably larger here (at least 1.25x the float32 accumulation's), so the shape does exercise the
    rounding the option removes. Under Triton's interpreter the comparison with PyTorch is left out: the
    interpreter truncates float32 to bfloat16 where the GPU (and torch) round to nearest, so the logits'
    gradient it stores is less precise than a GPU's (the two accumulations are still compared)."""
    device, ctx = backend
    hidden, weight, _, t = make_inputs(2048, 16, 64, device, dtype=torch.bfloat16, bias=False, ignored=0.0)
    go = torch.tensor(1.0)
    _, (_, ref, _) = reference(loss, hidden, weight, None, t, "mean", go)
    leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight)]
    z = F.linear(*leaves)
    theirs = F.cross_entropy(z, t) if loss == "ce" else bisam_loss_eager(z, t, **LOSSES[loss][0])
    theirs.backward()
    errors = {}
    for accum_dtype in (None, torch.float32):
        _, grads = run(loss, hidden, weight, None, t, "mean", go, ctx, chunk_rows=128, accum_dtype=accum_dtype)
        assert grads[1].dtype == torch.bfloat16
        errors[accum_dtype] = (grads[1].double().cpu() - ref).abs()
    if not (device == "cpu" and ctx.triton):
        pytorch = (leaves[1].grad.double().cpu() - ref).abs()
        assert errors[torch.float32].max() <= 2 * pytorch.max(), "float32 accumulation: max error above 2x PyTorch's"
        assert errors[torch.float32].mean() <= 1.1 * pytorch.mean(), "float32 accumulation: mean error above PyTorch's"
    assert errors[None].mean() >= 1.25 * errors[torch.float32].mean(), "the rounding per chunk was not exercised"


@pytest.mark.parametrize("smoothing", [1.0, 0.999])
def test_label_smoothing_near_one_keeps_the_target_gradient_accurate(backend, smoothing):
    """With s -> 1 the target's logit gradient p_y - s / V - (1 - s) is of order 1 / V: formed from 1 - p_y it
    cancelled (error ~ V 2^-24; 9.9e-5 of the weight gradient at V = 4096 before), from p_y it does not."""
    device, ctx = backend
    hidden = (torch.randn(4, 8, dtype=torch.float64) * 0.3).float().to(device)
    weight = (torch.randn(4096, 8, dtype=torch.float64) / 8 ** 0.5).float().to(device)
    t = torch.randint(0, 4096, (4,), device=device)
    w64 = weight.detach().double().cpu().requires_grad_()
    ref, = torch.autograd.grad(F.cross_entropy(hidden.double().cpu() @ w64.t(), t.cpu(), label_smoothing=smoothing), w64)
    w32 = weight.detach().clone().requires_grad_()
    pytorch, = torch.autograd.grad(F.cross_entropy(hidden @ w32.t(), t, label_smoothing=smoothing), w32)
    leaf = weight.detach().clone().requires_grad_()
    with ctx:
        ours, = torch.autograd.grad(bk.fused_linear_cross_entropy(hidden, leaf, t, label_smoothing=smoothing), leaf)

    def error(g):
        return ((g.double().cpu() - ref).abs().max() / ref.abs().max()).item()
    assert error(ours) <= max(2 * error(pytorch), 1e-6)


def test_float16_mean_gradient_survives_many_rows(backend):
    """float16's mean applies 1 / count after the matmuls: with 2000 rows the logits' gradients (p / N)
    would flush to zero in float16 if it were applied first."""
    device, ctx = backend
    inputs = make_inputs(2000, 4, 3, device, dtype=torch.float16, bias=False, ignored=0.0)
    go = torch.tensor(1.0)
    ref, ref_grads = reference("ce", *inputs[:3], inputs[3], "mean", go)
    _, grads = run("ce", *inputs[:3], inputs[3], "mean", go, ctx, chunk_rows=512)
    assert_close(grads[0], ref_grads[0], 2e-2, "gradient of hidden", floor=1e-6)
    assert_close(grads[1], ref_grads[1], 2e-2, "gradient of weight", floor=1e-4)


# ---------------------------------------------------------------------------------------------
# Autograd behaviour, autocast, errors
# ---------------------------------------------------------------------------------------------


def test_only_the_gradients_asked_for(backend):
    device, ctx = backend
    hidden, weight, bias, t = make_inputs(7, 4, 9, device)
    ref, (rh, rw, rb) = reference("bisam_log", hidden, weight, bias, t, "mean", torch.tensor(1.0))
    w = weight.clone().requires_grad_()
    with ctx:
        fused("bisam_log", hidden, w, t, bias, chunk_rows=3).backward()
    assert_close(w.grad, rw, 2e-5, "gradient of weight")
    with ctx, torch.no_grad():
        out = fused("bisam_log", hidden, weight.requires_grad_(), t, bias)
    assert not out.requires_grad
    assert_close(out, ref, 2e-5, "no-grad loss")


def test_higher_order_derivatives_are_refused(backend):
    """The gradients are computed in the forward, with no graph: backward(create_graph=True) raises."""
    device, ctx = backend
    hidden, weight, bias, t = make_inputs(7, 4, 9, device)
    hidden.requires_grad_()
    with ctx, pytest.raises(RuntimeError, match="differentiable once"):
        bk.fused_linear_cross_entropy(hidden, weight, t, bias).backward(create_graph=True)


def test_second_backward_through_the_graph_raises(backend):
    device, ctx = backend
    hidden, weight, bias, t = make_inputs(7, 4, 9, device)
    hidden.requires_grad_()
    with ctx:
        loss = bk.fused_linear_cross_entropy(hidden, weight, t, bias)
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="second backward"):
            loss.backward()


def test_modules_match_functions(backend):
    device, ctx = backend
    hidden, weight, bias, t = make_inputs(7, 4, 9, device)
    with ctx:
        a = bk.FusedLinearBiSAMLoss(phi="tanh", mu=2.0, alpha=0.3, reduction="sum")(hidden, weight, t, bias)
        b = bk.fused_linear_bisam_loss(hidden, weight, t, bias, phi="tanh", mu=2.0, alpha=0.3, reduction="sum")
        c = bk.FusedLinearCrossEntropy(label_smoothing=0.1)(hidden, weight, t)
        d = bk.fused_linear_cross_entropy(hidden, weight, t, label_smoothing=0.1)
    assert torch.equal(a, b) and torch.equal(c, d)
    for module in (bk.FusedLinearBiSAMLoss(accum_dtype=torch.float32), bk.FusedLinearCrossEntropy(accum_dtype=torch.float32)):
        assert module.accum_dtype == torch.float32
    with pytest.raises(ValueError, match="accum_dtype"):
        bk.FusedLinearCrossEntropy(accum_dtype=torch.float16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_like_linear(backend, dtype):
    """Under autocast the float32 inputs are cast to the autocast dtype (as nn.Linear); the loss is float32 and
    the gradients reach the float32 leaves."""
    device, ctx = backend
    hidden, weight, bias, t = make_inputs(9, 8, 12, device)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    with ctx, torch.autocast(device, dtype=dtype):
        loss = bk.fused_linear_cross_entropy(*leaves[:2], t, leaves[2])
    loss.backward()
    assert loss.dtype == torch.float32
    ref, ref_grads = reference("ce", *(x.to(dtype) for x in (hidden, weight, bias)), t, "mean", torch.tensor(1.0))
    assert_close(loss, ref, 1e-2, "loss")  # (the logits are rounded to the autocast dtype)
    for leaf, r in zip(leaves, ref_grads):
        assert leaf.grad.dtype == torch.float32
        eps = torch.finfo(dtype).eps  # (the gradients are rounded to the autocast dtype)
        assert_close(leaf.grad, r, 4 * eps, "gradient", floor=2 * eps)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(weight=torch.randn(5, 3)), ValueError, r"weight must have shape \(V, H\).*not the logits"),
    (dict(weight=torch.randn(4, 5)), ValueError, r"weight must have shape \(V, H\).*transposed"),
    (dict(weight=torch.randn(5, 4, dtype=torch.float64)), TypeError, "weight has dtype"),
    (dict(bias=torch.randn(4)), ValueError, "bias must have shape"),
    (dict(targets=torch.zeros(6, dtype=torch.int64)), ValueError, "targets must have shape"),
    (dict(targets=torch.zeros(7)), TypeError, "int64 or int32"),
    (dict(targets=torch.full((7,), 5)), ValueError, r"targets must lie in \[0, 5\)"),
    (dict(hidden=torch.randn(7)), ValueError, "hidden must have shape"),
    (dict(hidden=torch.zeros(7, 4, dtype=torch.int64)), TypeError, "hidden must be"),
    (dict(chunk_rows=0), ValueError, "chunk_rows"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(accum_dtype=torch.bfloat16), ValueError, "accum_dtype"),
])
def test_bad_input(kwargs, error, match):
    args = dict(hidden=torch.randn(7, 4), weight=torch.randn(5, 4), targets=torch.zeros(7, dtype=torch.int64))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        bk.fused_linear_cross_entropy(**args)


def test_out_of_range_target_raises_on_the_cpu_compiled_too():
    h, w, t = torch.randn(6, 4), torch.randn(5, 4), torch.tensor([0, 1, 2, 5, 3, 4])
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), pytest.raises(ValueError, match=r"targets must lie in \[0, 5\)"):
        torch.compile(bk.fused_linear_cross_entropy, fullgraph=True)(h, w, t)


def test_bisam_options_are_checked():
    h, w, t = torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="phi"):
        bk.fused_linear_bisam_loss(h, w, t, phi="relu")
    with pytest.raises(ValueError, match="mu"):
        bk.FusedLinearBiSAMLoss(mu=-1.0)


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", [Reduction.MEAN, Reduction.SUM, Reduction.NONE])
def test_opcheck(backend, reduction):
    device, ctx = backend
    hidden, weight, bias, t = make_inputs(9, 4, 11, device)
    hidden.requires_grad_()
    weight.requires_grad_()
    with ctx:
        for phi, smoothing in ((Phi.LOG, 0.0), (Phi.IDENTITY, 0.1)):
            args = (hidden, weight, bias, t, int(phi), 1.5, 0.2, smoothing, IGNORE, int(reduction), True, True, False, 4,
                    False)
            torch.library.opcheck(torch.ops.bisam.fused_linear_loss, args)
        halves = [x.detach().bfloat16().requires_grad_() for x in (hidden, weight)]
        torch.library.opcheck(torch.ops.bisam.fused_linear_loss,  # the float32 accumulation of a bfloat16 weight
                              (*halves, None, t, int(Phi.LOG), 1.0, 0.1, 0.0, IGNORE, int(reduction), True, True,
                               False, 4, True))
        stats = torch.ops.bisam.fused_linear_loss(hidden, weight, bias, t, int(Phi.TANH), 2.0, 0.3, 0.0, IGNORE,
                                                  int(Reduction.NONE), True, True, True, 4, False)[4]
        torch.library.opcheck(torch.ops.bisam.fused_linear_loss_row_grad,
                              (hidden.detach(), weight.detach(), bias, t, torch.randn(9, device=device), stats,
                               int(Phi.TANH), 2.0, 0.3, 0.0, IGNORE, True, True, True, 4, False))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_compile_fullgraph(backend, reduction):
    device, ctx = backend
    hidden, weight, bias, t = make_inputs(10, 6, 13, device)
    go = torch.rand(t.shape, dtype=torch.float64) + 0.5 if reduction == "none" else torch.tensor(1.0)
    w_go = go.float().to(device)

    def f(h, w, b, targets, scale):
        a = bk.fused_linear_bisam_loss(h, w, targets, b, **LOSSES["bisam_log"][0], reduction=reduction, chunk_rows=4)
        c = bk.fused_linear_cross_entropy(h, w, targets, b, label_smoothing=0.1, reduction=reduction, chunk_rows=4)
        return (a * scale).sum(), (c * scale).sum()

    torch._dynamo.reset()
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    with ctx, torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        a, c = torch.compile(f, fullgraph=True)(*leaves, t, w_go)
        (a + c).backward()
    ref_a, grads_a = reference("bisam_log", hidden, weight, bias, t, reduction, go)
    ref_c, grads_c = reference(lambda z, tt, red: F.cross_entropy(z, tt, reduction=red, label_smoothing=0.1),
                               hidden, weight, bias, t, reduction, go)
    assert_close(a, (ref_a * go).sum(), 2e-5, "bisam loss")
    assert_close(c, (ref_c * go).sum(), 2e-5, "cross-entropy")
    for leaf, ra, rc in zip(leaves, grads_a, grads_c):
        assert_close(leaf.grad, ra + rc, 2e-5, "gradient")


def test_torch_compile_dynamic_one_graph(backend):
    """Dynamic N and mu trace in one graph: the chunking is chosen inside the operator, not guarded on."""
    device, ctx = backend
    graphs = []
    f = compile_counting_graphs(lambda h, w, t, mu: bk.fused_linear_bisam_loss(h, w, t, mu=mu), graphs)
    for N in (5, 9, 13):
        hidden, weight, _, t = make_inputs(N, 4, 9, device, bias=False)
        leaf = hidden.clone().requires_grad_()
        with ctx:
            loss = f(leaf, weight, t, 2.0)
            loss.backward()
        ref, (ref_grad, _, _) = reference(lambda z, tt, red: bisam_loss_fp64(z, tt, "log", 2.0, 0.1, red), hidden,
                                          weight, None, t, "mean", torch.tensor(1.0))
        assert_close(loss, ref, 2e-5, "loss")
        assert_close(leaf.grad, ref_grad, 2e-5, "gradient of hidden")
    assert len(graphs) == 1


# ---------------------------------------------------------------------------------------------
# Memory: the logits are never materialised
# ---------------------------------------------------------------------------------------------


def test_chunk_rows_keep_the_working_set_within_the_budget():
    budget, working_set = fused_linear.CHUNK_BYTES, fused_linear.WORKING_SET
    rows = fused_linear.default_chunk_rows(8192, 32000, torch.float32, torch.device("cpu"))
    assert rows * 32000 * 4 * working_set["composite"] <= budget
    rows = fused_linear.default_chunk_rows(16384, 128256, torch.bfloat16, torch.device("cuda"))
    assert rows * 128256 * 2 * working_set["triton"] <= budget and 16384 // rows == 16  # the Triton path's
    assert 16384 % rows == 0  # balanced: no sliver
    rows = fused_linear.default_chunk_rows(16384, 128256, torch.float64, torch.device("cuda"))
    assert rows * 128256 * 8 * working_set["composite"] <= budget  # float64 on CUDA: the composite path
    assert fused_linear.default_chunk_rows(10, 5, torch.float32, torch.device("cpu")) == 10


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_no_host_sync(dtype, reduction):
    hidden, weight, bias, t = make_inputs(300, 64, 9000, "cuda", dtype=dtype)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = bk.fused_linear_bisam_loss(*leaves[:2], t, leaves[2], reduction=reduction, chunk_rows=128)
        (loss.sum() * 3.0).backward()
        loss = bk.fused_linear_cross_entropy(*leaves[:2], t, leaves[2], reduction=reduction, label_smoothing=0.1)
        loss.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(x.grad).all() for x in leaves)
