"""Triton kernels of the row losses: the fused BiSAM lower bound with its gradient, the count of valid
rows, the two-stage reduction and the in-place gradient scaling. The math is docs/design.md section 1;
the integer modes they take are named in ``modes.py`` (PHI 0 = tanh, 1 = log, 2 = identity: cross-entropy;
the scale, stats and finalize modes). Launched by ``launch.py`` only.
"""

try:  # the CPU path works without Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
    tl = None

from bisam_kernels.ops.row_loss.modes import GAMMA

if triton is not None:
    _GAMMA = tl.constexpr(GAMMA)

    @triton.jit
    def _phi_dphi(F, alpha, PHI: tl.constexpr):
        """(phi(F), phi'(F)) in float32, with core ops only, exact zero at F == 0.

        tanh: phi = tanh(a F) = sign(F) (1 - u) / (1 + u), phi' = a * 4u / (1 + u)^2, u = exp(-2|a F|) <= 1;
              below |a F| = 0.3, where 1 - u cancels (its error, times mu, reached 6e-4 of the gradient at
              mu = 1e5), phi is the Taylor series to x^13 (truncation < 1e-9 relative);
        log:  phi = 1 - softplus(t), t = GAMMA - F, softplus(t) = max(t, 0) + log(1 + exp(-|t|)),
              phi' = sigmoid(t). log(1 + u) instead of log1p(u) costs at most ~u < 2^-24 absolutely, below
              the rounding of 1 - softplus in float32, so no log1p correction is needed.
        identity: phi = F, phi' = 1 (with mu = 1 the row loss is the cross-entropy).
        """
        if PHI == 2:
            phi = F
            dphi = 1.0
        elif PHI == 0:
            x = alpha * F
            u = tl.exp(-2.0 * tl.abs(x))
            r = 1.0 / (1.0 + u)
            th = (1.0 - u) * r
            x2 = x * x
            series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (
                62.0 / 2835.0 + x2 * (-1382.0 / 155925.0 + x2 * (21844.0 / 6081075.0)))))))
            phi = tl.where(tl.abs(x) < 0.3, series, tl.where(x < 0.0, -th, th))
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
        smoothing,
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
        Label smoothing (identity phi only): the target distribution puts smoothing / K on every class and
        1 - smoothing more on the target, as F.cross_entropy's: the loss gains -smoothing * mean_j s_j
        (s_y = 0) and the gradient -smoothing * coef / K on every column, + smoothing * coef on the target.
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
            if PHI == 2:  # (label smoothing: the identity phi only; no registers spent on the others)
                sum_s = mu * tl.sum(tl.where(mask, phi, 0.0), axis=1)
        else:
            if stats_mode == 2:
                lse = tl.load(stats_ptr + rows, mask=live, other=0.0)
                ws = tl.load(stats_ptr + N + rows, mask=live, other=0.0)
                if PHI == 2:
                    sum_s = tl.zeros([ROWS], dtype=tl.float32)  # (the loss is not written from read statistics)
            else:
                # s_y = 0 is in every live row, so starting the running max at 0 gives the true max.
                m = tl.zeros([ROWS], dtype=tl.float32)
                S = tl.zeros([ROWS], dtype=tl.float32)
                W = tl.zeros([ROWS], dtype=tl.float32)
                if PHI == 2:
                    sum_s = tl.zeros([ROWS], dtype=tl.float32)
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
                    if PHI == 2:
                        sum_s += tl.sum(tl.where(mask, s, 0.0), axis=1)
                    m = m_new
                S = tl.where(live, S, 1.0)
                lse = m + tl.log(S)
                ws = W / S
        if stats_mode == 1:
            tl.store(stats_ptr + rows, lse, mask=row_ok)
            tl.store(stats_ptr + N + rows, ws, mask=row_ok)
        if PHI == 2:
            loss = (lse - smoothing * sum_s / K) * out_scale
        else:
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
        if PHI == 2:
            smooth = coef * (smoothing / K)  # the smoothing term on every column (0 without smoothing)
            gy = gy + smoothing * coef - smooth
            # Where p_y < 1/2, the target's p_y - s / K - (1 - s) from p_y = exp(-lse) (s_y = 0) instead: the
            # form from 1 - p_y above cancels there as s -> 1 (its error grew as K 2^-24). Per row: no tile work.
            from_py = (coef * tl.exp(-lse) - smooth) - coef * (1.0 - smoothing)
            gy = tl.where(ws > 0.5, from_py, gy)
        g_rows = g_ptr + rows64 * g_stride
        if SINGLE:
            g = c * (coef / S)[:, None]
            if PHI == 2:
                g = g - smooth[:, None]
            g = tl.where(is_y, gy[:, None], g)
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
                    if PHI == 2:
                        g = g - smooth[:, None]
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
