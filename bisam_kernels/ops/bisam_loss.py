"""The fused BiSAM lower-bound loss: Triton kernels, launcher, torch.library ops and autograd.

For logits ``z`` (rows) and targets ``y`` (docs/design.md section 1)::

    F_j = z_j - z_y,   s_j = mu * phi(F_j),   l = logsumexp_j s_j     (l / mu with scale_by_mu)

and, with ``p = softmax(s)`` and ``c_j = p_j * mu * phi'(F_j)``, ``dl/dz_k = c_k - [k == y] * sum_j c_j``.

How the work is split (bytes of the logits moved by forward + backward):

* ``reduction="mean"/"sum"``: the forward computes the per-row loss *and* the gradient, already scaled
  by ``1 / count`` (count = non-ignored rows, counted on the device first). One pass over a row that
  fits on chip (K <= 8192): 1 read + 1 write; for wider rows an online max / log-sum-exp pass and a
  second pass writing the gradient: 2 reads + 1 write. The backward multiplies the stored gradient by
  ``grad_output`` in place with a kernel that reads ``grad_output`` on the device and touches nothing
  when it is 1 (``loss.backward()``), so it adds no traffic in the common case.
* ``reduction="none"``: the backward needs a different scale per row, so the forward only reads the
  logits (1 read) and the backward runs the same kernel again with the per-row scale (1 read + 1 write,
  2 reads + 1 write for wide rows).
* ``inplace_backward=True`` writes the gradient into the logits' buffer (no gradient allocation).

No host synchronisation anywhere on CUDA. Math in float32 (float64 for float64 logits); the gradient is
stored in the logits' dtype; the loss is returned in the logits' dtype, and in float32 under
``torch.autocast`` (as ``F.cross_entropy`` does: a float16 loss times a GradScaler's scale overflows).

On CUDA, float16 / bfloat16 / float32 logits run the Triton kernels; float64 logits (and every CPU
tensor) run the composite PyTorch implementation of the same ops, with the same outputs.
"""

import contextlib
import math
import numbers
from collections.abc import Iterator

import torch

from bisam_kernels._dtypes import accumulate_dtype

try:  # the CPU path works without Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
    tl = None

__all__ = ["bisam_loss", "BiSAMLoss"]

PHIS = {"tanh": 0, "log": 1}
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_TANH, _LOG = 0, 1
_NONE, _MEAN, _SUM = 0, 1, 2
GAMMA = math.log(math.e - 1.0)  # phi_log(x) = 1 - softplus(GAMMA - x), so phi_log(0) = 0

# Scale modes of the gradient written by the main kernel (argument `scale_mode`).
_SCALE_ONE, _SCALE_INV_COUNT, _SCALE_PER_ROW = 0, 1, 2

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TARGET_DTYPES = (torch.int64, torch.int32)

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if triton is not None:
    _GAMMA = tl.constexpr(GAMMA)

    @triton.jit
    def _phi_dphi(F, alpha, PHI: tl.constexpr):
        """(phi(F), phi'(F)) in float32, with core ops only, exact zero at F == 0.

        tanh: phi = tanh(a F) = sign(F) (1 - u) / (1 + u), phi' = a * 4u / (1 + u)^2, u = exp(-2|a F|) <= 1;
        log:  phi = 1 - softplus(t), t = GAMMA - F, softplus(t) = max(t, 0) + log(1 + exp(-|t|)),
              phi' = sigmoid(t). log(1 + u) instead of log1p(u) costs at most ~u < 2^-24 absolutely, below
              the rounding of 1 - softplus in float32, so no log1p correction is needed.
        """
        if PHI == 0:
            x = alpha * F
            u = tl.exp(-2.0 * tl.abs(x))
            r = 1.0 / (1.0 + u)
            th = (1.0 - u) * r
            phi = tl.where(x < 0.0, -th, th)
            dphi = (4.0 * alpha) * u * r * r
        else:
            t = _GAMMA - F
            u = tl.exp(-tl.abs(t))
            r = 1.0 / (1.0 + u)
            softplus = tl.maximum(t, 0.0) + tl.log(1.0 + u)
            phi = tl.where(F == 0.0, 0.0, 1.0 - softplus)
            dphi = tl.where(t >= 0.0, r, u * r)
        return phi, dphi

    # Flags and the ignore index are not specialised on (the JIT would otherwise compile a variant for
    # each value equal to 1), so the variants are the ones kernel_configs() lists, times dtypes.
    @triton.jit(do_not_specialize=["scale_stride", "ignore_index", "scale_mode", "stats_mode", "write_loss",
                                   "write_grad", "finalize"])
    def _bisam_loss_kernel(
        z_ptr,
        z_stride,
        t_ptr,
        g_ptr,
        g_stride,
        loss_ptr,
        scale_ptr,
        scale_stride,
        stats_ptr,
        out_ptr,
        N,
        K,
        mu,
        alpha,
        out_scale,
        ignore_index,
        scale_mode,
        stats_mode,
        write_loss,
        write_grad,
        finalize,
        PHI: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SINGLE: tl.constexpr,
    ):
        """Loss of ROWS rows per program and, when write_grad, their gradient.

        Gradient scale per row: out_scale * (1, 1 / scale[0] (a count), or scale[row]) for scale_mode 0, 1, 2.
        SINGLE: the row fits in one BLOCK_K block (one read); otherwise an online max / sum pass over
        BLOCK_K chunks, then a second pass that writes the gradient. Row statistics (lse = logsumexp s,
        ws = sum_{j != y} p_j phi'(F_j)) at stats[row], stats[N + row]: stats_mode 1 writes them, 2 reads
        them instead of the first pass (two-pass kernel; SINGLE re-reads its row anyway).
        finalize 1 (sum) / 2 (mean), with a single program (N <= ROWS): out[0] = the reduced loss, and the
        mean's count taken from the program's own rows (no count or reduction kernel: one launch).
        Ignored rows: loss 0, gradient 0, logits never read. A target outside [0, K) that is not
        ignore_index: loss and gradient NaN.
        """
        pid = tl.program_id(0)
        rows = pid * ROWS + tl.arange(0, ROWS)
        row_ok = rows < N
        tgt = tl.load(t_ptr + rows, mask=row_ok, other=ignore_index)
        ignored = tgt == ignore_index
        bad = ((tgt < 0) | (tgt >= K)) & (~ignored)
        live = row_ok & (~ignored) & (~bad)
        tgt = tl.where(live, tgt, 0).to(tl.int32)
        rows64 = rows.to(tl.int64)
        z_rows = z_ptr + rows64 * z_stride
        zy = tl.load(z_rows + tgt, mask=live, other=0.0).to(tl.float32)

        gs = tl.load(scale_ptr + rows * scale_stride, mask=row_ok & (scale_mode != 0), other=1.0).to(tl.float32)
        # (a count of 0 means every row is ignored: the scale is then unused)
        gs = tl.where(scale_mode == 1, 1.0 / tl.maximum(gs, 1.0), gs)
        n_counted = tl.sum((row_ok & (~ignored)).to(tl.float32), axis=0)
        if finalize == 2:
            gs = tl.zeros([ROWS], dtype=tl.float32) + 1.0 / tl.maximum(n_counted, 1.0)

        cols = tl.arange(0, BLOCK_K)
        if SINGLE:
            mask = live[:, None] & (cols[None, :] < K)
            z = tl.load(z_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            phi, dphi = _phi_dphi(z - zy[:, None], alpha, PHI)
            s = tl.where(mask, mu * phi, float("-inf"))
            m = tl.where(live, tl.max(s, axis=1), 0.0)
            e = tl.exp(s - m[:, None])
            is_y = cols[None, :] == tgt[:, None]
            c = tl.where(is_y, 0.0, e * dphi)
            S = tl.where(live, tl.sum(e, axis=1), 1.0)
            lse = m + tl.log(S)
            ws = tl.sum(c, axis=1) / S
        else:
            if stats_mode == 2:
                lse = tl.load(stats_ptr + rows, mask=live, other=0.0)
                ws = tl.load(stats_ptr + N + rows, mask=live, other=0.0)
            else:
                # s_y = 0 is in every live row, so starting the running max at 0 gives the true max.
                m = tl.zeros([ROWS], dtype=tl.float32)
                S = tl.zeros([ROWS], dtype=tl.float32)
                W = tl.zeros([ROWS], dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    kc = k0 + cols
                    mask = live[:, None] & (kc[None, :] < K)
                    z = tl.load(z_rows[:, None] + kc[None, :], mask=mask, other=0.0).to(tl.float32)
                    phi, dphi = _phi_dphi(z - zy[:, None], alpha, PHI)
                    s = tl.where(mask, mu * phi, float("-inf"))
                    m_new = tl.maximum(m, tl.max(s, axis=1))
                    rescale = tl.exp(m - m_new)
                    e = tl.exp(s - m_new[:, None])
                    c = tl.where(kc[None, :] == tgt[:, None], 0.0, e * dphi)
                    S = S * rescale + tl.sum(e, axis=1)
                    W = W * rescale + tl.sum(c, axis=1)
                    m = m_new
                S = tl.where(live, S, 1.0)
                lse = m + tl.log(S)
                ws = W / S
        if stats_mode == 1:
            tl.store(stats_ptr + rows, lse, mask=row_ok)
            tl.store(stats_ptr + N + rows, ws, mask=row_ok)
        loss = lse * out_scale
        loss = tl.where(ignored, 0.0, loss)
        loss = tl.where(bad, float("nan"), loss)
        tl.store(loss_ptr + rows, loss, mask=row_ok & (write_loss != 0))
        if finalize != 0:
            total = tl.sum(tl.where(row_ok, loss, 0.0), axis=0)
            if finalize == 2:  # the mean over no rows is NaN, as F.cross_entropy's
                total = tl.where(n_counted > 0, total / tl.maximum(n_counted, 1.0), float("nan"))
            tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))

        # dl/dz_k = coef * p_k * phi'(F_k) (k != y), dl/dz_y = -coef * sum_{j != y} p_j phi'(F_j) = -coef * ws.
        coef = (mu * out_scale) * gs
        coef = tl.where(ignored, 0.0, coef)
        coef = tl.where(bad, float("nan"), coef)
        gy = -ws * coef
        g_rows = g_ptr + rows64 * g_stride
        if SINGLE:
            g = tl.where(is_y, gy[:, None], c * (coef / S)[:, None])
            g = tl.where(live[:, None], g, coef[:, None])  # 0 (ignored) or NaN (bad target)
            store = row_ok[:, None] & (cols[None, :] < K) & (write_grad != 0)
            tl.store(g_rows[:, None] + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=store)
        else:
            if write_grad != 0:
                for k0 in range(0, K, BLOCK_K):
                    kc = k0 + cols
                    in_k = kc[None, :] < K
                    mask = live[:, None] & in_k
                    z = tl.load(z_rows[:, None] + kc[None, :], mask=mask, other=0.0).to(tl.float32)
                    phi, dphi = _phi_dphi(z - zy[:, None], alpha, PHI)
                    s = tl.where(mask, mu * phi, float("-inf"))
                    g = tl.exp(s - lse[:, None]) * dphi * coef[:, None]
                    g = tl.where(kc[None, :] == tgt[:, None], gy[:, None], g)
                    g = tl.where(live[:, None], g, coef[:, None])
                    store = row_ok[:, None] & in_k
                    tl.store(g_rows[:, None] + kc[None, :], g.to(g_ptr.dtype.element_ty), mask=store)

    # Reductions over the rows run in two stages when N is large (_partition): per-program partial sums
    # of fixed slabs, then one program over the partials. Both orders are fixed: deterministic.
    @triton.jit(do_not_specialize=["ignore_index"])
    def _count_kernel(t_ptr, count_ptr, N, per_program, ignore_index, BLOCK: tl.constexpr):
        """count[p] = number of targets != ignore_index in slab p (per_program targets), as float32."""
        start = tl.program_id(0).to(tl.int64) * per_program
        n_here = tl.minimum(N - start, per_program)
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for n0 in range(0, n_here, BLOCK):
            offs = n0 + tl.arange(0, BLOCK)
            t = tl.load(t_ptr + start + offs, mask=offs < n_here, other=ignore_index)
            acc += (t != ignore_index).to(tl.int32)
        tl.store(count_ptr + tl.program_id(0), tl.sum(acc, axis=0).to(tl.float32))

    @triton.jit(do_not_specialize=["divide"])
    def _reduce_kernel(rows_ptr, count_ptr, out_ptr, N, per_program, divide, BLOCK: tl.constexpr):
        """out[p] = sum of slab p of rows (per_program values), in a fixed order; divided by count[0]
        when divide (the last stage: one program)."""
        start = tl.program_id(0).to(tl.int64) * per_program
        n_here = tl.minimum(N - start, per_program)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for n0 in range(0, n_here, BLOCK):
            offs = n0 + tl.arange(0, BLOCK)
            acc += tl.load(rows_ptr + start + offs, mask=offs < n_here, other=0.0)
        total = tl.sum(acc, axis=0)
        if divide != 0:  # the mean over no rows is NaN, as F.cross_entropy's
            count = tl.load(count_ptr)
            total = tl.where(count > 0, total / tl.maximum(count, 1.0), float("nan"))
        tl.store(out_ptr + tl.program_id(0), total.to(out_ptr.dtype.element_ty))

    @triton.jit(do_not_specialize=["go_stride"])
    def _scale_grad_kernel(g_ptr, g_stride, go_ptr, go_stride, copy_ptr, N, K, ROWS: tl.constexpr,
                           BLOCK_K: tl.constexpr):
        """g[row, :] *= go[row * go_stride] in place; rows whose factor is 1 are neither read nor written.

        Also copies go into copy (the same value written by every program when go_stride is 0).
        """
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < N
        go = tl.load(go_ptr + rows * go_stride, mask=row_ok, other=1.0)
        tl.store(copy_ptr + rows * go_stride, go, mask=row_ok)
        go = go.to(tl.float32)
        need = row_ok & (go != 1.0)
        if tl.max(need.to(tl.int32), axis=0) != 0:
            g_rows = g_ptr + rows.to(tl.int64) * g_stride
            cols = tl.arange(0, BLOCK_K)
            for k0 in range(0, K, BLOCK_K):
                kc = k0 + cols
                mask = need[:, None] & (kc[None, :] < K)
                ptrs = g_rows[:, None] + kc[None, :]
                g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                tl.store(ptrs, (g * go[:, None]).to(g_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launcher: the fixed set of configurations, and the launches
# ---------------------------------------------------------------------------------------------

_SINGLE_PASS_MAX_K = 8192  # rows up to this width are read once (kept in registers)
_TILE = 2048  # elements per program for narrow rows: ROWS = _TILE // BLOCK_K
_CHUNK = 4096  # column chunk of the two-pass kernel for wider rows
_REDUCE_BLOCK = 1024
_REDUCE_SLAB = 32 * _REDUCE_BLOCK  # values one reduction program sums, at least
_MAX_PARTIALS = 1024  # programs of a reduction's first stage, at most (its second stage: one program)
_SCALE_TILES = ((128, 16), (16, 128), (4, 1024))  # (ROWS, BLOCK_K) of the in-place scaling kernel


def _empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every buffer a kernel writes is allocated here (the tests poison it with NaN first)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _forward_config(K: int) -> dict:
    """Tile of the main kernel for rows of K columns: ROWS, BLOCK_K, SINGLE and num_warps."""
    if K <= _SINGLE_PASS_MAX_K:
        block_k = max(16, _next_pow2(K))
        return {"ROWS": max(1, _TILE // block_k), "BLOCK_K": block_k, "SINGLE": True,
                "num_warps": 16 if block_k >= 4096 else 8}  # 8 (16 for 8192) elements per thread
    return {"ROWS": 1, "BLOCK_K": _CHUNK, "SINGLE": False, "num_warps": 16}


def _scale_config(K: int) -> dict:
    for rows, block_k in _SCALE_TILES:
        if K <= block_k:
            break
    return {"ROWS": rows, "BLOCK_K": block_k, "num_warps": 4}


def kernel_configs() -> list[tuple[str, dict]]:
    """Every (kernel name, constexprs + num_warps) the launcher can pick."""
    widths = sorted({_forward_config(1 << i)["BLOCK_K"] for i in range(14)})
    configs = [_forward_config(w) for w in widths if w <= _SINGLE_PASS_MAX_K]
    configs.append(_forward_config(_SINGLE_PASS_MAX_K + 1))
    out = [("_bisam_loss_kernel", dict(cfg, PHI=phi)) for cfg in configs for phi in (_TANH, _LOG)]
    out.append(("_count_kernel", {"BLOCK": _REDUCE_BLOCK, "num_warps": 4}))
    out.append(("_reduce_kernel", {"BLOCK": _REDUCE_BLOCK, "num_warps": 4}))
    out += [("_scale_grad_kernel", _scale_config(bk)) for _, bk in _SCALE_TILES]
    return out


_TL_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
             torch.int32: "i32"}


def _arg_types(kernel: str, d: str, t: str) -> tuple[dict, list[str]]:
    """(Triton types of the runtime arguments, the ones 16-byte aligned in the aligned variant)."""
    if kernel == "_bisam_loss_kernel":
        types = {"z_ptr": f"*{d}", "z_stride": "i32", "t_ptr": f"*{t}", "g_ptr": f"*{d}", "g_stride": "i32",
                 "loss_ptr": "*fp32", "scale_ptr": "*fp32", "scale_stride": "i32", "stats_ptr": "*fp32",
                 "out_ptr": f"*{d}", "N": "i32", "K": "i32", "mu": "fp32", "alpha": "fp32", "out_scale": "fp32",
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
            variants = [(_TL_NAMES[dtype], "i64", True) for dtype in _TRITON_DTYPES]
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


def _launch_main(z, t, g, loss_rows, scale, scale_stride, scale_mode, stats, stats_mode, phi, mu, alpha, out_scale,
                 ignore_index, write_loss, write_grad, out=None, finalize=0):
    N, K = z.shape
    if N == 0:
        return
    cfg = dict(_forward_config(K))
    num_warps = cfg.pop("num_warps")
    grid = (triton.cdiv(N, cfg["ROWS"]),)
    _bisam_loss_kernel[grid](
        z, z.stride(0), t, g, g.stride(0), loss_rows, scale, scale_stride, stats, z if out is None else out, N, K,
        float(mu), float(alpha), float(out_scale), int(ignore_index), scale_mode, stats_mode, int(write_loss),
        int(write_grad), finalize, PHI=phi, num_warps=num_warps, **cfg)


def _partition(n: int) -> tuple[int, int]:
    """(values per program, programs) of a reduction over n values: one program up to _REDUCE_SLAB, else
    at most _MAX_PARTIALS slabs whose partial sums a second one-program stage adds. A function of n
    alone, so the bits do not depend on the number of SMs; slabs are whole blocks."""
    per = max(_REDUCE_SLAB, triton.cdiv(triton.cdiv(n, _MAX_PARTIALS), _REDUCE_BLOCK) * _REDUCE_BLOCK)
    return per, max(1, triton.cdiv(n, per))


def _triton_count(t: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Number of targets != ignore_index, as a float32 tensor on t's device."""
    per, programs = _partition(t.numel())
    counts = _empty((programs,), torch.float32, t.device)
    _count_kernel[(programs,)](t, counts, t.numel(), per, int(ignore_index), BLOCK=_REDUCE_BLOCK, num_warps=4)
    return counts if programs == 1 else _triton_reduce(counts, None, torch.float32)


def _triton_reduce(values: torch.Tensor, count: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """sum(values) (/ count[0] when count is given) as a 0-dim tensor of dtype."""
    per, programs = _partition(values.numel())
    if programs > 1:
        partials = _empty((programs,), torch.float32, values.device)
        _reduce_kernel[(programs,)](values, values, partials, values.numel(), per, 0, BLOCK=_REDUCE_BLOCK,
                                    num_warps=4)
        return _triton_reduce(partials, count, dtype)
    out = _empty((), dtype, values.device)
    divide = count is not None
    _reduce_kernel[(1,)](values, count if divide else values, out, values.numel(), per, int(divide),
                         BLOCK=_REDUCE_BLOCK, num_warps=4)
    return out


def _triton_forward(z, t, phi, mu, alpha, ignore_index, reduction, out_scale, grad_out=None, stats_out=None,
                    loss_dtype=None):
    """Forward through the Triton kernels: (loss in loss_dtype (default z.dtype), gradient or None).

    z: (N, K) with unit column stride; t: (N,) int32/int64, contiguous. When ``grad_out`` ((N, K), unit
    column stride, z's dtype; may be z itself) is given, the gradient of the reduced loss (of each
    row's loss for reduction="none") is written into it, fused with the forward. ``stats_out``, a
    (2, N) float32 tensor, receives the row statistics the backward of reduction="none" uses. Runs on
    CPU tensors under TRITON_INTERPRET=1.
    """
    N, K = z.shape
    loss_dtype = loss_dtype or z.dtype
    loss_rows = _empty((N,), torch.float32, z.device)
    write_grad = grad_out is not None
    g = grad_out if write_grad else z
    stats_args = (stats_out, 1) if stats_out is not None else (loss_rows, 0)
    if reduction != _NONE and 0 < N <= _forward_config(K)["ROWS"]:
        # One program holds every row: it counts, reduces and writes the loss itself (one launch).
        out = _empty((), loss_dtype, z.device)
        _launch_main(z, t, g, loss_rows, loss_rows, 0, _SCALE_ONE, *stats_args, phi, mu, alpha, out_scale,
                     ignore_index, write_loss=False, write_grad=write_grad, out=out,
                     finalize=2 if reduction == _MEAN else 1)
        return out, grad_out
    count = _triton_count(t, ignore_index) if reduction == _MEAN else None
    _launch_main(z, t, g, loss_rows, count if count is not None else loss_rows, 0,
                 _SCALE_INV_COUNT if count is not None else _SCALE_ONE, *stats_args, phi, mu, alpha, out_scale,
                 ignore_index, write_loss=True, write_grad=write_grad)
    if reduction == _NONE:
        loss = loss_rows.to(loss_dtype)
    else:
        loss = _triton_reduce(loss_rows, count, loss_dtype)
    return loss, grad_out


def _triton_row_grad(z, t, grad_rows, stats, phi, mu, alpha, ignore_index, out_scale):
    """Gradient of sum_i grad_rows[i] * l_i (the backward of reduction="none"): a new (N, K) tensor.
    stats: the (2, N) row statistics of the forward (they spare wide rows their first pass)."""
    N, K = z.shape
    g = _empty((N, K), z.dtype, z.device)
    go = grad_rows.to(torch.float32).contiguous()
    _launch_main(z, t, g, go, go, 1, _SCALE_PER_ROW, go if stats is None else stats.to(torch.float32),
                 0 if stats is None else 2, phi, mu, alpha, out_scale, ignore_index, write_loss=False, write_grad=True)
    return g


def _triton_scale_grad_(g: torch.Tensor, go: torch.Tensor) -> torch.Tensor:
    """g *= go in place (go: 0-dim, or (N,) per row); no memory touched where go == 1. Returns a copy of go."""
    N, K = g.shape
    copy = _empty(go.shape, go.dtype, go.device)
    if N == 0:
        return copy.copy_(go)
    cfg = dict(_scale_config(K))
    num_warps = cfg.pop("num_warps")
    per_row = go.dim() > 0
    go_1d = go.reshape(-1).contiguous() if per_row else go.reshape(1)  # (the copy is written with its stride)
    _scale_grad_kernel[(triton.cdiv(N, cfg["ROWS"]),)](
        g, g.stride(0), go_1d, 1 if per_row else 0, copy, N, K, num_warps=num_warps, **cfg)
    return copy


# ---------------------------------------------------------------------------------------------
# Composite PyTorch implementation (CPU, float64, and CUDA without Triton): same outputs
# ---------------------------------------------------------------------------------------------


def _composite_rows(z, t, phi, mu, alpha, ignore_index, out_scale, row_scale, want_grad, check, mean=False,
                    want_stats=False):
    """(per-row loss, gradient of sum_i row_scale_i * l_i or None, count, row statistics or None), in the
    compute dtype.

    row_scale: a float or an (N,) tensor; with mean, also divided by count, the number of non-ignored
    rows (else count is None). Row statistics: (2, N), lse and sum_{j != y} p_j phi'(F_j), as the kernel's. check (CPU only: it reads values on the host): raise ValueError for a
    target outside [0, K) that is not ignore_index; without it such a row gets a NaN loss and gradient,
    as in the Triton kernel.
    """
    K = z.shape[1]
    ignored = t == ignore_index
    bad, count = None, None
    if check:  # host-side checks are free on the CPU: skip the masking when no row is ignored
        n_ignored = int(ignored.sum())
        idx = torch.where(ignored, 0, t) if n_ignored else t
        if idx.numel():
            lo, hi = torch.aminmax(idx)
            if int(lo) < 0 or int(hi) >= K:
                first = int(idx[(idx < 0) | (idx >= K)][0])
                raise ValueError(f"targets must lie in [0, {K}) or equal ignore_index={ignore_index}, got {first}")
        dead = ignored if n_ignored else None
        if mean:
            count = t.numel() - n_ignored
            row_scale = row_scale / count if count else math.inf
    else:
        idx = torch.where(ignored, 0, t)
        bad = (idx < 0) | (idx >= K)
        idx = torch.where(bad, 0, idx)
        dead = ignored | bad
        if mean:
            count = (~ignored).sum().to(accumulate_dtype(z.dtype))
            row_scale = (row_scale / count).expand(t.shape)
    idx = idx.long().unsqueeze(1)
    z = z.to(accumulate_dtype(z.dtype))
    zy = z.gather(1, idx)
    # Few passes over (N, K), in place where possible; the softmax normalisation 1/S goes into coef.
    if phi == _TANH:
        th = torch.sub(z, zy).mul_(alpha).tanh_()  # phi(F); exactly 0 at the target column
        s = th * mu
        dscale = alpha
    else:
        t_ = torch.sub(zy, z).add_(GAMMA)  # GAMMA - F (-F first: exact where z is close to z_y)
        s = torch.nn.functional.softplus(t_).mul_(-mu).add_(mu).scatter_(1, idx, 0.0)  # mu phi(F), s_y = 0
        dscale = 1.0
    m = s.amax(dim=1, keepdim=True)
    e = s.sub_(m).exp_()  # exp(s - m)
    S = e.sum(dim=1)
    lse = S.log().add_(m.squeeze(1))
    loss = lse if out_scale == 1.0 else lse * out_scale
    if dead is not None:
        loss = loss.masked_fill(dead, 0.0)
    if bad is not None:
        loss.masked_fill_(bad, float("nan"))
    if not (want_grad or want_stats):
        return loss, None, count, None
    if phi == _TANH:  # e * phi' / alpha = e * (1 - tanh^2), as PyTorch's tanh backward (error < 2^-23)
        c = e.addcmul_(e, th.square_(), value=-1.0)
    else:  # e * sigmoid(GAMMA - F)
        c = e.mul_(t_.sigmoid_())
    c.scatter_(1, idx, 0.0)  # c_j = e_j phi'(F_j) / dscale for j != y
    W = c.sum(dim=1)
    stats = torch.stack([lse, W / S * dscale]) if want_stats else None
    if not want_grad:
        return loss, None, count, stats
    if isinstance(row_scale, torch.Tensor):
        coef = S.reciprocal().mul_(mu * dscale * out_scale).mul_(row_scale)
    else:
        coef = S.reciprocal().mul_(mu * dscale * out_scale * row_scale)
    if dead is not None:
        coef.masked_fill_(dead, 0.0)
    gy = W.mul_(coef).neg_()
    g = c.mul_(coef.unsqueeze(1)).scatter_(1, idx, gy.unsqueeze(1))
    if dead is not None:  # (also for non-finite logits in those rows)
        g.masked_fill_(dead.unsqueeze(1), 0.0)
    if bad is not None:
        g.masked_fill_(bad.unsqueeze(1), float("nan"))
    return loss, g, count, stats


def _composite_forward(z, t, phi, mu, alpha, ignore_index, reduction, out_scale, want_grad, want_stats,
                       loss_dtype=None):
    """(loss in loss_dtype (default z.dtype), gradient of the reduced loss in z.dtype or None, row statistics
    or None)."""
    rows, g, count, stats = _composite_rows(z, t, phi, mu, alpha, ignore_index, out_scale, 1.0, want_grad,
                                            check=z.device.type == "cpu", mean=reduction == _MEAN,
                                            want_stats=want_stats)
    if reduction == _NONE:
        loss = rows
    else:
        loss = rows.sum() / count if count is not None else rows.sum()
    return loss.to(loss_dtype or z.dtype), None if g is None else g.to(z.dtype), stats


def _composite_scale_grad_(g: torch.Tensor, go: torch.Tensor) -> torch.Tensor:
    if g.device.type == "cpu" and go.dim() == 0:  # host-side check (free on the CPU), as the kernel's
        factor = go.item()
        if factor != 1.0:
            g.mul_(factor)
        return go.clone()
    factor = go.to(accumulate_dtype(g.dtype)).reshape(-1, 1)
    g.copy_(g.to(factor.dtype) * factor)
    return go.clone()


# ---------------------------------------------------------------------------------------------
# Dispatch between the Triton kernels and the composite path
# ---------------------------------------------------------------------------------------------

_triton_on_cpu = False  # tests: run the Triton kernels on CPU tensors (Triton's interpreter)


@contextlib.contextmanager
def triton_on_cpu(enabled: bool = True) -> Iterator[None]:
    """Route CPU tensors through the Triton kernels (needs TRITON_INTERPRET=1 set before importing
    triton). For tests: the Triton code then runs under the interpreter on the CPU."""
    global _triton_on_cpu
    previous, _triton_on_cpu = _triton_on_cpu, enabled
    try:
        yield
    finally:
        _triton_on_cpu = previous


def _use_triton(z: torch.Tensor) -> bool:
    if triton is None or z.dtype not in _TRITON_DTYPES:
        return False
    return z.is_cuda or (_triton_on_cpu and z.device.type == "cpu")


def _unit_col_stride(z: torch.Tensor) -> torch.Tensor:
    return z if z.stride(1) == 1 or z.shape[1] <= 1 else z.contiguous()


def _writable(z: torch.Tensor) -> bool:
    """No two elements of the (N, K) view z share memory (it can hold the gradient in place)."""
    dims = sorted((st, n) for st, n in zip(z.stride(), z.shape) if n > 1)
    span = 1
    for st, n in dims:
        if st < span:
            return False
        span = st * n
    return True


def _fuses_gradient(reduction: int, dtype: torch.dtype) -> bool:
    """Whether the forward writes the gradient (mean / sum). Not for float16: its gradient must be
    multiplied by grad_output (an AMP loss scale) before it is rounded, or small entries flush to zero;
    float16 logits recompute the gradient in the backward instead (2 reads + 1 write)."""
    return reduction != _NONE and dtype != torch.float16


def _device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _forward_impl(z, t, phi, mu, alpha, ignore_index, reduction, out_scale, want_grad, into_logits=False,
                  want_stats=False, float32_loss=False):
    """(loss, gradient or None, row statistics or None). The loss has z's dtype, or float32 with float32_loss.

    The gradient of the reduced loss (of each row's loss for "none"), in a new (N, K) tensor, or written
    over the logits when into_logits (into a new tensor all the same when the logits' memory overlaps
    itself, an expanded tensor say). Row statistics: (2, N) for the backward of reduction="none"."""
    into_logits = into_logits and _writable(z)
    loss_dtype = torch.float32 if float32_loss else z.dtype
    if _use_triton(z):
        z, t = _unit_col_stride(z), t.contiguous()
        g = stats = None
        if want_grad:
            g = z if into_logits else _empty(z.shape, z.dtype, z.device)
        if want_stats:
            stats = _empty((2, z.shape[0]), torch.float32, z.device)
        with _device_of(z):
            loss, g = _triton_forward(z, t, phi, mu, alpha, ignore_index, reduction, out_scale, g, stats,
                                      loss_dtype)
        return loss, g, stats
    loss, g, stats = _composite_forward(z, t, phi, mu, alpha, ignore_index, reduction, out_scale, want_grad,
                                        want_stats, loss_dtype)
    if into_logits and g is not None:
        g = z.copy_(g)
    return loss, g, stats


def _row_grad_impl(z, t, grad_rows, stats, phi, mu, alpha, ignore_index, out_scale):
    """Gradient of sum_i grad_rows[i] * l_i; stats: the forward's row statistics, or an empty tensor."""
    if _use_triton(z):
        stats = stats.contiguous() if stats.numel() else None  # the kernel indexes a dense (2, N) tensor
        with _device_of(z):
            return _triton_row_grad(_unit_col_stride(z), t.contiguous(), grad_rows, stats, phi, mu, alpha,
                                    ignore_index, out_scale)
    row_scale = grad_rows.to(accumulate_dtype(z.dtype))
    _, g, _, _ = _composite_rows(z, t, phi, mu, alpha, ignore_index, out_scale, row_scale, True, check=False)
    return g.to(z.dtype)


def _scale_grad_impl(g: torch.Tensor, go: torch.Tensor) -> torch.Tensor:
    """g *= go in place; returns a copy of go (the caller's go may be modified later, by gradcheck say)."""
    if _use_triton(g):
        with _device_of(g):
            return _triton_scale_grad_(g, go)
    return _composite_scale_grad_(g, go)


def _tracing(t: torch.Tensor) -> bool:
    """Under torch.compile / AOT autograd tracing (fake or functional tensors): use the ops, functionally."""
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor


# ---------------------------------------------------------------------------------------------
# Autograd, shared by the eager autograd.Function and the torch.library operator
# ---------------------------------------------------------------------------------------------


def _scaled(grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """grad * factor (0-dim, or one factor per row) in a new tensor, computed in float32 (float64)."""
    acc = accumulate_dtype(grad.dtype)
    return (grad.to(acc) * factor.to(acc).reshape(-1, 1)).to(grad.dtype)


def _save(ctx, fused, logits, targets, aux, reduction, params) -> None:
    """aux: the fused gradient (fused), else the row statistics of reduction="none" (or empty)."""
    ctx.set_materialize_grads(False)
    ctx.fused = fused
    ctx.reduction = reduction
    ctx.params = params  # (phi, mu, alpha, ignore_index, out_scale)
    ctx.first_grad_output = None
    if fused:
        # Kept as an attribute, not through save_for_backward: the backward scales it in place, which
        # would fail the saved-tensor version check of a second backward (retain_graph=True).
        ctx.grad = aux
    else:
        ctx.save_for_backward(logits, targets, aux)


def _backward_stored(ctx, grad_output):
    """Backward of a fused forward: the stored gradient times grad_output.

    The first backward scales it in place (the kernel touches nothing when grad_output is 1) and returns
    it. A second backward through the same graph (retain_graph=True) must not modify what the first one
    returned, so it returns a scaled copy, from the factor the first one applied (NaN where that factor
    was 0 and the new one is not). Under tracing the backward is functional (a scaled copy).
    """
    grad = ctx.grad
    if _tracing(grad):
        return _scaled(grad, grad_output)
    if ctx.first_grad_output is None:
        ctx.first_grad_output = _scale_grad_impl(grad, grad_output)
        ctx.grad_version = grad._version
        return grad
    if grad._version != ctx.grad_version:
        # The first backward returned this very tensor (a leaf's .grad may be it): it has been changed
        # since (accumulated into, zeroed, clipped), so it no longer holds this loss's gradient.
        raise RuntimeError(
            "bisam_loss: a repeated backward through the same graph (retain_graph=True) needs the gradient "
            "the first backward returned unchanged, but it was modified in place (e.g. accumulated into "
            ".grad or zeroed). Recompute the loss, or take repeated gradients with torch.autograd.grad."
        )
    acc = accumulate_dtype(grad.dtype)
    go, go0 = grad_output.to(acc), ctx.first_grad_output.to(acc)
    return _scaled(grad, torch.where(go == go0, torch.ones_like(go), go / go0))


def _backward(ctx, grad_loss):
    """d loss / d logits, or None."""
    if grad_loss is None:
        return None
    if ctx.fused:
        return _backward_stored(ctx, grad_loss)
    # reduction="none" (or a forward that did not fuse the gradient): recompute it from the logits.
    logits, targets, stats = ctx.saved_tensors
    phi, mu, alpha, ignore_index, out_scale = ctx.params
    grad_rows = grad_loss.to(accumulate_dtype(logits.dtype)).expand(targets.shape)
    if ctx.reduction == _MEAN:
        grad_rows = grad_rows / (targets != ignore_index).sum()
    args = (logits, targets, grad_rows, stats, phi, mu, alpha, ignore_index, out_scale)
    return torch.ops.bisam.bisam_loss_row_grad(*args) if _tracing(logits) else _row_grad_impl(*args)


class _BiSAMLossFunction(torch.autograd.Function):
    """Eager autograd (no dispatcher round trip: a torch.library custom op costs tens of microseconds
    per call in Python, more than the kernels at small sizes). torch.compile uses the operator."""

    @staticmethod
    def forward(ctx, logits, targets, phi, mu, alpha, ignore_index, reduction, out_scale, float32_loss, into_logits):
        into_logits = into_logits and logits.dtype != torch.float16  # see _fuses_gradient
        fused = into_logits or _fuses_gradient(reduction, logits.dtype)
        loss, grad, stats = _forward_impl(logits, targets, phi, mu, alpha, ignore_index, reduction, out_scale,
                                          want_grad=fused, into_logits=into_logits, want_stats=not fused,
                                          float32_loss=float32_loss)
        if into_logits and grad is not None and grad.data_ptr() == logits.data_ptr():
            # The kernel overwrote the logits behind autograd's back: bump their version so that a node
            # that saved them (and would now read clobbered values) raises instead of going wrong.
            torch.autograd.graph.increment_version(logits)
        _save(ctx, fused, logits, targets, grad if fused else stats, reduction, (phi, mu, alpha, ignore_index,
                                                                                out_scale))
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        return (_backward(ctx, grad_loss),) + (None,) * 9


# ---------------------------------------------------------------------------------------------
# torch.library operators (what torch.compile traces; opcheck-ed)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("bisam::bisam_loss_forward", mutates_args=())
def _op_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    phi: int,
    mu: float,
    alpha: float,
    ignore_index: int,
    reduction: int,
    out_scale: float,
    float32_loss: bool,
    fuse_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, aux). With fuse_grad (the logits will need a gradient), aux is the gradient of the reduced
    loss for mean / sum, and the (2, N) row statistics the backward uses for none; else empty. The loss
    has the logits' dtype, float32 with float32_loss."""
    fused = fuse_grad and _fuses_gradient(reduction, logits.dtype)
    stats_wanted = fuse_grad and not fused
    loss, grad, stats = _forward_impl(logits, targets, phi, mu, alpha, ignore_index, reduction, out_scale, fused,
                                      want_stats=stats_wanted, float32_loss=float32_loss)
    aux = grad if fused else stats if stats_wanted else logits.new_empty((0,))
    return loss, aux


def _aux_meta(logits, fuse_grad, reduction):
    """(shape, dtype) of the forward operator's second output."""
    if not fuse_grad:
        return (0,), logits.dtype
    if not _fuses_gradient(reduction, logits.dtype):
        return (2, logits.shape[0]), accumulate_dtype(logits.dtype)  # the row statistics
    return logits.shape, logits.dtype


@_op_forward.register_fake
def _op_forward_fake(logits, targets, phi, mu, alpha, ignore_index, reduction, out_scale, float32_loss, fuse_grad):
    loss_shape = (logits.shape[0],) if reduction == _NONE else ()
    aux_shape, aux_dtype = _aux_meta(logits, fuse_grad, reduction)
    loss_dtype = torch.float32 if float32_loss else logits.dtype
    return logits.new_empty(loss_shape, dtype=loss_dtype), logits.new_empty(aux_shape, dtype=aux_dtype)


def _setup_op_forward(ctx, inputs, output):
    logits, targets, phi, mu, alpha, ignore_index, reduction, out_scale, float32_loss, fuse_grad = inputs
    ctx.mark_non_differentiable(output[1])
    _save(ctx, fuse_grad and _fuses_gradient(reduction, logits.dtype), logits, targets, output[1], reduction,
          (phi, mu, alpha, ignore_index, out_scale))


def _backward_op_forward(ctx, grad_loss, grad_grad):
    return (_backward(ctx, grad_loss),) + (None,) * 9


torch.library.register_autograd("bisam::bisam_loss_forward", _backward_op_forward, setup_context=_setup_op_forward)


@torch.library.custom_op("bisam::bisam_loss_row_grad", mutates_args=())
def _op_row_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    grad_rows: torch.Tensor,
    stats: torch.Tensor,
    phi: int,
    mu: float,
    alpha: float,
    ignore_index: int,
    out_scale: float,
) -> torch.Tensor:
    """Gradient of sum_i grad_rows[i] * l_i with respect to the logits (backward of reduction="none");
    stats: the forward's row statistics (spare wide rows a pass), or an empty tensor."""
    return _row_grad_impl(logits, targets, grad_rows, stats, phi, mu, alpha, ignore_index, out_scale)


@_op_row_grad.register_fake
def _op_row_grad_fake(logits, targets, grad_rows, stats, phi, mu, alpha, ignore_index, out_scale):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _check_scalar(name: str, value, positive: bool) -> float:
    """A real number (int, float, NumPy scalar) as a float. Under torch.compile(dynamic=True) a float argument
    arrives symbolic (a SymFloat): comparisons, not math.isfinite, so that the checks become guards."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not abs(value) < math.inf or (positive and not value > 0):  # (NaN fails both comparisons)
        raise ValueError(f"{name} must be finite{' and positive' if positive else ''}, got {value!r}")
    return value


def _check_options(phi, mu, alpha, reduction, ignore_index) -> tuple[float, float, int]:
    """The loss's options, checked once for the function and the module: (mu, alpha, ignore_index)."""
    if phi not in PHIS:
        raise ValueError(f"phi must be one of {sorted(PHIS)}, got {phi!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return _check_scalar("mu", mu, True), _check_scalar("alpha", alpha, True), int(ignore_index)


def _check_inputs(logits, targets, phi, mu, alpha, reduction, ignore_index):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a tensor, got {type(logits).__name__}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (N, K) or (..., K), got shape {tuple(logits.shape)}")
    if logits.shape[-1] < 1:
        raise ValueError(f"logits must have at least one class (K >= 1), got shape {tuple(logits.shape)}")
    if targets.dtype not in _TARGET_DTYPES:
        raise TypeError(f"targets must be int64 or int32, got {targets.dtype}")
    if targets.shape != logits.shape[:-1]:
        hint = ""
        if logits.dim() > 2 and targets.shape == logits.shape[:1] + logits.shape[2:]:
            hint = (" (it looks like logits with the classes in dimension 1, as F.cross_entropy takes them: "
                    "bisam_loss wants them last, pass logits.movedim(1, -1))")
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])} (logits' shape without the "
                         f"class dimension), got {tuple(targets.shape)}{hint}")
    if targets.device != logits.device:
        raise ValueError(f"targets are on {targets.device} but logits are on {logits.device}")
    return _check_options(phi, mu, alpha, reduction, ignore_index)


def bisam_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    phi: str = "log",
    mu: float = 1.0,
    alpha: float = 0.1,
    reduction: str = "mean",
    ignore_index: int = -100,
    scale_by_mu: bool = False,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """BiSAM's lower bound of the 0-1 loss, ``logsumexp_j mu * phi(z_j - z_y)`` per row (docs/design.md section 1).

    Args:
        logits: ``(N, K)``, or ``(..., K)`` with the classes in the *last* dimension (the layout of
            language-model logits, flattened to ``(-1, K)``; note ``F.cross_entropy`` wants the classes in
            dimension 1 of a ``(N, C, d1, ...)`` input). float32, bfloat16, float16 or float64 (float64
            runs the composite PyTorch path, also on CUDA). Any strides.
        targets: int64 or int32 class indices of shape ``logits.shape[:-1]``.
        phi: ``"log"`` (``1 - softplus(log(e - 1) - x)``) or ``"tanh"`` (``tanh(alpha * x)``).
        mu: the softmax temperature, finite and positive. alpha: the tanh slope (unused by ``"log"``).
        reduction: ``"mean"`` over non-ignored rows, ``"sum"``, or ``"none"`` (shape ``targets.shape``).
            As with ``F.cross_entropy``, the mean over zero non-ignored rows is NaN (its gradient is 0).
        ignore_index: rows with this target have loss 0 and gradient 0 and are not counted by the mean.
        scale_by_mu: divide by ``mu`` (the paper's ``l / mu``; off by default, as in the released code).
        inplace_backward: write the gradient into the logits' buffer instead of a new tensor (saves the
            memory of one logits-sized tensor). The logits' *values* are clobbered by the call: nothing may
            read them afterwards (a graph node that saved them raises at backward, through the version
            counter). Ignored under ``torch.compile``, when no gradient is needed, for float16 logits (see
            below), and for logits whose elements share memory (an expanded tensor).

    A target outside ``[0, K)`` that is not ``ignore_index`` raises ``ValueError`` on the CPU; on CUDA it
    makes that row's loss and gradient NaN (checking on the host would need a synchronisation).

    The loss has the logits' dtype, and float32 under ``torch.autocast`` (as ``F.cross_entropy`` and every
    loss on autocast's float32 list: a float16 loss times a GradScaler's 65536 would overflow); the
    gradient has the logits' dtype. Differentiable with respect to the logits, once (no double
    backward). For mean / sum the gradient is computed with the loss and kept; ``backward`` scales it in
    place by the incoming gradient (no work when it is 1). A second backward through the same graph
    (``retain_graph=True``) returns a new tensor scaled from the first factor (NaN if that factor was 0),
    and raises if the first backward's result was modified since (accumulated into ``.grad``, zeroed).
    float16 logits instead recompute the gradient in the backward, after the incoming gradient (an AMP
    loss scale) is known: a gradient rounded to float16 before the scale would flush to zero.
    """
    mu, alpha, ignore_index = _check_inputs(logits, targets, phi, mu, alpha, reduction, ignore_index)
    red = REDUCTIONS[reduction]
    out_scale = 1.0 / mu if scale_by_mu else 1.0
    K = logits.shape[-1]
    z = logits.reshape(-1, K)
    t = targets.reshape(-1)
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    float32_loss = logits.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(logits.device.type)
    args = (PHIS[phi], mu, alpha, ignore_index, red, out_scale, float32_loss)
    if torch.compiler.is_compiling():
        loss, _ = torch.ops.bisam.bisam_loss_forward(z, t, *args, needs_grad)
    elif needs_grad:
        loss = _BiSAMLossFunction.apply(z, t, *args, bool(inplace_backward))
    else:
        loss, _, _ = _forward_impl(z, t, *args[:-1], want_grad=False, float32_loss=float32_loss)
    return loss.reshape(targets.shape) if red == _NONE else loss


class BiSAMLoss(torch.nn.Module):
    """Module form of :func:`bisam_loss` (same arguments, fixed at construction)."""

    def __init__(self, phi: str = "log", mu: float = 1.0, alpha: float = 0.1, reduction: str = "mean",
                 ignore_index: int = -100, scale_by_mu: bool = False, inplace_backward: bool = False):
        super().__init__()
        self.mu, self.alpha, self.ignore_index = _check_options(phi, mu, alpha, reduction, ignore_index)
        self.phi, self.reduction = phi, reduction
        self.scale_by_mu, self.inplace_backward = bool(scale_by_mu), bool(inplace_backward)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return bisam_loss(logits, targets, self.phi, self.mu, self.alpha, self.reduction, self.ignore_index,
                          self.scale_by_mu, self.inplace_backward)

    def extra_repr(self) -> str:
        return (f"phi={self.phi!r}, mu={self.mu}, alpha={self.alpha}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}, scale_by_mu={self.scale_by_mu}")
