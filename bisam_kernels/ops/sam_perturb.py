"""Fused multi-tensor SAM perturbation: the Python face of the torch.ops.bisam operators.

The C++/CUDA ops take one device and one dtype per call; the functions here accept any mix of
dtypes (grouped, one call per dtype) and give the ops fake implementations for torch.compile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from bisam_kernels import _extension  # noqa: F401  (registers torch.ops.bisam)

__all__ = ["grad_sq_norm", "sam_perturb_", "sam_restore_", "sam_perturbation"]

_ops = torch.ops.bisam


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("bisam::grad_sq_norm")
def _grad_sq_norm_fake(grads, params, adaptive):
    return grads[0].new_empty((), dtype=_accumulate_dtype(grads[0].dtype))


@torch.library.register_fake("bisam::sam_perturb_")
def _sam_perturb_fake(params, grads, backups, rho, rho_tensor, adaptive, eps, sq_norm):
    return params[0].new_empty((), dtype=_accumulate_dtype(params[0].dtype))


@torch.library.register_fake("bisam::sam_restore_")
def _sam_restore_fake(params, backups):
    return None


def _as_tensor_list(tensors, name: str) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if not isinstance(tensors, Sequence) and not hasattr(tensors, "__iter__"):
        raise TypeError(f"{name} must be a tensor or a sequence of tensors, got {type(tensors).__name__}")
    out = list(tensors)
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
    return out


def _check_pairs(first: list, first_name: str, other: list, other_name: str) -> None:
    """Same length, and each other[i] has the shape and dtype of first[i] (errors use global indices)."""
    if len(other) != len(first):
        raise ValueError(f"{other_name} has {len(other)} tensors but {first_name} has {len(first)}")
    for i, (a, b) in enumerate(zip(first, other)):
        if b.dtype != a.dtype:
            raise TypeError(f"{other_name}[{i}] has dtype {b.dtype} but {first_name}[{i}] has dtype {a.dtype}")
        if b.shape != a.shape:
            raise ValueError(
                f"{other_name}[{i}] has shape {tuple(b.shape)} but {first_name}[{i}] has shape {tuple(a.shape)}"
            )


def _dtype_groups(first: list[torch.Tensor], first_name: str, *others) -> list[list[int]]:
    """Indices of `first` grouped by dtype, in first-seen order: one op call per group.

    `others` are (tensors, name) lists paired elementwise with `first`. With one dtype the C++ op
    checks the pairs itself; with several, pairs are checked here so errors carry global indices.
    """
    for tensors, name in others:
        if len(tensors) != len(first):
            raise ValueError(f"{name} has {len(tensors)} tensors but {first_name} has {len(first)}")
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(first):
        groups.setdefault(t.dtype, []).append(i)
    if len(groups) > 1:
        for tensors, name in others:
            _check_pairs(first, first_name, tensors, name)
    return list(groups.values())


def _pick(tensors: list[torch.Tensor], indices: list[int]) -> list[torch.Tensor]:
    return tensors if len(indices) == len(tensors) else [tensors[i] for i in indices]


def _check_rho(rho) -> tuple[float, torch.Tensor | None]:
    """(rho as float, rho as tensor or None). A tensor rho is checked on the device, not here (no sync)."""
    if isinstance(rho, torch.Tensor):
        if rho.numel() != 1:
            raise ValueError(f"rho must be a float or a one-element tensor, got shape {tuple(rho.shape)}")
        return 0.0, rho
    if isinstance(rho, bool) or not isinstance(rho, (int, float)):
        raise TypeError(f"rho must be a float or a 0-dim tensor, got {type(rho).__name__}")
    if not math.isfinite(rho) or rho < 0:
        raise ValueError(f"rho must be finite and non-negative, got {rho}")
    return float(rho), None


def grad_sq_norm(grads, params=None, adaptive: bool = False) -> torch.Tensor:
    """Sum of ``g**2`` over all grads, or of ``(|w| * g)**2`` when ``adaptive`` (ASAM).

    Returns a 0-dim tensor on the grads' device: float32 (float64 when every grad is float64).
    Deterministic (fixed reduction order) and free of host synchronisation.
    """
    grads = _as_tensor_list(grads, "grads")
    params = [] if params is None else _as_tensor_list(params, "params")
    if not adaptive:
        params = []
    groups = _dtype_groups(grads, "grads", *([(params, "params")] if adaptive else []))
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    if len(groups) == 1:
        return _ops.grad_sq_norm(grads, params, adaptive)
    parts = [
        _ops.grad_sq_norm(_pick(grads, g), _pick(params, g) if adaptive else [], adaptive) for g in groups
    ]
    acc = torch.float64 if all(p.dtype == torch.float64 for p in parts) else torch.float32
    return torch.stack([p.to(acc) for p in parts]).sum()


def sam_perturb_(
    params,
    grads,
    backups,
    rho,
    adaptive: bool = False,
    eps: float = 1e-12,
    sq_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """SAM ascent step, in place: ``backup <- w``, ``w <- w + rho * (w**2 if adaptive) * g / (norm + eps)``.

    ``norm`` is the global 2-norm of all grads (of ``|w| * g`` when adaptive), or ``sqrt(sq_norm)``
    when ``sq_norm`` is given (for instance after an all-reduce over FSDP shards). ``rho`` is a float
    or a one-element tensor on the params' device. The scale is computed on the device: no host sync.
    A zero or non-finite norm, or an invalid rho tensor, leaves the weights untouched (backups are
    still written); the returned 0-dim norm shows it (inf/NaN; NaN for an invalid rho tensor).

    Tensors written in place must not alias any other argument (a parameter listed twice is an
    error). On CUDA every input, ``sq_norm`` and a rho tensor included, is read on the current
    stream: order work from other streams before the call as usual (e.g. wait on an async
    all-reduce's handle). The CUDA kernel rounds ``w + scale * g`` once (a fused multiply-add); the
    CPU path rounds the step and then the sum, so the two devices may differ in the last bit.
    """
    params = _as_tensor_list(params, "params")
    grads = _as_tensor_list(grads, "grads")
    backups = _as_tensor_list(backups, "backups")
    groups = _dtype_groups(params, "params", (grads, "grads"), (backups, "backups"))
    rho_value, rho_tensor = _check_rho(rho)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and non-negative, got {eps}")
    if sq_norm is not None and not isinstance(sq_norm, torch.Tensor):
        raise TypeError(f"sq_norm must be a tensor or None, got {type(sq_norm).__name__}")
    if not params:
        return torch.zeros((), dtype=torch.float32)
    if len(groups) > 1 and sq_norm is None:
        sq_norm = grad_sq_norm(grads, params, adaptive)  # one global norm across dtype groups
    norms = [
        _ops.sam_perturb_(
            _pick(params, g), _pick(grads, g), _pick(backups, g), rho_value, rho_tensor, adaptive, float(eps), sq_norm
        )
        for g in groups
    ]
    return norms[0]


def sam_restore_(params, backups) -> None:
    """``w <- backup`` for every pair, bit-exact (undoes :func:`sam_perturb_`)."""
    params = _as_tensor_list(params, "params")
    backups = _as_tensor_list(backups, "backups")
    for g in _dtype_groups(params, "params", (backups, "backups")):
        _ops.sam_restore_(_pick(params, g), _pick(backups, g))


class _SAMPerturbation(torch.autograd.Function):
    """e = rho * (w**2 if adaptive) * g / (||(|w| if adaptive) * g|| + eps), differentiable in w, g and rho."""

    @staticmethod
    def forward(ctx, w, g, rho, adaptive, eps):
        u = g * w.abs() if adaptive else g
        norm = torch.linalg.vector_norm(u)
        direction = g * w.square() if adaptive else g  # e = scale * direction
        scale = rho / (norm + eps)
        ctx.save_for_backward(w, g, rho, norm)
        ctx.adaptive, ctx.eps = adaptive, eps
        return direction * scale

    @staticmethod
    def backward(ctx, grad_e):
        w, g, rho, norm = ctx.saved_tensors
        adaptive, eps = ctx.adaptive, ctx.eps
        denom = norm + eps
        direction = g * w.square() if adaptive else g
        scale = rho / denom
        dot = (grad_e * direction).sum()
        # d norm / d g = (w**2 if adaptive) * g / norm; d norm / d w = w * g**2 / norm (adaptive only).
        inv_norm = torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))
        dscale_dnorm = -rho / denom.square()
        grad_w = grad_g = grad_rho = None
        if ctx.needs_input_grad[1]:
            dir_scale = w.square() if adaptive else 1.0
            grad_g = scale * dir_scale * grad_e + dot * dscale_dnorm * inv_norm * direction
        if ctx.needs_input_grad[0]:
            if adaptive:
                grad_w = 2.0 * scale * w * g * grad_e + dot * dscale_dnorm * inv_norm * w * g.square()
            else:
                grad_w = torch.zeros_like(w)
        if ctx.needs_input_grad[2]:
            grad_rho = (dot / denom).reshape(rho.shape).to(rho.dtype)
        return grad_w, grad_g, grad_rho, None, None


def sam_perturbation(w_flat: torch.Tensor, g_flat: torch.Tensor, rho, adaptive: bool = False, eps: float = 1e-12):
    """Out-of-place SAM perturbation ``rho * g / ||g||`` (ASAM form when ``adaptive``), with autograd.

    For research code that differentiates through the perturbation: the backward applies the
    Jacobian of the normalisation to ``g`` (and to ``w`` when adaptive, and to ``rho`` if a tensor).
    A zero gradient gives a zero perturbation (with ``eps > 0``, the default).
    """
    if not isinstance(w_flat, torch.Tensor) or not isinstance(g_flat, torch.Tensor):
        raise TypeError("w_flat and g_flat must be tensors")
    if w_flat.shape != g_flat.shape:
        raise ValueError(f"w_flat has shape {tuple(w_flat.shape)} but g_flat has shape {tuple(g_flat.shape)}")
    if not g_flat.is_floating_point() or w_flat.dtype != g_flat.dtype:
        raise TypeError(f"w_flat and g_flat must share a floating dtype, got {w_flat.dtype} and {g_flat.dtype}")
    if w_flat.device != g_flat.device:
        raise ValueError(f"w_flat is on {w_flat.device} but g_flat is on {g_flat.device}")
    if not isinstance(rho, torch.Tensor):
        _check_rho(rho)
    rho = torch.as_tensor(rho, dtype=g_flat.dtype, device=g_flat.device)
    return _SAMPerturbation.apply(w_flat, g_flat, rho, bool(adaptive), float(eps))
