"""The composite PyTorch implementation of the row-loss operators: the CPU path, float64, and CUDA without
Triton. Same outputs as the Triton kernels (row statistics included), in the accumulate dtype.
"""

import math

import torch

from bisam_kernels._dtypes import accumulate_dtype
from bisam_kernels.ops.row_loss.modes import GAMMA, Phi, Reduction


def check_targets(t: torch.Tensor, K: int, ignore_index: int, ignored: torch.Tensor | None = None) -> int:
    """Raise ValueError for a target outside [0, K) that is not ignore_index (reads on the host: CPU only).
    Returns the number of ignored targets."""
    ignored = t == ignore_index if ignored is None else ignored
    n_ignored = int(ignored.sum())
    idx = torch.where(ignored, 0, t) if n_ignored else t
    if idx.numel():
        lo, hi = torch.aminmax(idx)
        if int(lo) < 0 or int(hi) >= K:
            first = int(idx[(idx < 0) | (idx >= K)][0])
            raise ValueError(f"targets must lie in [0, {K}) or equal ignore_index={ignore_index}, got {first}")
    return n_ignored


def composite_rows(z, t, phi, mu, alpha, ignore_index, out_scale, row_scale, want_grad, check, mean=False,
                    want_stats=False, smoothing=0.0):
    """(per-row loss, gradient of sum_i row_scale_i * l_i or None, count, row statistics or None), in the
    compute dtype.

    row_scale: a float or an (N,) tensor; with mean, also divided by count, the number of non-ignored
    rows (else count is None). smoothing: label smoothing, identity phi only (see the kernel). Row statistics: (2, N), lse and sum_{j != y} p_j phi'(F_j), as the kernel's. check (CPU only: it reads values on the host): raise ValueError for a
    target outside [0, K) that is not ignore_index; without it such a row gets a NaN loss and gradient,
    as in the Triton kernel.
    """
    K = z.shape[1]
    ignored = t == ignore_index
    bad, count = None, None
    if check:  # host-side checks are free on the CPU: skip the masking when no row is ignored
        n_ignored = check_targets(t, K, ignore_index, ignored)
        idx = torch.where(ignored, 0, t) if n_ignored else t
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
    if phi == Phi.IDENTITY:
        s = torch.sub(z, zy).mul_(mu)
        dscale = 1.0
    elif phi == Phi.TANH:
        th = torch.sub(z, zy).mul_(alpha).tanh_()  # phi(F); exactly 0 at the target column
        s = th * mu
        dscale = alpha
    else:
        t_ = torch.sub(zy, z).add_(GAMMA)  # GAMMA - F (-F first: exact where z is close to z_y)
        s = torch.nn.functional.softplus(t_).mul_(-mu).add_(mu).scatter_(1, idx, 0.0)  # mu phi(F), s_y = 0
        dscale = 1.0
    smooth_loss = s.sum(dim=1).mul_(smoothing / K) if smoothing else None  # smoothing * mean_j s_j
    m = s.amax(dim=1, keepdim=True)
    e = s.sub_(m).exp_()  # exp(s - m)
    S = e.sum(dim=1)
    lse = S.log().add_(m.squeeze(1))
    loss = lse if smooth_loss is None else lse - smooth_loss
    loss = loss if out_scale == 1.0 else loss * out_scale
    if dead is not None:
        loss = loss.masked_fill(dead, 0.0)
    if bad is not None:
        loss.masked_fill_(bad, float("nan"))
    if not (want_grad or want_stats):
        return loss, None, count, None
    if phi == Phi.IDENTITY:
        c = e
    elif phi == Phi.TANH:  # e * phi' / alpha = e * (1 - tanh^2), as PyTorch's tanh backward (error < 2^-23)
        c = e.addcmul_(e, th.square_(), value=-1.0)
    else:  # e * sigmoid(GAMMA - F)
        c = e.mul_(t_.sigmoid_())
    e_y = c.gather(1, idx).squeeze(1) if smoothing else None  # (identity phi: c is e)
    c.scatter_(1, idx, 0.0)  # c_j = e_j phi'(F_j) / dscale for j != y
    W = c.sum(dim=1)
    small_py = W > 0.5 * S if smoothing else None  # p_y < 1/2 (W becomes the target's gradient below)
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
    g = c.mul_(coef.unsqueeze(1))
    if smoothing:  # coef * S: the row's factor without the softmax normalisation
        smooth = coef * S * (smoothing / K)
        # The target's p_y - s / K - (1 - s): from 1 - p_y (W) where p_y >= 1/2, from p_y itself below, where
        # s - (1 - p_y) would cancel as s -> 1 (its error grew as K 2^-24).
        from_py = (e_y * coef - smooth) - coef * S * (1.0 - smoothing)
        gy.add_(coef * S * smoothing - smooth)
        gy = torch.where(small_py, from_py, gy)
        g.sub_(smooth.unsqueeze(1))
    g.scatter_(1, idx, gy.unsqueeze(1))
    if dead is not None:  # (also for non-finite logits in those rows)
        g.masked_fill_(dead.unsqueeze(1), 0.0)
    if bad is not None:
        g.masked_fill_(bad.unsqueeze(1), float("nan"))
    return loss, g, count, stats


def composite_forward(z, t, phi, mu, alpha, ignore_index, reduction, out_scale, want_grad, want_stats,
                       loss_dtype=None):
    """(loss in loss_dtype (default z.dtype), gradient of the reduced loss in z.dtype or None, row statistics
    or None)."""
    rows, g, count, stats = composite_rows(z, t, phi, mu, alpha, ignore_index, out_scale, 1.0, want_grad,
                                            check=z.device.type == "cpu", mean=reduction == Reduction.MEAN,
                                            want_stats=want_stats)
    if reduction == Reduction.NONE:
        loss = rows
    else:
        loss = rows.sum() / count if count is not None else rows.sum()
    return loss.to(loss_dtype or z.dtype), None if g is None else g.to(z.dtype), stats


def composite_scale_grad_(g: torch.Tensor, go: torch.Tensor) -> torch.Tensor:
    if g.device.type == "cpu" and go.dim() == 0:  # host-side check (free on the CPU), as the kernel's
        factor = go.item()
        if factor != 1.0:
            g.mul_(factor)
        return go.clone()
    factor = go.to(accumulate_dtype(g.dtype)).reshape(-1, 1)
    g.copy_(g.to(factor.dtype) * factor)
    return go.clone()
