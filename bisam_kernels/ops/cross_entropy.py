"""Cross-entropy for the second pass, with the classes last and both conventions of label smoothing.

* ``style="pytorch"``: ``F.cross_entropy(label_smoothing=s)``: the target distribution puts ``s / K`` on
  every class and ``1 - s`` more on the target.
* ``style="released"``: the BiSAM (and SAM) release's ``smooth_crossentropy``: ``1 - s`` on the target,
  ``s / (K - 1)`` on each other class, and the loss is the KL divergence from that distribution (the
  cross-entropy minus the distribution's entropy, a constant: the gradient is the cross-entropy's).

Logits are ``(N, K)`` or ``(..., K)`` with the classes in the last dimension, as :func:`bisam_loss` takes
them (the language-model layout; ``F.cross_entropy`` wants them in dimension 1).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from bisam_kernels._dtypes import accumulate_dtype

__all__ = ["cross_entropy", "smooth_cross_entropy", "SMOOTHING_STYLES"]

SMOOTHING_STYLES = ("pytorch", "released")


def _rows(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits as (rows, K), targets as (rows,) indices or (rows, K) probabilities)."""
    K = logits.shape[-1]
    if targets.is_floating_point():
        return logits.reshape(-1, K), targets.reshape(-1, K)
    return logits.reshape(-1, K), targets.reshape(-1)


def _reduce(rows: torch.Tensor, valid: torch.Tensor, reduction: str, shape) -> torch.Tensor:
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(shape)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum()  # NaN when every row is ignored, as F.cross_entropy


def smooth_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.1,
                         reduction: str = "mean", ignore_index: int = -100) -> torch.Tensor:
    """The released ``smooth_crossentropy``: KL divergence from ``1 - s`` on the target and ``s / (K - 1)``
    on each other class to ``softmax(logits)``, per row; float32 math (float64 for float64 logits) and
    a float32 result for lower-precision logits. Rows whose target is ``ignore_index`` count for nothing.
    """
    _check_common(logits, targets, smoothing, reduction)
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"smooth_cross_entropy takes class indices as targets (int64 or int32), got {targets.dtype}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    K = logits.shape[-1]
    if K == 1 and smoothing > 0:  # s / (K - 1) on no other class: the target distribution would sum to 1 - s
        raise ValueError(f"label smoothing {smoothing} needs at least 2 classes in the released style, got 1")
    z, t = _rows(logits, targets)
    acc = accumulate_dtype(logits.dtype)
    valid = t != ignore_index
    log_p = torch.log_softmax(z.to(acc), dim=-1)
    log_p_y = log_p.gather(1, torch.where(valid, t, 0).long().unsqueeze(1)).squeeze(1)
    on_target, off_target = 1.0 - smoothing, (smoothing / (K - 1) if K > 1 else 0.0)  # (K = 1: smoothing 0)

    def xlogx(x: float) -> float:
        return x * math.log(x) if x > 0 else 0.0

    entropy_term = xlogx(on_target) + (K - 1) * xlogx(off_target)  # sum_j t_j log t_j, a constant
    rows = entropy_term - on_target * log_p_y - off_target * (log_p.sum(dim=1) - log_p_y)
    return _reduce(rows, valid, reduction, logits.shape[:-1])


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0,
                  style: str = "pytorch", reduction: str = "mean", ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy with the classes last, label smoothing in either style (see the module docstring).

    Targets: class indices of shape ``logits.shape[:-1]``, or (``style="pytorch"``) class probabilities of
    the logits' shape.
    """
    if style not in SMOOTHING_STYLES:
        raise ValueError(f"label smoothing style must be one of {SMOOTHING_STYLES}, got {style!r}")
    if style == "released":
        return smooth_cross_entropy(logits, targets, label_smoothing, reduction, ignore_index)
    _check_common(logits, targets, label_smoothing, reduction)
    z, t = _rows(logits, targets)
    if t.dtype == torch.int32:  # (bisam_loss takes int32 class indices; F.cross_entropy wants int64)
        t = t.long()
    loss = F.cross_entropy(z, t, label_smoothing=label_smoothing, ignore_index=ignore_index, reduction=reduction)
    return loss.reshape(logits.shape[:-1]) if reduction == "none" else loss


def _check_common(logits, targets, smoothing, reduction) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("logits and targets must be tensors")
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (N, K) or (..., K), got shape {tuple(logits.shape)}")
    expected = logits.shape if targets.is_floating_point() else logits.shape[:-1]
    if targets.shape != expected:
        hint = ""
        if not targets.is_floating_point() and targets.shape == logits.shape[:1] + logits.shape[2:]:
            hint = " (the classes go last: pass logits.movedim(1, -1))"
        raise ValueError(f"targets must have shape {tuple(expected)} for logits of shape {tuple(logits.shape)}, "
                         f"got {tuple(targets.shape)}{hint}")
    if isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real) or not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"label smoothing must be a number in [0, 1], got {smoothing!r}")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be one of ['mean', 'none', 'sum'], got {reduction!r}")
