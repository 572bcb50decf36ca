"""Autograd of the BiSAM loss, shared by the eager ``autograd.Function`` and the ``torch.library``
operators (``bisam::bisam_loss_forward``, ``bisam::bisam_loss_row_grad``) that torch.compile traces.
"""

import torch

from bisam_kernels._dtypes import accumulate_dtype
from bisam_kernels.ops.row_loss.dispatch import (
    forward_impl,
    fuses_gradient,
    row_grad_impl,
    scale_grad_impl,
    tracing,
)
from bisam_kernels.ops.row_loss.modes import Reduction

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
    if tracing(grad):
        return _scaled(grad, grad_output)
    if ctx.first_grad_output is None:
        ctx.first_grad_output = scale_grad_impl(grad, grad_output)
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
    if ctx.reduction == Reduction.MEAN:
        grad_rows = grad_rows / (targets != ignore_index).sum()
    args = (logits, targets, grad_rows, stats, phi, mu, alpha, ignore_index, out_scale)
    return torch.ops.bisam.bisam_loss_row_grad(*args) if tracing(logits) else row_grad_impl(*args)


def refuse_higher_order(name: str) -> None:
    """Under backward(create_graph=True) grad mode is on in a backward: the gradient these losses return
    is computed without a graph, so a Hessian-vector product or a gradient penalty through them would
    silently miss their curvature. (once_differentiable only catches a grad_output that requires grad.)"""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(f"{name} is differentiable once: backward(create_graph=True) and double backward "
                           "through it are not supported; for higher-order derivatives use plain torch "
                           "operations (bisam_kernels.references.bisam_loss_eager, F.cross_entropy)")


class BiSAMLossFunction(torch.autograd.Function):
    """Eager autograd (no dispatcher round trip: a torch.library custom op costs tens of microseconds
    per call in Python, more than the kernels at small sizes). torch.compile uses the operator."""

    @staticmethod
    def forward(ctx, logits, targets, phi, mu, alpha, ignore_index, reduction, out_scale, float32_loss, into_logits):
        into_logits = into_logits and logits.dtype != torch.float16  # see _fuses_gradient
        fused = into_logits or fuses_gradient(reduction, logits.dtype)
        loss, grad, stats = forward_impl(logits, targets, phi, mu, alpha, ignore_index, reduction, out_scale,
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
    def backward(ctx, grad_loss):
        refuse_higher_order("bisam_loss")
        with torch.no_grad():
            return (_backward(ctx, grad_loss),) + (None,) * 9


# torch.library operators: what torch.compile traces (opcheck-ed)


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
    fused = fuse_grad and fuses_gradient(reduction, logits.dtype)
    stats_wanted = fuse_grad and not fused
    loss, grad, stats = forward_impl(logits, targets, phi, mu, alpha, ignore_index, reduction, out_scale, fused,
                                      want_stats=stats_wanted, float32_loss=float32_loss)
    aux = grad if fused else stats if stats_wanted else logits.new_empty((0,))
    return loss, aux


def _aux_meta(logits, fuse_grad, reduction):
    """(shape, dtype) of the forward operator's second output."""
    if not fuse_grad:
        return (0,), logits.dtype
    if not fuses_gradient(reduction, logits.dtype):
        return (2, logits.shape[0]), accumulate_dtype(logits.dtype)  # the row statistics
    return logits.shape, logits.dtype


@_op_forward.register_fake
def _op_forward_fake(logits, targets, phi, mu, alpha, ignore_index, reduction, out_scale, float32_loss, fuse_grad):
    loss_shape = (logits.shape[0],) if reduction == Reduction.NONE else ()
    aux_shape, aux_dtype = _aux_meta(logits, fuse_grad, reduction)
    loss_dtype = torch.float32 if float32_loss else logits.dtype
    return logits.new_empty(loss_shape, dtype=loss_dtype), logits.new_empty(aux_shape, dtype=aux_dtype)


def _setup_op_forward(ctx, inputs, output):
    logits, targets, phi, mu, alpha, ignore_index, reduction, out_scale, float32_loss, fuse_grad = inputs
    ctx.mark_non_differentiable(output[1])
    _save(ctx, fuse_grad and fuses_gradient(reduction, logits.dtype), logits, targets, output[1], reduction,
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
    return row_grad_impl(logits, targets, grad_rows, stats, phi, mu, alpha, ignore_index, out_scale)


@_op_row_grad.register_fake
def _op_row_grad_fake(logits, targets, grad_rows, stats, phi, mu, alpha, ignore_index, out_scale):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
