"""The public face of the fused BiSAM loss: ``bisam_loss`` and ``BiSAMLoss``, with their argument checks."""

import numbers

import torch

from bisam_kernels.ops.row_loss.autograd import BiSAMLossFunction
from bisam_kernels.ops.row_loss.dispatch import forward_impl
from bisam_kernels.ops.row_loss.modes import PHIS, REDUCTIONS, TARGET_DTYPES, Reduction

__all__ = ["bisam_loss", "BiSAMLoss"]


def _check_scalar(name: str, value, positive: bool) -> float:
    """A real number (int, float, NumPy scalar) as a float. Under torch.compile(dynamic=True) a float argument
    arrives symbolic (a SymFloat): comparisons, not math.isfinite, so that the checks become guards."""
    if type(value) is not float and (  # (a float needs no abstract-class check: the common, fast case)
            isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt))):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not abs(value) <= _SCALE_MAX or (positive and not value > 0):  # (NaN fails both comparisons)
        raise ValueError(f"{name} must be finite{' and positive' if positive else ''} and at most "
                         f"{_SCALE_MAX:g}, got {value!r}")
    return value


# mu, alpha and (for tanh) mu * alpha scale float32 sums and gradients: up to 1e30 they, a sum of their terms
# over many rows, and the kernels' 4 * alpha stay finite (near float32's 3.4e38 they gave NaN or inf).
_SCALE_MAX = 1e30


def _check_options(phi, mu, alpha, reduction, ignore_index) -> tuple[float, float, int]:
    """The loss's options, checked once for the function and the module: (mu, alpha, ignore_index)."""
    if phi not in PHIS:
        raise ValueError(f"phi must be one of {sorted(PHIS)}, got {phi!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    if type(ignore_index) is not int and (
            isinstance(ignore_index, bool) or not isinstance(ignore_index, (numbers.Integral, torch.SymInt))):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    mu, alpha = _check_scalar("mu", mu, True), _check_scalar("alpha", alpha, True)
    if phi == "tanh" and not mu * alpha <= _SCALE_MAX:
        raise ValueError(f"mu * alpha (the tanh loss's gradient scale) must be at most {_SCALE_MAX:g}, got {mu * alpha!r}")
    return mu, alpha, int(ignore_index)


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
    if targets.dtype not in TARGET_DTYPES:
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
    base = logits if logits._base is None else logits._base
    if inplace_backward and needs_grad and (logits.is_leaf or (base.is_leaf and base.requires_grad)):
        raise RuntimeError("inplace_backward=True would overwrite a leaf that requires grad (or a view of one) with "
                           "its own gradient (as PyTorch refuses in-place operations on such leaves): pass logits "
                           "computed by the model, or inplace_backward=False")
    float32_loss = logits.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(logits.device.type)
    args = (int(PHIS[phi]), mu, alpha, ignore_index, int(red), out_scale, float32_loss)
    if torch.compiler.is_compiling():
        loss, _ = torch.ops.bisam.bisam_loss_forward(z, t, *args, needs_grad)
    elif needs_grad:
        loss = BiSAMLossFunction.apply(z, t, *args, bool(inplace_backward))
    else:
        loss, _, _ = forward_impl(z, t, *args[:-1], want_grad=False, float32_loss=float32_loss)
    return loss.reshape(targets.shape) if red == Reduction.NONE else loss


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
