"""Launcher of the row-loss kernels: the fixed set of configurations (also compiled ahead of time by the
tests), and the launches, with keyword arguments and named modes. Every entry point takes CUDA tensors,
or CPU tensors under TRITON_INTERPRET=1.
"""

import functools

import torch

from bisam_kernels.ops.row_loss import kernels
from bisam_kernels.ops.row_loss.kernels import triton
from bisam_kernels.ops.row_loss.modes import TRITON_DTYPES, Finalize, Phi, Reduction, ScaleMode, StatsMode

SINGLE_PASS_MAX_K = 8192  # rows up to this width are read once (kept in registers)
TILE = 2048  # elements per program for narrow rows: ROWS = TILE // BLOCK_K
CHUNK = 4096  # column chunk of the two-pass kernel for wider rows
REDUCE_BLOCK = 1024
REDUCE_SLAB = 32 * REDUCE_BLOCK  # values one reduction program sums, at least
MAX_PARTIALS = 1024  # programs of a reduction's first stage, at most (its second stage: one program)
SCALE_TILES = ((128, 16), (16, 128), (4, 1024))  # (ROWS, BLOCK_K) of the in-place scaling kernel


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every buffer a kernel writes is allocated here (the tests poison it with NaN first)."""
    return torch.empty(shape, dtype=dtype, device=device)


@functools.cache
def _unused_float32(device: torch.device) -> torch.Tensor:
    """Stands for a float32 buffer a launch does not touch (its pointer type is fixed: one compiled variant)."""
    return torch.empty((1,), dtype=torch.float32, device=device)


def forward_config(K: int) -> dict:
    """Tile of the main kernel for rows of K columns: ROWS, BLOCK_K, SINGLE and num_warps."""
    if K <= SINGLE_PASS_MAX_K:
        block_k = max(16, triton.next_power_of_2(K))
        return {"ROWS": max(1, TILE // block_k), "BLOCK_K": block_k, "SINGLE": True,
                "num_warps": 16 if block_k >= 4096 else 8}  # 8 (16 for 8192) elements per thread
    return {"ROWS": 1, "BLOCK_K": CHUNK, "SINGLE": False, "num_warps": 16}


def scale_config(K: int) -> dict:
    for rows, block_k in SCALE_TILES:
        if K <= block_k:
            break
    return {"ROWS": rows, "BLOCK_K": block_k, "num_warps": 4}


def kernel_configs() -> list[tuple[str, dict]]:
    """Every (kernel name, constexprs + num_warps) the launcher can pick."""
    widths = sorted({forward_config(1 << i)["BLOCK_K"] for i in range(14)})
    configs = [forward_config(w) for w in widths if w <= SINGLE_PASS_MAX_K]
    configs.append(forward_config(SINGLE_PASS_MAX_K + 1))
    out = [("_bisam_loss_kernel", dict(cfg, PHI=phi)) for cfg in configs for phi in map(int, Phi)]
    out.append(("_count_kernel", {"BLOCK": REDUCE_BLOCK, "num_warps": 4}))
    out.append(("_reduce_kernel", {"BLOCK": REDUCE_BLOCK, "num_warps": 4}))
    out += [("_scale_grad_kernel", scale_config(bk)) for _, bk in SCALE_TILES]
    return out


_TL_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
             torch.int32: "i32"}


def _arg_types(kernel: str, d: str, t: str) -> tuple[dict, list[str]]:
    """(Triton types of the runtime arguments, the ones 16-byte aligned in the aligned variant)."""
    if kernel == "_bisam_loss_kernel":
        types = {"z_ptr": f"*{d}", "z_stride": "i32", "t_ptr": f"*{t}", "g_ptr": f"*{d}", "g_stride": "i32",
                 "loss_ptr": "*fp32", "scale_ptr": "*fp32", "scale_stride": "i32", "stats_ptr": "*fp32",
                 "out_ptr": f"*{d}", "N": "i32", "K": "i32", "mu": "fp32", "alpha": "fp32", "smoothing": "fp32", "out_scale": "fp32",
                 "ignore_index": "i32", "scale_mode": "i32", "stats_mode": "i32", "write_loss": "i32",
                 "write_grad": "i32", "finalize": "i32"}
        aligned = ["z_ptr", "t_ptr", "g_ptr", "loss_ptr", "scale_ptr", "stats_ptr", "out_ptr", "z_stride", "g_stride", "K"]
        return types, aligned
    if kernel == "_count_kernel":
        types = {"t_ptr": f"*{t}", "count_ptr": "*fp32", "N": "i32", "per_program": "i32", "ignore_index": "i32"}
        return types, ["t_ptr", "count_ptr", "per_program"]
    if kernel == "_reduce_kernel":
        types = {"rows_ptr": "*fp32", "count_ptr": "*fp32", "out_ptr": f"*{d}", "N": "i32", "per_program": "i32",
                 "divide": "i32"}
        return types, ["rows_ptr", "count_ptr", "out_ptr", "per_program"]
    types = {"g_ptr": f"*{d}", "g_stride": "i32", "go_ptr": f"*{d}", "go_stride": "i32", "copy_ptr": f"*{d}",
             "N": "i32", "K": "i32"}
    return types, ["g_ptr", "go_ptr", "copy_ptr", "g_stride", "K"]


def aot_specializations() -> list[dict]:
    """What to compile ahead of time (the tests; the register report): every configuration of
    kernel_configs() for every logits dtype, int64 targets, with 16-byte aligned pointers and strides / K
    multiples of 16 (the vectorised variant the JIT picks for such shapes); the main kernel also with
    int32 targets and unaligned strides / K (float32), and the count kernel for both target dtypes.

    Each entry: kernel (name), signature, constexprs, num_warps, aligned (argument names), label.
    """
    specs = []
    for kernel, cfg in kernel_configs():
        constexprs = {k: v for k, v in cfg.items() if k != "num_warps"}
        if kernel == "_count_kernel":
            variants = [("fp32", "i64", True), ("fp32", "i32", True)]
        else:
            variants = [(_TL_NAMES[dtype], "i64", True) for dtype in TRITON_DTYPES]
            if kernel == "_bisam_loss_kernel":
                variants.append(("fp32", "i32", False))
        for d, t, aligned in variants:
            types, alignable = _arg_types(kernel, d, t)
            flags = ", ".join(f"{k}={v}" for k, v in constexprs.items())
            label = f"{kernel}[{flags}, warps={cfg['num_warps']}] " + (t if kernel == "_count_kernel" else d)
            if kernel == "_bisam_loss_kernel":
                label += f"/{t}" + ("" if aligned else " unaligned")
            specs.append({
                "kernel": kernel,
                "signature": dict(types, **{k: "constexpr" for k in constexprs}),
                "constexprs": constexprs,
                "num_warps": cfg["num_warps"],
                "aligned": [a for a in alignable if aligned or a.endswith("_ptr")],
                "label": label,
            })
    return specs


def launch_rows(z, t, *, phi, mu, alpha, out_scale, ignore_index, loss_rows=None, grad=None, scale=None,
                scale_mode=ScaleMode.ONE, stats=None, stats_mode=StatsMode.NONE, out=None,
                finalize=Finalize.NONE, smoothing=0.0) -> None:
    """One launch of the row kernel over z (N, K) and targets t (N,).

    Writes each row's loss into ``loss_rows`` (N,) float32 and its gradient into ``grad`` (N, K) when
    given; reads the gradient factor from ``scale`` per ``scale_mode``; writes or reads the row statistics
    ``stats`` (2, N) per ``stats_mode``; with ``finalize`` (one program holding every row) writes the
    reduced loss to ``out``. ``smoothing``: label smoothing, for the identity phi (cross-entropy) only.
    Arguments left out are not touched by the kernel: the pointers it still needs
    are given placeholders of the right type here.
    """
    N, K = z.shape
    if N == 0:
        return
    cfg = dict(forward_config(K))
    num_warps = cfg.pop("num_warps")
    grid = (triton.cdiv(N, cfg["ROWS"]),)
    g = z if grad is None else grad
    unused = _unused_float32(z.device)
    kernels._bisam_loss_kernel[grid](
        z, z.stride(0), t, g, g.stride(0), unused if loss_rows is None else loss_rows,
        unused if scale is None else scale, 1 if scale_mode == ScaleMode.PER_ROW else 0,
        unused if stats is None else stats, z if out is None else out, N, K,
        float(mu), float(alpha), float(smoothing), float(out_scale), int(ignore_index), int(scale_mode), int(stats_mode),
        int(loss_rows is not None), int(grad is not None), int(finalize), PHI=int(phi), num_warps=num_warps, **cfg)


def partition(n: int) -> tuple[int, int]:
    """(values per program, programs) of a reduction over n values: one program up to REDUCE_SLAB, else
    at most MAX_PARTIALS slabs whose partial sums a second one-program stage adds. A function of n
    alone, so the bits do not depend on the number of SMs; slabs are whole blocks."""
    per = max(REDUCE_SLAB, triton.cdiv(triton.cdiv(n, MAX_PARTIALS), REDUCE_BLOCK) * REDUCE_BLOCK)
    return per, max(1, triton.cdiv(n, per))


def triton_count(t: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Number of targets != ignore_index, as a float32 tensor on t's device."""
    per, programs = partition(t.numel())
    counts = empty((programs,), torch.float32, t.device)
    kernels._count_kernel[(programs,)](t, counts, t.numel(), per, int(ignore_index), BLOCK=REDUCE_BLOCK, num_warps=4)
    return counts if programs == 1 else triton_reduce(counts, None, torch.float32)


def triton_reduce(values: torch.Tensor, count: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """sum(values) (/ count[0] when count is given) as a 0-dim tensor of dtype."""
    per, programs = partition(values.numel())
    if programs > 1:
        partials = empty((programs,), torch.float32, values.device)
        kernels._reduce_kernel[(programs,)](values, values, partials, values.numel(), per, 0, BLOCK=REDUCE_BLOCK,
                                    num_warps=4)
        return triton_reduce(partials, count, dtype)
    out = empty((), dtype, values.device)
    divide = count is not None
    kernels._reduce_kernel[(1,)](values, count if divide else values, out, values.numel(), per, int(divide),
                         BLOCK=REDUCE_BLOCK, num_warps=4)
    return out


def triton_forward(z, t, phi, mu, alpha, ignore_index, reduction, out_scale, grad_out=None, stats_out=None,
                   loss_dtype=None):
    """Forward through the Triton kernels: (loss in loss_dtype (default z.dtype), gradient or None).

    z: (N, K) with unit column stride; t: (N,) int32/int64, contiguous. When ``grad_out`` ((N, K), unit
    column stride, z's dtype; may be z itself) is given, the gradient of the reduced loss (of each
    row's loss for reduction="none") is written into it, fused with the forward. ``stats_out``, a
    (2, N) float32 tensor, receives the row statistics the backward of reduction="none" uses.
    """
    N, K = z.shape
    loss_dtype = loss_dtype or z.dtype
    params = dict(phi=phi, mu=mu, alpha=alpha, out_scale=out_scale, ignore_index=ignore_index, grad=grad_out,
                  stats=stats_out, stats_mode=StatsMode.NONE if stats_out is None else StatsMode.WRITE)
    if reduction != Reduction.NONE and 0 < N <= forward_config(K)["ROWS"]:
        # One program holds every row: it counts, reduces and writes the loss itself (one launch).
        out = empty((), loss_dtype, z.device)
        launch_rows(z, t, **params, out=out, finalize=Finalize.MEAN if reduction == Reduction.MEAN else Finalize.SUM)
        return out, grad_out
    loss_rows = empty((N,), torch.float32, z.device)
    count = triton_count(t, ignore_index) if reduction == Reduction.MEAN else None
    launch_rows(z, t, **params, loss_rows=loss_rows, scale=count,
                scale_mode=ScaleMode.ONE if count is None else ScaleMode.INV_COUNT)
    if reduction == Reduction.NONE:
        return loss_rows.to(loss_dtype), grad_out
    return triton_reduce(loss_rows, count, loss_dtype), grad_out


def triton_row_grad(z, t, grad_rows, stats, phi, mu, alpha, ignore_index, out_scale):
    """Gradient of sum_i grad_rows[i] * l_i (the backward of reduction="none"): a new (N, K) tensor.
    stats: the (2, N) row statistics of the forward, or None (they spare wide rows their first pass)."""
    N, K = z.shape
    g = empty((N, K), z.dtype, z.device)
    launch_rows(z, t, phi=phi, mu=mu, alpha=alpha, out_scale=out_scale, ignore_index=ignore_index, grad=g,
                scale=grad_rows.to(torch.float32).contiguous(), scale_mode=ScaleMode.PER_ROW,
                stats=None if stats is None else stats.to(torch.float32),
                stats_mode=StatsMode.NONE if stats is None else StatsMode.READ)
    return g


def triton_scale_grad_(g: torch.Tensor, go: torch.Tensor) -> torch.Tensor:
    """g *= go in place (go: 0-dim, or (N,) per row); no memory touched where go == 1. Returns a copy of go."""
    N, K = g.shape
    copy = empty(go.shape, go.dtype, go.device)
    if N == 0:
        return copy.copy_(go)
    cfg = dict(scale_config(K))
    num_warps = cfg.pop("num_warps")
    per_row = go.dim() > 0
    go_1d = go.reshape(-1).contiguous() if per_row else go.reshape(1)  # (the copy is written with its stride)
    kernels._scale_grad_kernel[(triton.cdiv(N, cfg["ROWS"]),)](
        g, g.stride(0), go_1d, 1 if per_row else 0, copy, N, K, num_warps=num_warps, **cfg)
    return copy
