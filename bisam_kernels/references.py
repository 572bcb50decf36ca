"""Reference implementations, for tests and benchmark baselines.

- float64 references written from the formulas of docs/design.md section 1 (the tests' ground truth);
- the released code's semantics: the canonical per-parameter PyTorch SAM loop (baseline (a)) and the
  released pass-2 loss (``smooth_crossentropy_released``);
- vectorised eager PyTorch with torch._foreach_* (baseline (b); torch.compile of it is baseline (c)).

The same three for the BiSAM loss: ``bisam_loss_fp64``, ``bisam_loss_released`` (the row loop) and
``bisam_loss_eager`` (gather / logsumexp).
"""

from __future__ import annotations

import math

import torch

from bisam_kernels.ops.sam_perturb import DEFAULT_EPS

# ---------------------------------------------------------------------------------------------
# SAM perturbation
# ---------------------------------------------------------------------------------------------


def sam_perturb_fp64(params, grads, rho: float, adaptive: bool = False, eps: float = DEFAULT_EPS):
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


def sam_first_step_loop(params, grads, rho: float, adaptive: bool = False, eps: float = DEFAULT_EPS):
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


def sam_first_step_foreach(params, grads, backups, rho: float, adaptive: bool = False, eps: float = DEFAULT_EPS):
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


def released_disable_running_stats(model) -> None:
    """The released training script's BatchNorm bypass for pass 2: momentum 0 (``utility/bypass_bn.py``)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.backup_momentum = module.momentum
            module.momentum = 0


def released_enable_running_stats(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and hasattr(module, "backup_momentum"):
            module.momentum = module.backup_momentum


def canonical_sam_step(model, base, x, y, rho, adaptive, ascent, label_smoothing=0.1) -> None:
    """One step of the canonical PyTorch SAM (per-parameter loop) with the released code's BN bypass.

    ``ascent(logits, targets)`` is the pass-1 loss (the released BiSAM loss, or cross-entropy for
    SAM); ``base`` an optimizer over ``model``'s parameters; pass 2 is cross-entropy with label smoothing.
    """
    released_enable_running_stats(model)
    ascent(model(x), y).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    backups = sam_first_step_loop(params, [p.grad for p in params], rho, adaptive)
    base.zero_grad()
    released_disable_running_stats(model)
    torch.nn.functional.cross_entropy(model(x), y, label_smoothing=label_smoothing).backward()
    sam_restore_loop(params, backups)
    base.step()
    base.zero_grad()
    released_enable_running_stats(model)


def smooth_crossentropy_released(logits, targets, smoothing: float = 0.1) -> torch.Tensor:
    """The released training script's pass-2 loss in float64, per row, written as released: a target
    distribution of ``smoothing / (K - 1)`` everywhere and ``1 - smoothing`` on the target, then
    ``F.kl_div(log_softmax(logits), that).sum(-1)``. Logits (N, K), targets (N,)."""
    pred = logits.to(torch.float64)
    n_class = pred.size(1)
    one_hot = torch.full_like(pred, fill_value=smoothing / (n_class - 1) if n_class > 1 else 0.0)
    one_hot.scatter_(dim=1, index=targets.long().unsqueeze(1), value=1.0 - smoothing)
    log_prob = torch.nn.functional.log_softmax(pred, dim=1)
    return torch.nn.functional.kl_div(input=log_prob, target=one_hot, reduction="none").sum(-1)


# ---------------------------------------------------------------------------------------------
# BiSAM lower-bound loss
# ---------------------------------------------------------------------------------------------

_LOSS_GAMMA = math.log(math.e - 1.0)


def _loss_phi(F: torch.Tensor, phi: str, alpha: float) -> torch.Tensor:
    if phi == "tanh":
        return torch.tanh(alpha * F)
    if phi == "log":
        return 1.0 - torch.nn.functional.softplus(_LOSS_GAMMA - F)
    raise ValueError(f"phi must be 'tanh' or 'log', got {phi!r}")


def _loss_reduce(rows: torch.Tensor, valid: torch.Tensor, reduction: str, shape) -> torch.Tensor:
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(shape)
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / valid.sum()  # 0 / 0 = NaN when every row is ignored, as F.cross_entropy
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def bisam_loss_fp64(logits, targets, phi="log", mu=1.0, alpha=0.1, reduction="mean", ignore_index=-100,
                    scale_by_mu=False):
    """The loss of docs/design.md section 1 in float64, from the formulas (the tests' ground truth).

    ``F_j = z_j - z_y``, ``s_j = mu * phi(F_j)``, ``l = logsumexp_j s_j`` (``/ mu`` with scale_by_mu);
    logits ``(..., K)`` (classes last), rows whose target is ``ignore_index`` count for nothing. The
    result is float64 and differentiable by autograd (differentiate it with respect to a float64 leaf).
    """
    K = logits.shape[-1]
    z = logits.reshape(-1, K).to(torch.float64)
    t = targets.reshape(-1).long()
    valid = t != ignore_index
    zy = z.gather(1, torch.where(valid, t, 0).unsqueeze(1))
    rows = torch.logsumexp(mu * _loss_phi(z - zy, phi, alpha), dim=1)
    if scale_by_mu:
        rows = rows / mu
    return _loss_reduce(rows, valid, reduction, targets.shape)


def bisam_loss_released(logits, targets, phi="log", mu=1.0, alpha=0.1):
    """The released code's semantics (``loss_fnc.py``): a Python loop over rows shifting each row by its
    target logit, then ``logsumexp(mu * phi)``, mean over rows. Baseline (a).

    The released functions shift their argument in place; this one shifts a clone it makes, so the
    caller's logits are left untouched and a leaf that requires grad can be passed. The loop, one
    in-place row update (and its autograd node) per row, is kept as released.
    """
    pred = logits.clone()
    for i in range(len(targets)):
        pred[i] = pred[i] - pred[i][targets[i]]
    if phi == "tanh":
        s = mu * torch.tanh(alpha * pred)
    elif phi == "log":
        s = mu * (1 + torch.nn.functional.softplus(pred - torch.log(torch.tensor(math.e - 1)), beta=-1))
    else:
        raise ValueError(f"phi must be 'tanh' or 'log', got {phi!r}")
    return torch.logsumexp(s, 1).mean()


def bisam_loss_eager(logits, targets, phi="log", mu=1.0, alpha=0.1, reduction="mean", ignore_index=-100,
                     scale_by_mu=False):
    """Vectorised eager PyTorch (gather / logsumexp) in the logits' own dtype, differentiable by autograd.

    Baseline (b); ``torch.compile`` of it is baseline (c); in bfloat16 / float16 it measures PyTorch's
    own same-dtype error.
    """
    K = logits.shape[-1]
    z = logits.reshape(-1, K)
    t = targets.reshape(-1).long()
    valid = t != ignore_index
    F = z - z.gather(1, torch.where(valid, t, 0).unsqueeze(1))
    rows = torch.logsumexp(mu * _loss_phi(F, phi, alpha), dim=1)
    if scale_by_mu:
        rows = rows / mu
    return _loss_reduce(rows, valid, reduction, targets.shape)
