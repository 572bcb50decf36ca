"""The CUDA C++ kernels (csrc/cuda), executed on the CPU by the emulation of docs/design.md section 9:
the same source compiled by the host compiler, each block's threads run as fibers that meet at
barriers and shuffles, blocks and threads in shuffled orders. Checked against the float64 references
and the CPU kernels, under both kernel-argument budgets (4 KiB and 32 KiB)."""

import math
import platform
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension
from test_sam_perturb import DTYPES, flat64, make_lists, perturbation_error, random_sizes

import bisam_kernels as bk
from bisam_kernels import references as ref

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.models import resnet56_param_shapes, vit_b16_param_shapes  # noqa: E402

pytestmark = [
    pytest.mark.cuda_emulated,
    pytest.mark.skipif(platform.machine() != "x86_64", reason="the emulation's fibers switch with x86-64 code"),
]

SOURCES = [
    "multi_tensor_checks.cpp",
    "cuda/sam_perturb_cuda.cpp",
    "emulated/cuda_emulation.cpp",
    "emulated/multi_tensor_kernels_emulated.cpp",
    "emulated/emulated_ops.cpp",
]
CLASSIC, LARGE = False, True  # the large_kernel_args argument of every emulated op
BUDGETS = [pytest.param(CLASSIC, id="args4k"), pytest.param(LARGE, id="args32k")]
# Tensors per launch: the lists' addresses in (budget - 128) bytes, 8 per list plus 12 per tensor.
MAX_TENSORS = {(2, CLASSIC): 141, (3, CLASSIC): 110, (2, LARGE): 1165, (3, LARGE): 906}
CHUNK = 16384


@pytest.fixture(scope="session")
def emu():
    """torch.ops.bisam_cuda_emulated, built once into build/cuda_emulated (ninja rebuilds what changed)."""
    build = REPO / "build" / "cuda_emulated"
    build.mkdir(parents=True, exist_ok=True)
    torch.utils.cpp_extension.load(
        name="bisam_cuda_emulated",
        sources=[str(REPO / "csrc" / s) for s in SOURCES],
        extra_cflags=["-O2", "-DBISAM_CUDA_EMULATION"],
        extra_include_paths=[str(REPO / "csrc")],
        build_directory=str(build),
        with_cuda=False,
        is_python_module=False,
    )
    return torch.ops.bisam_cuda_emulated


def perturb(emu, params, grads, backups, rho, large, adaptive=False, eps=1e-12, rho_tensor=None, sq_norm=None):
    return emu.sam_perturb_(params, grads, backups, rho, rho_tensor, adaptive, eps, sq_norm, large)


def launches(emu, fn):
    before = emu.launch_count()
    fn()
    return emu.launch_count() - before


def misaligned(t):
    """The same values one element past a 16-byte boundary: the kernels' scalar path."""
    base = torch.empty(t.numel() + 1, dtype=t.dtype)
    base[1:] = t
    return base[1:]


def check_against_reference(params, old, grads, backups, norm, rho, adaptive):
    expected, expected_norm = ref.sam_perturb_fp64(old, grads, rho, adaptive)
    dtype = old[0].dtype
    assert all(torch.equal(b, o) for b, o in zip(backups, old)), "backups must hold the old weights exactly"
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(norm.item() - expected_norm.item()) <= tol * expected_norm.item()
    if dtype in (torch.float32, torch.float64):
        assert perturbation_error(params, old, expected) < tol
    else:  # 16-bit storage: within the rounding of the result plus what the canonical loop makes
        torch_params = [o.clone() for o in old]
        ref.sam_first_step_loop(torch_params, grads, rho, adaptive)
        err = (flat64(params) - flat64(expected)).abs().max().item()
        torch_err = (flat64(torch_params) - flat64(expected)).abs().max().item()
        assert err <= 2 * torch_err + 1e-3 * flat64(expected).abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("count,max_numel,large", [(1, 5000, CLASSIC), (37, 40_000, LARGE), (5000, 40, CLASSIC)])
def test_perturb_matches_reference_and_cpu_kernels(emu, dtype, adaptive, count, max_numel, large):
    params, grads, backups = make_lists(random_sizes(count, max_numel), dtype, "cpu")
    old = [p.clone() for p in params]
    rho = 5.0 if adaptive else 0.05
    norm = perturb(emu, params, grads, backups, rho, large, adaptive)
    assert norm.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    check_against_reference(params, old, grads, backups, norm, rho, adaptive)

    cpu_params, cpu_backups = [o.clone() for o in old], [torch.empty_like(o) for o in old]
    cpu_norm = bk.ops.sam_perturb_(cpu_params, grads, cpu_backups, rho, adaptive=adaptive)
    torch.testing.assert_close(norm, cpu_norm, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=0)
    # The same step up to the last bit of the scale (summed in another order) and of 16-bit rounding.
    torch.testing.assert_close(flat64(params), flat64(cpu_params), rtol=1e-2 if dtype.itemsize == 2 else 1e-5,
                               atol=1e-3 if dtype.itemsize == 2 else 1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("large", BUDGETS)
def test_grad_sq_norm_matches_reference_and_cpu_kernels(emu, dtype, adaptive, large):
    params, grads, _ = make_lists(random_sizes(300, 3000), dtype, "cpu", weight_scale=1.0)
    got = emu.grad_sq_norm(grads, params if adaptive else [], adaptive, large)
    _, norm = ref.sam_perturb_fp64(params, grads, 0.05, adaptive)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert got.shape == () and abs(got.item() - norm.item() ** 2) <= tol * norm.item() ** 2
    cpu = bk.ops.grad_sq_norm(grads, params if adaptive else None, adaptive=adaptive)
    torch.testing.assert_close(got, cpu, rtol=tol, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("large", BUDGETS)
def test_unaligned_views_take_the_scalar_paths(emu, dtype, large):
    sizes = [0, 1, 7, 31, 33, 255, 513, 16383, 16385, 40001]
    params, grads, backups = make_lists(sizes, dtype, "cpu")
    params = [misaligned(p) if i % 2 else p for i, p in enumerate(params)]
    grads = [misaligned(g) if i % 3 == 1 else g for i, g in enumerate(grads)]
    backups = [misaligned(b) if i % 3 == 2 else b for i, b in enumerate(backups)]
    old = [p.clone() for p in params]
    for adaptive in (False, True):
        rho = 5.0 if adaptive else 0.05
        norm = perturb(emu, params, grads, backups, rho, large, adaptive)
        check_against_reference(params, old, grads, backups, norm, rho, adaptive)
        emu.sam_restore_(params, backups, large)
        assert all(torch.equal(p, o) for p, o in zip(params, old)), "restore must be bit-exact"
        sq = emu.grad_sq_norm(grads, params if adaptive else [], adaptive, large)
        assert abs(sq.item() - norm.item() ** 2) <= 1e-5 * norm.item() ** 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("large", BUDGETS)
def test_same_bits_in_any_block_and_thread_order(emu, dtype, large):
    """Every launch runs its blocks and threads in a new random order: the results must not change."""
    params, grads, backups = make_lists(random_sizes(200, 30_000), dtype, "cpu", weight_scale=1.0)
    old = [p.clone() for p in params]
    norm1 = perturb(emu, params, grads, backups, 0.1, large)
    first = [p.clone() for p in params]
    emu.sam_restore_(params, backups, large)
    assert all(torch.equal(p, o) for p, o in zip(params, old))
    norm2 = perturb(emu, params, grads, backups, 0.1, large)
    assert torch.equal(norm1, norm2)
    assert all(torch.equal(p, f) for p, f in zip(params, first))
    assert torch.equal(emu.grad_sq_norm(grads, [], False, large), emu.grad_sq_norm(grads, [], False, large))


@pytest.mark.parametrize("large", BUDGETS)
def test_lists_longer_than_one_launch(emu, large):
    count = MAX_TENSORS[(2, large)] * 2 + 7  # three packs of both depths
    params, grads, backups = make_lists(random_sizes(count, 50), torch.float32, "cpu")
    old = [p.clone() for p in params]
    packs2 = math.ceil(sum(1 for p in params if p.numel()) / MAX_TENSORS[(2, large)])
    packs3 = math.ceil(sum(1 for p in params if p.numel()) / MAX_TENSORS[(3, large)])
    assert packs2 >= 3 and packs3 >= 3
    norm = None

    def step():
        nonlocal norm
        norm = perturb(emu, params, grads, backups, 0.05, large)

    assert launches(emu, step) == packs2 + 1 + packs3  # partial sums, final sum, apply
    check_against_reference(params, old, grads, backups, norm, 0.05, False)
    assert launches(emu, lambda: emu.sam_restore_(params, backups, large)) == packs2
    assert all(torch.equal(p, o) for p, o in zip(params, old))


@pytest.mark.parametrize("model", ["resnet56", "vit_b16"])
def test_large_kernel_args_take_one_launch_per_op(emu, model):
    """The lists of ResNet-56 (167 tensors) and ViT-B/16 (152) fit one 32 KiB pack but not one of 4 KiB."""
    shapes = resnet56_param_shapes() if model == "resnet56" else vit_b16_param_shapes()
    numels = [math.prod(s) for s in shapes]
    for depth in (2, 3):
        assert emu.chunk_map(numels, depth, LARGE)[:, 0].max().item() == 0
        assert emu.chunk_map(numels, depth, CLASSIC)[:, 0].max().item() == 1


@pytest.mark.parametrize("large", BUDGETS)
@pytest.mark.parametrize("depth", [2, 3])
def test_chunk_index_arithmetic_past_2_31_elements(emu, depth, large):
    """Host-side only (the data would not fit): the harness's packing and each block's chunk, for a
    tensor past 2^31 elements and lists past 2^31 blocks (split into launches of at most INT_MAX)."""
    big = 2**31 + 4099
    rows = emu.chunk_map([5, big, 0, 3], depth, large).tolist()
    last = math.ceil(big / CHUNK)
    assert rows == [
        [0, 0, 0, 0, 5], [0, 0, 0, 0, 5],
        [0, 1, 1, 0, CHUNK], [0, last, 1, (last - 1) * CHUNK, big - (last - 1) * CHUNK],
        [0, last + 1, 3, 0, 3], [0, last + 1, 3, 0, 3],
    ]  # fmt: skip
    huge = 2**44  # 2^30 chunks each: two of them and a third tensor take two launches
    rows = emu.chunk_map([huge, huge, 5], depth, large).tolist()
    assert rows == [
        [0, 0, 0, 0, CHUNK], [0, 2**30 - 1, 0, huge - CHUNK, CHUNK],
        [1, 0, 1, 0, CHUNK], [1, 2**30 - 1, 1, huge - CHUNK, CHUNK],
        [1, 2**30, 2, 0, 5], [1, 2**30, 2, 0, 5],
    ]  # fmt: skip


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_norm_skips_the_step(emu, bad, dtype):
    params, grads, backups = make_lists([100, 17, 40_001], dtype, "cpu")
    grads[1][3] = bad
    old = [p.clone() for p in params]
    norm = perturb(emu, params, grads, backups, 0.05, CLASSIC)
    assert not math.isfinite(norm.item())
    assert all(torch.equal(p, o) for p, o in zip(params, old)), "weights must be untouched"
    assert all(torch.equal(b, o) for b, o in zip(backups, old)), "backups are still written"


@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_gradient_and_invalid_rho_skip_the_step(emu, adaptive):
    params, grads, backups = make_lists([33, 0, 5], torch.float32, "cpu")
    old = [p.clone() for p in params]
    zero = [torch.zeros_like(g) for g in grads]
    assert perturb(emu, params, zero, backups, 0.05, CLASSIC, adaptive, eps=0.0).item() == 0.0
    assert all(torch.equal(p, o) for p, o in zip(params, old))
    norm = perturb(emu, params, grads, backups, 0.0, CLASSIC, adaptive, rho_tensor=torch.tensor(-1.0))
    assert math.isnan(norm.item()) and all(torch.equal(p, o) for p, o in zip(params, old))


def test_rho_tensor_given_sq_norm_and_empty_lists(emu):
    params, grads, backups = make_lists([300, 11], torch.float32, "cpu")
    old = [p.clone() for p in params]
    norm = perturb(emu, params, grads, backups, 0.0, LARGE, rho_tensor=torch.tensor(0.07))
    check_against_reference(params, old, grads, backups, norm, 0.07, False)
    emu.sam_restore_(params, backups, LARGE)
    sq = torch.tensor(4.0 * norm.item() ** 2)
    got = perturb(emu, params, grads, backups, 0.07, LARGE, sq_norm=sq)  # twice the norm: half the step
    expected_half, _ = ref.sam_perturb_fp64(old, grads, 0.035)
    assert abs(got.item() - 2 * norm.item()) <= 1e-6 * norm.item()
    assert perturbation_error(params, old, expected_half) < 1e-5

    empty, empty_grads, empty_backups = make_lists([0, 0], torch.float32, "cpu")
    # Only empty tensors: no partial sums, the final sum of nothing, one block to report the norm.
    assert launches(emu, lambda: perturb(emu, empty, empty_grads, empty_backups, 0.05, LARGE)) == 2
    assert perturb(emu, empty, empty_grads, empty_backups, 0.05, CLASSIC).item() == 0.0
    assert emu.grad_sq_norm(empty_grads, [], False, CLASSIC).item() == 0.0
    assert launches(emu, lambda: emu.sam_restore_(empty, empty_backups, CLASSIC)) == 0


def test_registers_nothing_under_cuda(emu):
    for op in ("grad_sq_norm", "sam_perturb_", "sam_restore_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bisam_cuda_emulated::{op}", "CPU")
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"bisam_cuda_emulated::{op}", "CUDA")
