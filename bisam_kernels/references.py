"""Reference implementations, for tests and benchmark baselines.

- float64 references written from the formulas of DESIGN.md section 1 (the tests' ground truth);
- the released code's semantics: the canonical per-parameter PyTorch SAM loop (baseline (a));
- vectorised eager PyTorch with torch._foreach_* (baseline (b); torch.compile of it is baseline (c)).
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------------------------------------
# SAM perturbation
# ---------------------------------------------------------------------------------------------


def sam_perturb_fp64(params, grads, rho: float, adaptive: bool = False, eps: float = 1e-12):
    """(perturbed weights in float64, norm in float64): w + rho * (w^2 if adaptive) * g / (||.|| + eps).

    The norm is the canonical one: per-parameter norms stacked, then normed.
    """
    w64 = [p.detach().double() for p in params]
    g64 = [g.detach().double() for g in grads]
    if not w64:
        return [], torch.zeros((), dtype=torch.float64)
    norm = torch.stack([((w.abs() if adaptive else 1.0) * g).norm(2) for w, g in zip(w64, g64)]).norm(2)
    scale = rho / (norm + eps)
    return [w + (w.square() if adaptive else 1.0) * g * scale for w, g in zip(w64, g64)], norm


def sam_first_step_loop(params, grads, rho: float, adaptive: bool = False, eps: float = 1e-12):
    """The canonical PyTorch SAM ``first_step``: one norm per parameter, stack, norm, then per parameter
    ``clone``, ``mul``, ``add_``. Returns the backups (``old_p``) that ``second_step`` restores."""
    shared_device = params[0].device
    norm = torch.norm(
        torch.stack(
            [((torch.abs(p) if adaptive else 1.0) * g).norm(p=2).to(shared_device) for p, g in zip(params, grads)]
        ),
        p=2,
    )
    scale = rho / (norm + eps)
    backups = []
    for p, g in zip(params, grads):
        backups.append(p.data.clone())
        e_w = (torch.pow(p, 2) if adaptive else 1.0) * g * scale.to(p)
        p.data.add_(e_w)
    return backups


def sam_restore_loop(params, backups) -> None:
    """The canonical ``second_step`` restore: ``p.data = old_p`` (a storage swap, no copy)."""
    for p, old in zip(params, backups):
        p.data = old


def sam_first_step_foreach(params, grads, backups, rho: float, adaptive: bool = False, eps: float = 1e-12):
    """Vectorised eager SAM ascent with ``torch._foreach_*`` (the same math, a handful of launches)."""
    terms = torch._foreach_mul(grads, torch._foreach_abs(params)) if adaptive else grads
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(terms, 2)), 2)
    scale = rho / (norm + eps)
    torch._foreach_copy_(backups, params)
    steps = torch._foreach_mul(grads, scale)
    if adaptive:
        torch._foreach_mul_(steps, torch._foreach_mul(params, params))
    torch._foreach_add_(params, steps)
    return norm


def sam_restore_foreach(params, backups) -> None:
    torch._foreach_copy_(params, backups)
