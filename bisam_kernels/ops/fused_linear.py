"""The output projection fused with the row loss: ``loss(hidden @ weight.T + bias, targets)`` for the BiSAM
lower bound (pass 1 of a BiSAM step) and for the cross-entropy (pass 2), without materialising the
``(N, V)`` logits or their gradient.

Structure (docs/design.md section 7): the rows are cut into chunks whose logits fit a memory budget. For
each chunk: ``z = h_c @ W.T + b`` (cuBLAS / the CPU BLAS through torch), the row kernel of
``ops/row_loss`` computes each row's loss and writes the gradient ``dz`` over ``z`` in place (Triton on
CUDA; the composite path on the CPU), then ``dh_c = dz @ W``, ``dW += dz.T @ h_c``, ``db += sum dz``.
The gradients are therefore computed in the forward (three matmuls in all, as the materialised path);
``backward`` scales them by the incoming gradient in place and touches nothing when it is 1.
``reduction="none"`` needs a different factor per row before the matmuls, so its forward only computes
the losses (and the row statistics, on the Triton path) and its backward runs the chunks again.

Cross-entropy is the same row kernel with the identity phi and mu = 1 (label smoothing as
``F.cross_entropy``'s). No host synchronisation on CUDA: the mean's count stays on the device.
"""

from __future__ import annotations

import numbers

import torch

from bisam_kernels._dtypes import accumulate_dtype
from bisam_kernels.ops.row_loss import dispatch, launch
from bisam_kernels.ops.row_loss.api import _check_options
from bisam_kernels.ops.row_loss.autograd import refuse_higher_order
from bisam_kernels.ops.row_loss.composite import composite_rows
from bisam_kernels.ops.row_loss.dispatch import device_of, scale_grad_impl, tracing, use_triton
from bisam_kernels.ops.row_loss.modes import (
    PHIS,
    REDUCTIONS,
    TARGET_DTYPES,
    TRITON_DTYPES,
    Phi,
    Reduction,
    ScaleMode,
    StatsMode,
)

__all__ = ["fused_linear_bisam_loss", "fused_linear_cross_entropy", "FusedLinearBiSAMLoss",
           "FusedLinearCrossEntropy", "default_chunk_rows"]

CHUNK_BYTES = 256 << 20  # a chunk's working set, at most (the memory budget)
# Logit-sized arrays a chunk holds at once: the Triton row kernel writes the gradient over the logits (1);
# the composite path (the CPU; float64 on CUDA) makes temporaries of the logits' size (about 4, measured
# peak / chunk logits).
WORKING_SET = {"triton": 1, "composite": 4}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def default_chunk_rows(n: int, v: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk: as many as keep a chunk's working set (its logits and the temporaries of their
    size) within the device's budget, balanced so that the last chunk is not a sliver."""
    triton_path = device.type == "cuda" and dtype in TRITON_DTYPES and dispatch.triton is not None
    most = max(1, CHUNK_BYTES // (WORKING_SET["triton" if triton_path else "composite"] * max(v, 1) * dtype.itemsize))
    chunks = max(1, -(-n // most))
    return max(1, -(-n // chunks))


def _fuses_count(reduction: int, dtype: torch.dtype) -> bool:
    """Whether the forward's gradient already carries the mean's 1 / count. Not for float16: the gradient
    of a logit, p / N, flushes to zero in float16 at language-model N; its factor is applied in the
    backward, in float32, on the (N, H) and (V, H) results instead."""
    return reduction == Reduction.MEAN and dtype != torch.float16


def _chunk_grad(z, t, params, row_scale, loss_rows, stats, stats_mode, want_grad):
    """The row loss of one chunk of logits z (C, V): writes loss_rows (C,) when given and returns the
    gradient of sum_i row_scale_i * l_i (over z's own buffer on the Triton path) or None.

    row_scale: None (1), a 0-dim count (1 / count) or a (C,) per-row factor."""
    phi, mu, alpha, smoothing, ignore_index = params
    if use_triton(z):
        if row_scale is None:
            mode = ScaleMode.ONE
        else:
            mode = ScaleMode.INV_COUNT if row_scale.dim() == 0 else ScaleMode.PER_ROW
        launch.launch_rows(z, t, phi=phi, mu=mu, alpha=alpha, out_scale=1.0, ignore_index=ignore_index,
                           loss_rows=loss_rows, grad=z if want_grad else None,
                           scale=None if row_scale is None else row_scale.reshape(-1), scale_mode=mode,
                           stats=stats, stats_mode=stats_mode, smoothing=smoothing)
        return z if want_grad else None
    if row_scale is None:
        factor = 1.0
    else:
        factor = row_scale.to(accumulate_dtype(z.dtype))
        factor = 1.0 / factor.clamp(min=1.0) if row_scale.dim() == 0 else factor
    # On the CPU each chunk's targets are checked on the host (free there; a bad one raises, compiled too),
    # which also lets the composite path skip the masking passes when a chunk has no ignored row.
    rows, g, _, _ = composite_rows(z, t, phi, mu, alpha, ignore_index, 1.0, factor, want_grad,
                                   check=z.device.type == "cpu", smoothing=smoothing)
    if loss_rows is not None:
        loss_rows.copy_(rows)
    return None if g is None else g.to(z.dtype)


def _weight_grad_dtype(weight_dtype: torch.dtype, accumulate_float32: bool) -> torch.dtype:
    """The dtype the weight's gradient is summed in over the chunks: float32 for float16 (whose unscaled
    sums can pass 65504) and where asked (bfloat16: one rounding per chunk otherwise), else the weight's."""
    if weight_dtype == torch.float16 or (accumulate_float32 and weight_dtype == torch.bfloat16):
        return torch.float32
    return weight_dtype


def _addmm_float32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (float32) += a @ b for half-precision a, b: on CUDA with cuBLAS's half-precision inputs and
    float32 output where this torch has that overload, else through float32 copies of a and b."""
    if acc.is_cuda and _mixed_addmm_ok(acc.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


_MIXED_ADDMM: dict = {}


def _mixed_addmm_ok(device: torch.device) -> bool:
    """Whether torch.addmm takes a float32 accumulator with half-precision factors here (the out_dtype
    overload of torch >= 2.8; its CUDA checks differ by version), tried once per device on 2 x 2 tensors."""
    if device not in _MIXED_ADDMM:
        try:
            acc = torch.zeros((2, 2), dtype=torch.float32, device=device)
            a = torch.ones((2, 2), dtype=torch.bfloat16, device=device)
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            _MIXED_ADDMM[device] = True
        except (RuntimeError, TypeError):
            _MIXED_ADDMM[device] = False
    return _MIXED_ADDMM[device]


def _run_chunks(hidden, weight, bias, t, params, chunk, *, row_scale=None, loss_rows=None, stats=None,
                stats_mode=StatsMode.NONE, grads=(False, False, False), accumulate_float32=False):
    """One pass over the row chunks (of ``chunk`` rows; 0: default_chunk_rows): each chunk's logits, its row loss and, for the gradients asked for
    (hidden, weight, bias), the matmuls that carry the chunk's logit gradient back. Returns the gradients
    (None where not asked): hidden's in its dtype, weight's in _weight_grad_dtype, bias's in float32.

    row_scale: None, the 0-dim count of the mean, or the (N,) per-row factors of reduction="none"."""
    N, V = hidden.shape[0], weight.shape[0]
    chunk = chunk or default_chunk_rows(N, V, hidden.dtype, hidden.device)
    want_grad = any(grads)
    gh = launch.empty(hidden.shape, hidden.dtype, hidden.device) if grads[0] else None
    gw = torch.zeros(weight.shape, dtype=_weight_grad_dtype(weight.dtype, accumulate_float32),
                     device=weight.device) if grads[1] else None
    gb = torch.zeros((V,), dtype=accumulate_dtype(weight.dtype), device=weight.device) if grads[2] else None
    buffer = torch.empty((min(chunk, N), V), dtype=hidden.dtype, device=hidden.device)
    for i0 in range(0, N, chunk):
        i1 = min(i0 + chunk, N)
        h = hidden[i0:i1]
        z = buffer[: i1 - i0]
        if bias is None:
            torch.mm(h, weight.t(), out=z)
        else:
            torch.addmm(bias, h, weight.t(), out=z)
        scale = row_scale if row_scale is None or row_scale.dim() == 0 else row_scale[i0:i1]
        chunk_stats = None if stats is None else stats[2 * i0: 2 * i1]  # (2, C) of this chunk, flat
        dz = _chunk_grad(z, t[i0:i1], params, scale, None if loss_rows is None else loss_rows[i0:i1],
                         chunk_stats, stats_mode, want_grad)
        if not want_grad:
            continue
        if gh is not None:
            torch.mm(dz, weight, out=gh[i0:i1])
        if gw is not None:
            if gw.dtype == dz.dtype:
                gw.addmm_(dz.t(), h)
            else:
                _addmm_float32_(gw, dz.t(), h)
        if gb is not None:
            gb.add_(dz.sum(dim=0, dtype=gb.dtype))
    return gh, gw, gb


def _no_autocast(x: torch.Tensor):
    """The inputs arrive in their final dtypes (cast by the API): the matmuls must not be cast again."""
    return torch.autocast(x.device.type, enabled=False)


def _empty_like_none(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((0,))


def _forward(hidden, weight, bias, targets, phi, mu, alpha, smoothing, ignore_index, reduction, grad_hidden,
             grad_weight, grad_bias, chunk_rows, accumulate_float32):
    """(loss (float32; float64 for float64), grad_hidden, grad_weight, grad_bias, row statistics); unrequested outputs are empty.

    mean / sum: the gradients of the reduced loss (of the sum for float16's mean: see _fuses_count);
    none: no gradients, the row statistics for the backward's second pass (Triton path; else empty)."""
    N = hidden.shape[0]
    t = targets.contiguous()
    params = (phi, mu, alpha, smoothing, ignore_index)
    grads = (grad_hidden, grad_weight, grad_bias and bias is not None)
    none = reduction == Reduction.NONE
    count = (t != ignore_index).sum(dtype=torch.float32) if reduction == Reduction.MEAN else None
    loss_rows = launch.empty((N,), accumulate_dtype(hidden.dtype), hidden.device)
    stats = None
    if none and any(grads) and use_triton(hidden):
        stats = launch.empty((2 * N,), torch.float32, hidden.device)
    with device_of(hidden), _no_autocast(hidden):
        gh, gw, gb = _run_chunks(
            hidden, weight, bias, t, params, chunk_rows, loss_rows=loss_rows, stats=stats,
            stats_mode=StatsMode.NONE if stats is None else StatsMode.WRITE,
            row_scale=count if _fuses_count(reduction, hidden.dtype) else None,
            grads=(False, False, False) if none else grads, accumulate_float32=accumulate_float32)
    if none:
        loss = loss_rows
    elif count is None:
        loss = loss_rows.sum()
    else:
        loss = loss_rows.sum() / count  # NaN when every row is ignored, as F.cross_entropy's
    if stats is None:
        stats = hidden.new_empty((0,), dtype=torch.float32)
    return (loss,) + tuple(_empty_like_none(hidden) if x is None else x for x in (gh, gw, gb)) + (stats,)


@torch.library.custom_op("bisam::fused_linear_loss", mutates_args=())
def _op_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    phi: int,
    mu: float,
    alpha: float,
    smoothing: float,
    ignore_index: int,
    reduction: int,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
    chunk_rows: int,
    accumulate_float32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias, row statistics): hidden (N, H), weight (V, H), bias (V,)
    or None, targets (N,). The gradients asked for, of the reduced loss, for mean / sum; see _forward."""
    return _forward(hidden, weight, bias, targets, phi, mu, alpha, smoothing, ignore_index, reduction,
                    grad_hidden, grad_weight, grad_bias, chunk_rows, accumulate_float32)


def _grad_meta(hidden, weight, bias, reduction, grad_hidden, grad_weight, grad_bias, accumulate_float32):
    """(shape, dtype) of the forward's gradient outputs and statistics."""
    none = reduction == Reduction.NONE
    empty = ((0,), hidden.dtype)
    gw_dtype = _weight_grad_dtype(weight.dtype, accumulate_float32)
    return [
        (hidden.shape, hidden.dtype) if grad_hidden and not none else empty,
        (weight.shape, gw_dtype) if grad_weight and not none else empty,
        ((weight.shape[0],), accumulate_dtype(weight.dtype)) if grad_bias and bias is not None and not none
        else empty,
    ]


@_op_forward.register_fake
def _op_forward_fake(hidden, weight, bias, targets, phi, mu, alpha, smoothing, ignore_index, reduction, grad_hidden,
                     grad_weight, grad_bias, chunk_rows, accumulate_float32):
    none = reduction == Reduction.NONE
    loss = hidden.new_empty((hidden.shape[0],) if none else (), dtype=accumulate_dtype(hidden.dtype))
    grads = [hidden.new_empty(shape, dtype=dtype) for shape, dtype in
             _grad_meta(hidden, weight, bias, reduction, grad_hidden, grad_weight, grad_bias, accumulate_float32)]
    want = grad_hidden or grad_weight or (grad_bias and bias is not None)
    stats_shape = (2 * hidden.shape[0],) if none and want and use_triton(hidden) else (0,)
    return (loss, *grads, hidden.new_empty(stats_shape, dtype=torch.float32))


@torch.library.custom_op("bisam::fused_linear_loss_row_grad", mutates_args=())
def _op_row_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    grad_rows: torch.Tensor,
    stats: torch.Tensor,
    phi: int,
    mu: float,
    alpha: float,
    smoothing: float,
    ignore_index: int,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
    chunk_rows: int,
    accumulate_float32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_i grad_rows[i] * l_i (the backward of reduction="none"): the chunks run again, the
    row kernel reading the forward's row statistics (stats, or empty) instead of a first pass."""
    grads = (grad_hidden, grad_weight, grad_bias and bias is not None)
    stats_mode = StatsMode.READ if stats.numel() else StatsMode.NONE
    with device_of(hidden), _no_autocast(hidden):
        out = _run_chunks(hidden, weight, bias, targets.contiguous(), (phi, mu, alpha, smoothing, ignore_index),
                          chunk_rows, row_scale=grad_rows.to(accumulate_dtype(hidden.dtype)).contiguous(),
                          stats=stats if stats.numel() else None, stats_mode=stats_mode, grads=grads,
                          accumulate_float32=accumulate_float32)
    return tuple(_empty_like_none(hidden) if x is None else x for x in out)


@_op_row_grad.register_fake
def _op_row_grad_fake(hidden, weight, bias, targets, grad_rows, stats, phi, mu, alpha, smoothing, ignore_index,
                      grad_hidden, grad_weight, grad_bias, chunk_rows, accumulate_float32):
    return tuple(hidden.new_empty(shape, dtype=dtype) for shape, dtype in
                 _grad_meta(hidden, weight, bias, Reduction.MEAN, grad_hidden, grad_weight, grad_bias,
                            accumulate_float32))


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, targets, phi, mu, alpha, smoothing, ignore_index, reduction, grad_hidden, grad_weight,
     grad_bias, chunk_rows, accumulate_float32) = inputs
    loss, gh, gw, gb, stats = output
    ctx.mark_non_differentiable(gh, gw, gb, stats)
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.args = (phi, mu, alpha, smoothing, ignore_index, grad_hidden, grad_weight, grad_bias, chunk_rows,
                accumulate_float32)
    ctx.backward_done = False
    if reduction == Reduction.NONE:
        ctx.save_for_backward(hidden, weight, bias, targets, stats)
    else:
        # Attributes, not saved tensors: the eager backward scales them in place.
        ctx.grads = (gh, gw, gb)
        ctx.targets = targets if not _fuses_count(reduction, hidden.dtype) and reduction == Reduction.MEAN else None


def _scale(grad: torch.Tensor, factor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """grad * factor (0-dim; None: 1) in dtype: in place (nothing touched when the factor is 1) when eager
    and grad already has that dtype; a new tensor under tracing (functional) or when the dtype changes."""
    if factor is None:
        return grad.to(dtype)
    if grad.dtype == dtype and not tracing(grad):
        scale_grad_impl(grad.view(-1, grad.shape[-1]), factor)  # (2-D: (N, H), (V, H); the bias as (1, V))
        return grad
    return (grad.to(accumulate_dtype(grad.dtype)) * factor.to(accumulate_dtype(grad.dtype))).to(dtype)


_N_INPUTS = 15  # of bisam::fused_linear_loss


def _backward(ctx, grad_loss, *unused):
    if grad_loss is None:
        return (None,) * _N_INPUTS
    refuse_higher_order("the fused linear loss")
    if ctx.backward_done:
        raise RuntimeError("fused linear loss: the gradients are computed in the forward and handed over by the "
                           "first backward; a second backward through the same graph (retain_graph=True) is "
                           "not supported: recompute the loss")
    ctx.backward_done = True
    phi, mu, alpha, smoothing, ignore_index, grad_hidden, grad_weight, grad_bias, chunk_rows, accumulate_float32 = ctx.args
    h_dtype, w_dtype, b_dtype = ctx.dtypes
    if ctx.reduction == Reduction.NONE:
        hidden, weight, bias, targets, stats = ctx.saved_tensors
        gh, gw, gb = torch.ops.bisam.fused_linear_loss_row_grad(
            hidden, weight, bias, targets, grad_loss, stats, phi, mu, alpha, smoothing, ignore_index,
            grad_hidden, grad_weight, grad_bias, chunk_rows, accumulate_float32)
        factor = None
    else:
        gh, gw, gb = ctx.grads
        factor = grad_loss
        if ctx.targets is not None:  # float16's mean: the 1 / count not yet applied
            factor = grad_loss.to(torch.float32) / (ctx.targets != ignore_index).sum(dtype=torch.float32).clamp(min=1)
        ctx.grads = None  # (the references go with the returned gradients)
    out = [None] * _N_INPUTS
    if grad_hidden:
        out[0] = _scale(gh, factor, h_dtype)
    if grad_weight:
        out[1] = _scale(gw, factor, w_dtype)
    if grad_bias and b_dtype is not None:
        out[2] = _scale(gb, factor, b_dtype)
    return tuple(out)


torch.library.register_autograd("bisam::fused_linear_loss", _backward, setup_context=_setup_context)


_ORDER = " (the arguments are (hidden (..., H), weight (V, H), targets (...), bias (V,) or None))"


def _check(hidden, weight, bias, targets, chunk_rows):
    for name, x in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must have shape (N, H) or (..., H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        hint = _ORDER
        if weight.dim() == 2 and weight.shape[0] == hidden.shape[-1]:
            hint = " (it looks transposed: pass the head's weight as nn.Linear holds it, not weight.T)"
        elif weight.dim() == 2:
            hint = (" (is the first argument the hidden states (..., H), not the logits? " + _ORDER.strip(" ()")
                    + ")")
        raise ValueError(f"weight must have shape (V, H) with V >= 1 and H = hidden.shape[-1] = "
                         f"{hidden.shape[-1]} (the nn.Linear layout), got {tuple(weight.shape)}{hint}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}{_ORDER}")
    for name, x in (("weight", weight), ("bias", bias)):
        if x is not None and x.dtype != hidden.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but hidden has {hidden.dtype} (under torch.autocast "
                            "they are cast to the autocast dtype)")
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but hidden is on {hidden.device}")
    if targets.dtype not in TARGET_DTYPES:
        raise TypeError(f"targets must be int64 or int32, got {targets.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden's shape without the last "
                         f"dimension), got {tuple(targets.shape)}{_ORDER}")
    if targets.device != hidden.device:
        raise ValueError(f"targets are on {targets.device} but hidden is on {hidden.device}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, numbers.Integral)
                                   or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")


def _autocast(hidden, weight, bias):
    """Under torch.autocast the projection runs in the autocast dtype, as nn.Linear's."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    cast = (lambda x: x if x is None or not x.is_floating_point() else x.to(dtype))
    return cast(hidden), cast(weight), cast(bias)


def _check_accum_dtype(accum_dtype) -> bool:
    """Whether the weight's gradient is to be summed in float32 (accum_dtype None or torch.float32)."""
    if accum_dtype is not None and accum_dtype != torch.float32:
        raise ValueError(f"accum_dtype must be None (the weight's dtype; float32 for float16) or torch.float32, "
                         f"got {accum_dtype!r}")
    return accum_dtype is not None


def _fused_linear_loss(hidden, weight, targets, bias, phi, mu, alpha, smoothing, reduction, ignore_index,
                       chunk_rows, accum_dtype):
    accumulate_float32 = _check_accum_dtype(accum_dtype)
    hidden, weight, bias = _autocast(hidden, weight, bias)
    _check(hidden, weight, bias, targets, chunk_rows)
    H, V = hidden.shape[-1], weight.shape[0]
    h = hidden.reshape(-1, H)
    t = targets.reshape(-1)
    chunk = 0 if chunk_rows is None else int(chunk_rows)  # 0: chosen inside the op (no guard on N when compiled)
    enabled = torch.is_grad_enabled()
    wants = (enabled and hidden.requires_grad, enabled and weight.requires_grad,
             enabled and bias is not None and bias.requires_grad)
    red = REDUCTIONS[reduction]
    loss = torch.ops.bisam.fused_linear_loss(h, weight, bias, t, int(phi), mu, alpha, float(smoothing), ignore_index,
                                             int(red), *wants, chunk, accumulate_float32)[0]
    return loss.reshape(targets.shape) if red == Reduction.NONE else loss


def fused_linear_bisam_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            bias: torch.Tensor | None = None, phi: str = "log", mu: float = 1.0, alpha: float = 0.1,
                            reduction: str = "mean", ignore_index: int = -100,
                            chunk_rows: int | None = None, accum_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``bk.bisam_loss(F.linear(hidden, weight, bias), targets, ...)`` without the ``(N, V)`` logits.

    Args:
        hidden: ``(N, H)`` or ``(..., H)`` (any strides); float32, bfloat16, float16 or float64.
        weight: ``(V, H)``, the ``nn.Linear`` layout (an LM head; tied embeddings included), hidden's dtype.
        targets: int64 / int32 of shape ``hidden.shape[:-1]``. bias: ``(V,)`` or None.
        phi, mu, alpha, reduction, ignore_index: as :func:`bisam_kernels.bisam_loss`.
        chunk_rows: rows per chunk; default: a chunk's working set (its logits, and on the CPU the
            temporaries of their size) within 256 MiB.
        accum_dtype: None or ``torch.float32``: the dtype the weight's gradient is summed in over the
            chunks. None: the weight's (float32 for float16). In bfloat16 each chunk's sum is rounded
            once, so the weight gradient's error grows with the number of chunks (measured at 16 chunks:
            2.5x the error of the materialised bfloat16 path); ``torch.float32`` keeps it at one rounding
            for ``4 * V * H`` bytes more (a float32 copy of the weight's gradient until the backward), as
            Liger-Kernel's ``accum_dtype`` and Cut Cross-Entropy's ``accum_c_fp32`` do.

    When any input requires a gradient the forward computes the gradients too (the logits are gone by
    the backward): evaluate under ``torch.no_grad()``, or it costs the gradient matmuls as well.
    Differentiable in hidden, weight and bias once: a second backward through the same graph
    (``retain_graph=True``) raises, and there is no double backward. ``scale_by_mu`` is not offered
    (divide the loss by ``mu``). A target outside ``[0, V)`` that is not ``ignore_index`` raises on the
    CPU (also under ``torch.compile``); on CUDA its row's loss and gradients are NaN (no host sync).
    The loss is float32 (float64 for float64 inputs),
    with float32 math whatever the input dtype; the gradients have the inputs' dtypes. Under ``torch.autocast`` the inputs are cast to the
    autocast dtype first, as ``nn.Linear`` does. For mean / sum the gradients are computed in the forward
    (they take the memory of the gradients from then on, not of the logits).
    """
    mu, alpha, ignore_index = _check_options(phi, mu, alpha, reduction, ignore_index)
    return _fused_linear_loss(hidden, weight, targets, bias, PHIS[phi], mu, alpha, 0.0, reduction, ignore_index,
                              chunk_rows, accum_dtype)


def _check_smoothing(label_smoothing) -> float:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real) or not (
            0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    return float(label_smoothing)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               bias: torch.Tensor | None = None, label_smoothing: float = 0.0,
                               reduction: str = "mean", ignore_index: int = -100,
                               chunk_rows: int | None = None, accum_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), targets, label_smoothing=...)`` (classes last)
    without the ``(N, V)`` logits: the row kernel of :func:`fused_linear_bisam_loss` with the identity phi.
    Label smoothing as PyTorch's (``s / V`` on every class). Arguments as :func:`fused_linear_bisam_loss`."""
    smoothing = _check_smoothing(label_smoothing)
    _, _, ignore_index = _check_options("log", 1.0, 1.0, reduction, ignore_index)
    return _fused_linear_loss(hidden, weight, targets, bias, Phi.IDENTITY, 1.0, 1.0, smoothing, reduction,
                              ignore_index, chunk_rows, accum_dtype)


class FusedLinearBiSAMLoss(torch.nn.Module):
    """Module form of :func:`fused_linear_bisam_loss`: ``forward(hidden, weight, targets, bias=None)``."""

    def __init__(self, phi: str = "log", mu: float = 1.0, alpha: float = 0.1, reduction: str = "mean",
                 ignore_index: int = -100, chunk_rows: int | None = None, accum_dtype: torch.dtype | None = None):
        super().__init__()
        self.mu, self.alpha, self.ignore_index = _check_options(phi, mu, alpha, reduction, ignore_index)
        _check_accum_dtype(accum_dtype)
        self.phi, self.reduction, self.chunk_rows, self.accum_dtype = phi, reduction, chunk_rows, accum_dtype

    def forward(self, hidden, weight, targets, bias=None):
        return fused_linear_bisam_loss(hidden, weight, targets, bias, self.phi, self.mu, self.alpha, self.reduction,
                                       self.ignore_index, self.chunk_rows, self.accum_dtype)

    def extra_repr(self) -> str:
        return f"phi={self.phi!r}, mu={self.mu}, alpha={self.alpha}, reduction={self.reduction!r}"


class FusedLinearCrossEntropy(torch.nn.Module):
    """Module form of :func:`fused_linear_cross_entropy`: ``forward(hidden, weight, targets, bias=None)``."""

    def __init__(self, label_smoothing: float = 0.0, reduction: str = "mean", ignore_index: int = -100,
                 chunk_rows: int | None = None, accum_dtype: torch.dtype | None = None):
        super().__init__()
        self.label_smoothing = _check_smoothing(label_smoothing)
        _, _, self.ignore_index = _check_options("log", 1.0, 1.0, reduction, ignore_index)
        _check_accum_dtype(accum_dtype)
        self.reduction, self.chunk_rows, self.accum_dtype = reduction, chunk_rows, accum_dtype

    def forward(self, hidden, weight, targets, bias=None):
        return fused_linear_cross_entropy(hidden, weight, targets, bias, self.label_smoothing, self.reduction,
                                          self.ignore_index, self.chunk_rows, self.accum_dtype)

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}"
