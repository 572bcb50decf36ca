"""Multi-tensor SAM perturbation ops against the float64 reference of the canonical SAM semantics."""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import requires_cuda

import bisam_kernels as bk
from bisam_kernels import references as ref

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def random_sizes(count: int, max_numel: int) -> list[int]:
    """Odd sizes, with empty tensors and sizes straddling the 16384-element chunks and 16-byte vectors."""
    sizes = torch.randint(1, max_numel, (count,)).tolist()
    specials = [0, 1, 3, 7, 16383, 16385, 40_001]
    for i, s in enumerate(specials[: count // 3]):
        sizes[(i * 7) % count] = s
    return sizes


def make_lists(sizes, dtype, device, weight_scale=0.02):
    """Params of small magnitude so the perturbation dominates their rounding (its error is visible)."""
    params = [(torch.randn(n, dtype=torch.float64) * weight_scale).to(dtype).to(device) for n in sizes]
    grads = [torch.randn(n, dtype=torch.float64).to(dtype).to(device) for n in sizes]
    backups = [torch.full_like(p, float("nan")) for p in params]  # poisoned: unwritten elements fail
    return params, grads, backups


def flat64(tensors):
    return torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors]) if tensors else torch.zeros(0)


def perturbation_error(new_params, old_params, expected):
    """2-norm error of the new weights relative to the size of the perturbation e = w_new - w_old,
    net of the rounding that storing the exact result in the params' dtype cannot avoid (twice it)."""
    got, want = flat64(new_params), flat64(expected)
    dtype = new_params[0].dtype if new_params else torch.float64
    unavoidable = (want.to(dtype).double() - want).norm()
    excess = ((got - want).norm() - 2 * unavoidable).clamp_min(0)
    return (excess / (want - flat64(old_params)).norm().clamp_min(1e-300)).item()


def absolute_error(tensors, expected):
    return (flat64(tensors) - flat64(expected)).abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("count,max_numel", [(1, 5000), (37, 3000), (5000, 40)])
def test_perturb_matches_float64_reference(device, dtype, adaptive, count, max_numel):
    sizes = random_sizes(count, max_numel)
    params, grads, backups = make_lists(sizes, dtype, device)
    old = [p.clone() for p in params]
    rho = 5.0 if adaptive else 0.05  # ASAM steps are relative to |w|: a large rho keeps them visible
    expected, expected_norm = ref.sam_perturb_fp64(old, grads, rho, adaptive)

    norm = bk.ops.sam_perturb_(params, grads, backups, rho, adaptive=adaptive)

    assert norm.shape == () and norm.device.type == device
    assert norm.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert all(torch.equal(b, o) for b, o in zip(backups, old)), "backups must hold the old weights exactly"
    norm_err = abs(norm.item() - expected_norm.item()) / expected_norm.item()
    if dtype == torch.float64:
        assert norm_err < 1e-12
        assert perturbation_error(params, old, expected) < 1e-12
    elif dtype == torch.float32:
        assert norm_err < 1e-5
        assert perturbation_error(params, old, expected) < 1e-5
    else:
        # flash-attention rule: at most 2x PyTorch's own same-dtype error (the canonical loop), plus a floor.
        torch_params = [o.clone() for o in old]
        ref.sam_first_step_loop(torch_params, grads, rho, adaptive)
        floor = 1e-3 * flat64(expected).abs().max().item()
        assert absolute_error(params, expected) <= 2 * absolute_error(torch_params, expected) + floor
        assert norm_err < 1e-5  # the norm accumulates in float32 whatever the storage dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_grad_sq_norm_matches_reference(device, dtype, adaptive):
    sizes = random_sizes(53, 20_000)
    params, grads, _ = make_lists(sizes, dtype, device, weight_scale=1.0)
    got = bk.ops.grad_sq_norm(grads, params if adaptive else None, adaptive=adaptive)
    _, norm = ref.sam_perturb_fp64(params, grads, 0.05, adaptive)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert got.shape == () and got.device.type == device
    assert abs(got.item() - norm.item() ** 2) / norm.item() ** 2 < tol


@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_is_bit_exact_and_deterministic(device, dtype):
    sizes = random_sizes(41, 30_000)
    params, grads, backups = make_lists(sizes, dtype, device, weight_scale=1.0)
    old = [p.clone() for p in params]
    norm1 = bk.ops.sam_perturb_(params, grads, backups, 0.1)
    first = [p.clone() for p in params]
    bk.ops.sam_restore_(params, backups)
    assert all(torch.equal(p, o) for p, o in zip(params, old))
    assert any(not torch.equal(f, o) for f, o in zip(first, old) if f.numel())

    norm2 = bk.ops.sam_perturb_(params, grads, backups, 0.1)
    assert torch.equal(norm1, norm2), "same inputs must give the same bits"
    assert all(torch.equal(p, f) for p, f in zip(params, first))
    sq1 = bk.ops.grad_sq_norm(grads)
    sq2 = bk.ops.grad_sq_norm(grads)
    assert torch.equal(sq1, sq2)


CPU_PATHS_SCRIPT = r"""
import sys, torch, bisam_kernels as bk
torch.manual_seed(0)
def misaligned(t):  # the same values 2 or 4 bytes past a 16-byte boundary
    base = torch.empty(t.numel() + 1, dtype=t.dtype)
    base[1:] = t
    return base[1:]
out = {}
for dtype in (torch.float32, torch.bfloat16):
    for adaptive in (False, True):
        sizes = [0, 1, 7, 31, 33, 255, 513, 16383, 16385, 40001]
        params = [misaligned(torch.randn(n).to(dtype)) if i % 2 else torch.randn(n).to(dtype)
                  for i, n in enumerate(sizes)]
        grads = [torch.randn(n).to(dtype) for n in sizes]
        backups = [misaligned(torch.full((n,), float("nan")).to(dtype)) if i % 3 else torch.empty(n, dtype=dtype)
                   for i, n in enumerate(sizes)]
        old = [p.clone() for p in params]
        key = f"{dtype}-{adaptive}"
        out[key + "-norm"] = bk.ops.sam_perturb_(params, grads, backups, 0.05, adaptive=adaptive)
        out[key + "-sq"] = bk.ops.grad_sq_norm(grads, params, adaptive=adaptive)
        out[key + "-perturbed"] = [p.clone() for p in params]
        assert all(torch.equal(b, o) for b, o in zip(backups, old)), "backups must hold the old weights"
        bk.ops.sam_restore_(params, backups)
        assert all(torch.equal(p, o) for p, o in zip(params, old)), "restore must be bit-exact"
        grads[-1][5] = float("inf")  # a skipped step: the backup copy alone
        for b in backups:
            b.fill_(float("nan"))
        bk.ops.sam_perturb_(params, grads, backups, 0.05, adaptive=adaptive)
        assert all(torch.equal(p, o) for p, o in zip(params, old)), "a skipped step leaves the weights"
        assert all(torch.equal(b, o) for b, o in zip(backups, old)), "a skipped step still writes backups"
torch.save(out, sys.argv[1])
"""


def test_cpu_streaming_stores_and_avx2_give_the_same_bits(tmp_path):
    """The CPU kernels have a streaming-store path (lists past a quarter of the last-level cache) and an
    AVX2 build of their loops. Forced on and off through their environment switches, every combination
    must give the same bits (norms, perturbed weights) and exact backups / restores / skipped steps,
    on unaligned heads and odd tails."""
    script = tmp_path / "paths.py"
    script.write_text(CPU_PATHS_SCRIPT)
    results = {}
    for streaming in ("0", str(1 << 62)):
        for capability in ("default", "avx2"):
            env = dict(os.environ, BISAM_CPU_STREAMING_BYTES=streaming, BISAM_CPU_CAPABILITY=capability)
            path = tmp_path / f"{streaming}-{capability}.pt"
            proc = subprocess.run([sys.executable, str(script), str(path)], env=env, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr[-3000:]
            results[(streaming, capability)] = torch.load(path)
    first, *others = results.values()
    for other in others:
        assert first.keys() == other.keys()
        for key in first:
            a, b = first[key], other[key]
            pairs = zip(a, b) if isinstance(a, list) else [(a, b)]
            assert all(torch.equal(x, y) for x, y in pairs), key


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_norm_skips_the_step(device, bad):
    params, grads, backups = make_lists([100, 17], torch.float16, device)
    grads[1][3] = bad
    old = [p.clone() for p in params]
    norm = bk.ops.sam_perturb_(params, grads, backups, 0.05)
    assert not math.isfinite(norm.item())
    assert all(torch.equal(p, o) for p, o in zip(params, old)), "weights must be untouched"
    assert all(torch.equal(b, o) for b, o in zip(backups, old)), "backups are still written"


def test_fp16_large_grads_accumulate_in_float32(device):
    params, grads, backups = make_lists([64], torch.float16, device)
    grads[0].fill_(60000.0)  # squares overflow fp16 (max 65504) but not the float32 accumulator
    norm = bk.ops.sam_perturb_(params, grads, backups, 0.05)
    assert math.isfinite(norm.item()) and abs(norm.item() - 60000.0 * 8) / (60000.0 * 8) < 1e-5


@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_gradient_leaves_weights_and_no_nan(device, adaptive):
    params, grads, backups = make_lists([33, 0, 5], torch.float32, device)
    for g in grads:
        g.zero_()
    old = [p.clone() for p in params]
    norm = bk.ops.sam_perturb_(params, grads, backups, 0.05, adaptive=adaptive, eps=0.0)
    assert norm.item() == 0.0
    assert all(torch.equal(p, o) for p, o in zip(params, old))


def test_empty_tensors_and_lists(device):
    params, grads, backups = make_lists([0, 0], torch.float32, device)
    assert bk.ops.sam_perturb_(params, grads, backups, 0.05).item() == 0.0
    assert bk.ops.grad_sq_norm(grads).item() == 0.0
    bk.ops.sam_restore_(params, backups)
    assert bk.ops.grad_sq_norm([]).item() == 0.0
    assert bk.ops.sam_perturb_([], [], [], 0.05).item() == 0.0
    bk.ops.sam_restore_([], [])


def test_rho_as_device_tensor_and_given_sq_norm(device):
    params, grads, backups = make_lists([300, 11], torch.float32, device)
    old = [p.clone() for p in params]
    expected, norm = ref.sam_perturb_fp64(old, grads, 0.07)
    got_norm = bk.ops.sam_perturb_(params, grads, backups, torch.tensor(0.07, device=device))
    assert abs(got_norm.item() - norm.item()) / norm.item() < 1e-6
    assert perturbation_error(params, old, expected) < 1e-5

    # sq_norm given (e.g. all-reduced over shards): the norm is sqrt(sq_norm), no reduction of its own.
    bk.ops.sam_restore_(params, backups)
    sq = torch.tensor(4.0 * norm.item() ** 2, device=device)
    got_norm = bk.ops.sam_perturb_(params, grads, backups, 0.07, sq_norm=sq)
    expected_half, _ = ref.sam_perturb_fp64(old, grads, 0.035)  # twice the norm: half the step
    assert abs(got_norm.item() - 2 * norm.item()) / norm.item() < 1e-6
    assert perturbation_error(params, old, expected_half) < 1e-5


@pytest.mark.parametrize("rho", [-1.0, float("nan"), float("inf")])
def test_invalid_rho_tensor_skips_on_device(device, rho):
    params, grads, backups = make_lists([50], torch.float32, device)
    old = [p.clone() for p in params]
    norm = bk.ops.sam_perturb_(params, grads, backups, torch.tensor(rho, device=device))
    assert math.isnan(norm.item())
    assert torch.equal(params[0], old[0])


def test_mixed_dtypes_share_one_global_norm(device):
    params32, grads32, backups32 = make_lists([100, 7], torch.float32, device)
    params64, grads64, backups64 = make_lists([40], torch.float64, device)
    params, grads, backups = params32 + params64, grads32 + grads64, backups32 + backups64
    old = [p.clone() for p in params]
    expected, norm = ref.sam_perturb_fp64(old, grads, 0.05)
    got = bk.ops.sam_perturb_(params, grads, backups, 0.05)
    assert abs(got.item() - norm.item()) / norm.item() < 1e-5
    assert perturbation_error(params, old, expected) < 1e-5
    sq = bk.ops.grad_sq_norm(grads)
    assert abs(sq.item() - norm.item() ** 2) / norm.item() ** 2 < 1e-5


def test_layouts_non_contiguous_grads_and_channels_last(device):
    w = (torch.randn(8, 3, 5, 5, dtype=torch.float64) * 0.02).float().to(device)
    w = w.contiguous(memory_format=torch.channels_last)
    g = torch.randn(8, 3, 5, 5, device=device).contiguous(memory_format=torch.channels_last)
    w2 = (torch.randn(6, 9, dtype=torch.float64) * 0.02).float().to(device)
    g2 = torch.randn(9, 6, device=device).t()  # a transposed (non-contiguous) gradient
    params, grads = [w, w2], [g, g2]
    backups = [torch.empty_like(p) for p in params]
    old = [p.clone() for p in params]
    expected, _ = ref.sam_perturb_fp64(old, grads, 0.05, adaptive=True)
    bk.ops.sam_perturb_(params, grads, backups, 0.05, adaptive=True)
    assert perturbation_error(params, old, expected) < 1e-5
    assert w.is_contiguous(memory_format=torch.channels_last)


def test_opcheck_every_op(device):
    params, grads, backups = make_lists([19, 0, 300], torch.float32, device)
    rho_t = torch.tensor(0.05, device=device)
    sq = torch.tensor(3.0, device=device)
    torch.library.opcheck(torch.ops.bisam.grad_sq_norm.default, (grads, [], False))
    torch.library.opcheck(torch.ops.bisam.grad_sq_norm.default, (grads, params, True))
    torch.library.opcheck(
        torch.ops.bisam.sam_perturb_.default, (params, grads, backups, 0.05, None, False, 1e-12, None)
    )
    torch.library.opcheck(
        torch.ops.bisam.sam_perturb_.default, (params, grads, backups, 0.0, rho_t, True, 1e-12, sq)
    )
    torch.library.opcheck(torch.ops.bisam.sam_restore_.default, (params, backups))


def test_torch_compile_traces_the_ops(device):
    params, grads, backups = make_lists([64, 5], torch.float32, device)
    old = [p.clone() for p in params]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(ps, gs, bs):
        sq = bk.ops.grad_sq_norm(gs)
        n = bk.ops.sam_perturb_(ps, gs, bs, 0.05, sq_norm=sq)
        return n * 2

    expected, norm = ref.sam_perturb_fp64(old, grads, 0.05)
    out = step(params, grads, backups)
    assert abs(out.item() - 2 * norm.item()) / norm.item() < 1e-5
    assert perturbation_error(params, old, expected) < 1e-5


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_perturbation_gradcheck(adaptive):
    w = torch.randn(13, dtype=torch.float64, requires_grad=True)
    g = torch.randn(13, dtype=torch.float64, requires_grad=True)
    rho = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, r: bk.ops.sam_perturbation(a, b, r, adaptive=adaptive), (w, g, rho))
    e = bk.ops.sam_perturbation(w, g, 0.3, adaptive=adaptive)
    expected, _ = ref.sam_perturb_fp64([w], [g], 0.3, adaptive)
    torch.testing.assert_close(e, expected[0] - w.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_perturbation_second_derivatives(adaptive):
    """Differentiable to second order (the normalisation's Jacobian included): gradgradcheck."""
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: bk.ops.sam_perturbation(a, b, 0.3, adaptive=adaptive), (w, g))


def test_sam_perturbation_zero_gradient_is_zero():
    e = bk.ops.sam_perturbation(torch.randn(5), torch.zeros(5), 0.05)
    assert torch.equal(e, torch.zeros(5))
    g = torch.zeros(5, requires_grad=True)
    bk.ops.sam_perturbation(torch.randn(5), g, 0.05).sum().backward()
    assert torch.isfinite(g.grad).all()


@pytest.mark.parametrize("rho", [-0.05, float("inf")])
def test_sam_perturbation_invalid_rho_tensor_gives_nan(rho):
    e = bk.ops.sam_perturbation(torch.randn(5), torch.randn(5), torch.tensor(rho))
    assert torch.isnan(e).all()


def test_in_place_ops_bump_the_autograd_version():
    """A graph that saved a weight raises at backward once the ops changed it, as after any in-place op;
    with grad mode on, the ops refuse params that require grad."""
    w = torch.randn(5, requires_grad=True)
    loss = (w * w).sum()  # saves w
    with torch.no_grad():
        bk.ops.sam_perturb_([w], [torch.randn(5)], [torch.empty(5)], 0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    backup = torch.empty(5)
    with torch.no_grad():
        bk.ops.sam_perturb_([w], [torch.randn(5)], [backup], 0.5)
    loss = (w * w).sum()
    with torch.no_grad():
        bk.ops.sam_restore_([w], [backup])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        bk.ops.sam_perturb_([w], [torch.randn(5)], [torch.empty(5)], 0.5)
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        bk.ops.sam_restore_([w], [backup])


def test_a_pass_two_graph_backpropagated_after_restore_raises():
    """BiSAM: a loss built at w + e whose backward runs after restore() would give the gradient at w."""
    w = torch.randn(5, requires_grad=True)
    opt = bk.BiSAM([w], torch.optim.SGD, rho=0.5, lr=0.1)
    (w * w).sum().backward()
    opt.first_step(zero_grad=True)
    loss = (w * w).sum()
    opt.restore()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---- bad input: clear errors that name the argument ----


def test_bad_list_lengths():
    params, grads, backups = make_lists([3, 4], torch.float32, "cpu")
    with pytest.raises(ValueError, match="grads has 1 tensors"):
        bk.ops.sam_perturb_(params, grads[:1], backups, 0.05)
    with pytest.raises(ValueError, match="backups has 1 tensors"):
        bk.ops.sam_restore_(params, backups[:1])
    with pytest.raises(ValueError, match="params has 1 tensors"):
        bk.ops.grad_sq_norm(grads, params[:1], adaptive=True)


def test_bad_shapes_and_dtypes():
    params, grads, backups = make_lists([3, 4], torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"grads\[1\] has shape"):
        bk.ops.sam_perturb_(params, [grads[0], torch.zeros(5)], backups, 0.05)
    with pytest.raises(TypeError, match=r"grads\[1\] has dtype"):
        bk.ops.sam_perturb_(params, [grads[0], grads[1].double()], backups, 0.05)
    mixed = [params[0], params[1].double()]  # several dtype groups: checked in Python, global index
    with pytest.raises(TypeError, match=r"backups\[1\] has dtype"):
        bk.ops.sam_perturb_(mixed, [grads[0], grads[1].double()], backups, 0.05)
    with pytest.raises(TypeError, match="unsupported dtype"):
        bk.ops.grad_sq_norm([torch.ones(3, dtype=torch.int32)])
    with pytest.raises(TypeError, match=r"grads\[1\] must be a tensor"):
        bk.ops.grad_sq_norm([grads[0], 3.0])
    with pytest.raises(ValueError, match=r"params\[0\] must be dense"):
        w = torch.randn(4, 6)[:, ::2]
        bk.ops.sam_perturb_([w], [torch.randn(4, 3)], [torch.empty(4, 3)], 0.05)


def test_a_meta_tensor_among_real_ones_is_refused():
    """A meta argument sends the whole call to the fake kernel, which would check and write nothing."""
    params, grads, backups = make_lists([3, 4], torch.float32, "cpu")
    before = [p.clone() for p in params]
    on_meta = torch.empty(4, device="meta")
    with pytest.raises(ValueError, match="one of them meta"):
        bk.ops.sam_perturb_(params, grads, backups, torch.tensor(0.1, device="meta"))
    with pytest.raises(ValueError, match="one of them meta"):
        bk.ops.sam_perturb_(params, [grads[0], on_meta], backups, 0.1)
    with pytest.raises(ValueError, match="one of them meta"):
        bk.ops.grad_sq_norm([grads[0], on_meta])
    with pytest.raises(ValueError, match="one of them meta"):
        bk.ops.sam_restore_(params, [backups[0], on_meta])
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    meta = [t.to("meta") for t in params]  # wholly on meta: a shape computation, as for any op
    assert bk.ops.grad_sq_norm(meta).device.type == "meta"


@pytest.mark.parametrize("adaptive", [False, True])
def test_gradients_with_gaps_or_overlaps_are_read(device, adaptive):
    """Gradients are only read: a view with gaps (a strided slice) or overlaps (expanded) is taken as its
    values, by grad_sq_norm as by sam_perturb_."""
    grads = [torch.randn(4, 12, device=device)[:, ::2], torch.randn(3, device=device).expand(4, 3)]
    params = [torch.randn(4, 6, device=device), torch.randn(4, 3, device=device)]
    expected = sum(((g.double() * (p.double().abs() if adaptive else 1)) ** 2).sum() for g, p in zip(grads, params))
    got = bk.ops.grad_sq_norm(grads, params, adaptive=adaptive)
    assert abs(got.item() - expected.item()) <= 1e-5 * expected.item()


def test_aliasing_arguments_are_rejected():
    params, grads, backups = make_lists([30, 20], torch.float32, "cpu")
    with pytest.raises(ValueError, match="shares memory"):  # a parameter listed twice
        bk.ops.sam_perturb_([params[0], params[0]], [grads[0], grads[0]], [backups[0], torch.empty(30)], 0.05)
    with pytest.raises(ValueError, match="shares memory"):
        bk.ops.sam_perturb_(params, grads, [params[0], backups[1]], 0.05)  # backup is the param
    with pytest.raises(ValueError, match="shares memory"):
        bk.ops.sam_perturb_(params, [backups[0], grads[1]], backups, 0.05)  # grad is a backup
    with pytest.raises(ValueError, match="shares memory"):
        bk.ops.sam_perturb_(params, grads, backups, 0.05, sq_norm=params[1][3])  # sq_norm inside a param
    with pytest.raises(ValueError, match="shares memory"):
        half = torch.empty(40)
        bk.ops.sam_restore_([half[:20], half[10:30]], [backups[0][:20], backups[1]])
    # Reading the same gradient twice is fine: only tensors written in place must not alias.
    bk.ops.sam_perturb_(params, [grads[0], grads[0][:20]], backups, 0.05)


def test_size_one_dims_do_not_count_as_layout():
    w = (torch.randn(5, 1, dtype=torch.float64) * 0.02).float().t()  # shape (1, 5), strides (1, 1)
    g = torch.randn(1, 5)  # strides (5, 1): the same memory order
    b = torch.empty(1, 5)
    old = w.clone()
    expected, _ = ref.sam_perturb_fp64([old], [g], 0.05)
    bk.ops.sam_perturb_([w], [g], [b], 0.05)
    assert perturbation_error([w], [old], expected) < 1e-5 and torch.equal(b, old)


def test_raw_op_rejects_params_without_adaptive():
    with pytest.raises(ValueError, match="params are only read when adaptive=True"):
        torch.ops.bisam.grad_sq_norm([torch.ones(3)], [torch.ones(3)], False)


@pytest.mark.parametrize("rho", [-0.1, float("nan"), float("inf"), 1e39])
def test_bad_rho(rho):
    params, grads, backups = make_lists([3], torch.float32, "cpu")
    with pytest.raises(ValueError, match="rho"):
        bk.ops.sam_perturb_(params, grads, backups, rho)
    with pytest.raises(ValueError, match="rho"):
        torch.ops.bisam.sam_perturb_(params, grads, backups, rho, None, False, 1e-12, None)


def test_bad_scalars():
    params, grads, backups = make_lists([3], torch.float32, "cpu")
    with pytest.raises(TypeError, match="rho"):
        bk.ops.sam_perturb_(params, grads, backups, "0.05")
    with pytest.raises(ValueError, match="rho"):
        bk.ops.sam_perturb_(params, grads, backups, torch.ones(2))
    with pytest.raises(ValueError, match="eps"):
        bk.ops.sam_perturb_(params, grads, backups, 0.05, eps=-1.0)
    with pytest.raises(ValueError, match="sq_norm"):
        bk.ops.sam_perturb_(params, grads, backups, 0.05, sq_norm=torch.ones(3))


@requires_cuda
def test_mixed_devices():
    params, grads, backups = make_lists([3, 4], torch.float32, "cuda")
    with pytest.raises(ValueError, match=r"grads\[1\] is on cpu"):
        bk.ops.sam_perturb_(params, [grads[0], grads[1].cpu()], backups, 0.05)
    with pytest.raises(ValueError, match="rho is on cpu"):
        bk.ops.sam_perturb_(params, grads, backups, torch.tensor(0.05))
    cpu_params, cpu_grads, cpu_backups = make_lists([3], torch.float32, "cpu")
    with pytest.raises(ValueError, match="rho is on cuda"):  # a CUDA scalar routes the call to CUDA
        bk.ops.sam_perturb_(cpu_params, cpu_grads, cpu_backups, torch.tensor(0.05, device="cuda"))
    with pytest.raises(ValueError, match="sq_norm is on cuda"):
        bk.ops.sam_perturb_(cpu_params, cpu_grads, cpu_backups, 0.05, sq_norm=torch.ones((), device="cuda"))


# ---- CUDA-only: no host synchronisation, many launches, int64 indexing ----


@requires_cuda
@pytest.mark.parametrize("adaptive", [False, True])
def test_cuda_no_host_sync(adaptive):
    params, grads, backups = make_lists(random_sizes(300, 5000), torch.bfloat16, "cuda")
    rho = torch.tensor(0.05, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sq = bk.ops.grad_sq_norm(grads, params, adaptive=adaptive)
        bk.ops.sam_perturb_(params, grads, backups, rho, adaptive=adaptive)
        bk.ops.sam_perturb_(params, grads, backups, 0.05, adaptive=adaptive, sq_norm=sq)
        bk.ops.sam_restore_(params, backups)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires_cuda
def test_cuda_launch_count_is_constant_in_tensor_count():
    def launches(count):
        params, grads, backups = make_lists([1000] * count, torch.float32, "cuda")
        bk.ops.sam_perturb_(params, grads, backups, 0.05)  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            bk.ops.sam_perturb_(params, grads, backups, 0.05)
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)

    few, many = launches(10), launches(100)
    assert few == many == 3  # partial sums, final sum, apply


@requires_cuda
def test_cuda_tensor_over_2_31_elements():
    n = 2**31 + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 4 * n * 2 + (1 << 30):
        pytest.skip("needs about 18 GB of free GPU memory")
    w = torch.zeros(n, dtype=torch.float16, device="cuda")
    g = torch.zeros(n, dtype=torch.float16, device="cuda")
    w[-5:] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float16, device="cuda")
    g[-1] = 1.0
    g[0] = 1.0
    b = torch.empty_like(w)
    norm = bk.ops.sam_perturb_([w], [g], [b], 1.0, eps=0.0)
    assert abs(norm.item() - math.sqrt(2)) < 1e-6
    step = 1.0 / math.sqrt(2)
    assert abs(w[-1].item() - (5.0 + step)) < 1e-2 and abs(w[0].item() - step) < 1e-3
    assert b[-1].item() == 5.0
    bk.ops.sam_restore_([w], [b])
    assert w[-1].item() == 5.0 and w[0].item() == 0.0


# ---- the build: the CUDA kernels really compiled, for sm_90 ----


@pytest.mark.cuda  # the GPU machine's own build too
@pytest.mark.skipif(os.environ.get("BISAM_REQUIRE_CUDA") != "1", reason="CUDA build not required here")
def test_cuda_build_is_present_with_sm90_code():
    assert bk.built_with_cuda(), "nvcc is present but the CUDA kernels were not compiled"
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        cuobjdump = shutil.which("cuobjdump")
    assert cuobjdump, "no cuobjdump to inspect the library"
    out = subprocess.run([cuobjdump, "--list-elf", bk._extension._C.__file__], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")
    if "9.0" in arch_list:
        assert "sm_90" in out.stdout, out.stdout
    sass = subprocess.run([cuobjdump, "--dump-sass", bk._extension._C.__file__], capture_output=True, text=True)
    for kernel in ("SqNormPartials", "sum_partials_kernel", "Perturb", "Restore"):  # the ops' functors
        assert kernel in sass.stdout, kernel
    assert "LDG.E.128" in sass.stdout, "the kernels should use 16-byte vector loads"
