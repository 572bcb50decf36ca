"""Fused multi-tensor SAM perturbation: the Python face of the torch.ops.bisam operators.

The C++/CUDA ops take one device and one dtype per call. :class:`FusedSAMPlan` maps a list of tensors
onto as few calls as possible, with one global norm; the functions here and the optimizer
(``bisam_kernels.optim``) both go through it. The ops get fake implementations for torch.compile.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch

from bisam_kernels import _extension  # noqa: F401  (registers torch.ops.bisam)
from bisam_kernels._dtypes import accumulate_dtype

__all__ = ["grad_sq_norm", "sam_perturb_", "sam_restore_", "sam_perturbation", "FusedSAMPlan", "DEFAULT_EPS"]

_ops = torch.ops.bisam

DEFAULT_EPS = 1e-12  # the canonical SAM's epsilon in rho / (||g|| + eps)


def _refuse_stray_meta(*tensor_lists) -> None:
    """One meta tensor among real ones sends the whole call here, to the fake kernel, which neither checks
    nor writes anything: refuse it, as the real kernels refuse mixed devices. (Under torch.compile every
    input is a fake tensor on its real device; a call wholly on meta is a legitimate shape computation.)"""
    devices = {t.device.type for ts in tensor_lists for t in ts if t is not None}
    if "meta" in devices and len(devices) > 1:
        raise ValueError(f"the tensors are on several devices ({', '.join(sorted(devices))}), one of them meta: "
                         "all tensors, a rho or sq_norm tensor included, must be on one device")


@torch.library.register_fake("bisam::grad_sq_norm")
def _grad_sq_norm_fake(grads, params, adaptive):
    _refuse_stray_meta(grads, params)
    return grads[0].new_empty((), dtype=accumulate_dtype(grads[0].dtype))


@torch.library.register_fake("bisam::sam_perturb_")
def _sam_perturb_fake(params, grads, backups, rho, rho_tensor, adaptive, eps, sq_norm):
    _refuse_stray_meta(params, grads, backups, [rho_tensor, sq_norm])
    return params[0].new_empty((), dtype=accumulate_dtype(params[0].dtype))


@torch.library.register_fake("bisam::sam_restore_")
def _sam_restore_fake(params, backups):
    _refuse_stray_meta(params, backups)
    return None


def check_rho(rho, name: str = "rho") -> tuple[float, torch.Tensor | None]:
    """(rho as a float, rho as a tensor or None), as the op takes them. A tensor rho is checked on the
    device by the op (an invalid value skips the step; no host sync), a number here."""
    if isinstance(rho, torch.Tensor):
        if rho.numel() != 1 or not rho.is_floating_point():
            raise ValueError(f"{name} must be a float or a one-element floating tensor, got a {rho.dtype} tensor "
                             f"of shape {tuple(rho.shape)}")
        return 0.0, rho
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real):
        raise TypeError(f"{name} must be a float or a one-element floating tensor, got {type(rho).__name__}")
    value = float(rho)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and non-negative, got {value!r}")
    return value, None


def check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite non-negative number, got {eps!r}")
    return float(eps)


def _rho_key(rho):
    return ("tensor", id(rho)) if isinstance(rho, torch.Tensor) else float(rho)


def _pick(tensors: list, indices: list[int] | None) -> list:
    """tensors[indices]; None stands for every index in order (no copy: the common case)."""
    return tensors if indices is None else [tensors[i] for i in indices]


class _Perturb(NamedTuple):
    indices: list[int] | None
    rho_value: float
    rho_tensor: torch.Tensor | None
    adaptive: bool


class _Term(NamedTuple):
    indices: list[int] | None
    adaptive: bool
    shard_groups: tuple


class FusedSAMPlan:
    """How a list of tensors maps onto the fused ops, with one global gradient norm.

    Tensor ``i`` has a grouping key (its dtype, or its device and dtype: one op call never mixes them),
    a ``rho`` and an ``adaptive`` flag, and optionally the process groups its local shard is summed over
    (FSDP2). The plan holds:

    * one ``sam_perturb_`` call per (key, adaptive, rho);
    * with several calls, or sharded tensors, the squared norm first: one ``grad_sq_norm`` term per
      (key, adaptive, shard groups), all-reduced over its shard groups, summed in the promoted
      accumulate dtype, and given to every call as ``sq_norm``;
    * one ``sam_restore_`` call per key.

    Lists of tensors are passed to :meth:`perturb_` / :meth:`restore_` in the plan's order, so that
    a caller can cache the plan while its tensors stay the same.
    """

    def __init__(self, keys: Sequence, rhos: Sequence, adaptives: Sequence[bool], shard_groups: Sequence = ()):
        n = len(keys)
        if (len(set(keys)) <= 1 and all(r is rhos[0] for r in rhos) and all(a == adaptives[0] for a in adaptives)
                and not any(shard_groups)):  # the common case, grouped without a loop: one call of each op
            self.perturbs = [_Perturb(None, *check_rho(rhos[0]), adaptives[0])] if n else []
            self.terms = [_Term(None, adaptives[0], ())] if n else []
            self.restores = [None] if n else []
            self.sharded = False
            return
        perturbs: dict[tuple, tuple[list[int], object, bool]] = {}
        terms: dict[tuple, tuple[list[int], bool, tuple]] = {}
        restores: dict = {}
        for i, key in enumerate(keys):
            rho, adaptive = rhos[i], adaptives[i]
            shards = shard_groups[i] if shard_groups else ()
            perturbs.setdefault((key, adaptive, _rho_key(rho)), ([], rho, adaptive))[0].append(i)
            terms.setdefault((key, adaptive, shards), ([], adaptive, shards))[0].append(i)
            restores.setdefault(key, []).append(i)
        self.perturbs = [_Perturb(ix, *check_rho(rho), adaptive) for ix, rho, adaptive in perturbs.values()]
        self.terms = [_Term(ix, adaptive, shards) for ix, adaptive, shards in terms.values()]
        self.restores = list(restores.values())
        self.sharded = any(t.shard_groups for t in self.terms)

    def sq_norm(self, weights: list, grads: list) -> torch.Tensor | None:
        """The global squared norm (of ``|w| g`` for adaptive tensors), or None for no tensors."""
        sq = None
        for term in self.terms:
            gs = _pick(grads, term.indices)
            part = _ops.grad_sq_norm(gs, _pick(weights, term.indices) if term.adaptive else [], term.adaptive)
            for group in term.shard_groups:  # FSDP2: sum the local squared norms over the mesh dimension
                torch.distributed.all_reduce(part, op=torch.distributed.ReduceOp.SUM, group=group)
            if sq is None:
                sq = part
            else:
                sq = sq + part.to(sq.device, torch.promote_types(sq.dtype, part.dtype))
        return sq

    def perturb_(self, weights: list, grads: list, backups: list, eps: float = DEFAULT_EPS,
                 sq_norm: torch.Tensor | None = None) -> torch.Tensor:
        """``backup <- w``, ``w <- w + e(w)`` for every tensor; returns the global norm as the op reports it
        (inf/NaN: a skipped step; NaN for an invalid rho tensor)."""
        if not self.perturbs:
            return torch.zeros((), dtype=torch.float32)
        if sq_norm is None and (len(self.perturbs) > 1 or self.sharded):
            sq_norm = self.sq_norm(weights, grads)
        norm = None
        for call in self.perturbs:
            ws = _pick(weights, call.indices)
            given = None if sq_norm is None else sq_norm.to(ws[0].device)
            reported = _ops.sam_perturb_(ws, _pick(grads, call.indices), _pick(backups, call.indices),
                                         call.rho_value, call.rho_tensor, call.adaptive, eps, given)
            if norm is None:
                norm = reported
            elif call.rho_tensor is not None:  # NaN where that call's rho is invalid; otherwise the same norm
                norm = torch.maximum(norm, reported.to(norm.device, norm.dtype))
        _written(weights)  # (not the backups: this library's own buffers, or the caller's, which no graph reads)
        return norm

    def restore_(self, weights: list, backups: list) -> None:
        """``w <- backup`` for every tensor, bit-exact."""
        for indices in self.restores:
            _ops.sam_restore_(_pick(weights, indices), _pick(backups, indices))
        _written(weights)


def _written(weights: list) -> None:
    """Bump the autograd version of the weights the ops wrote in place (the C++ ops do not), so that a graph
    that saved one raises at backward, as after any in-place op, instead of reading the new values.
    (Compiled graphs carry the mutation themselves.) About 7 us for 167 tensors."""
    if not torch.compiler.is_compiling():
        torch.autograd.graph.increment_version(weights)


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


def _check_lengths(first: list, first_name: str, *others) -> None:
    for tensors, name in others:
        if len(tensors) != len(first):
            raise ValueError(f"{name} has {len(tensors)} tensors but {first_name} has {len(first)}")


def _check_pairs(first: list, first_name: str, *others) -> None:
    """Each other[i] has the shape and dtype of first[i]. The op checks this within one call; a list split
    into several calls is checked here, so that errors carry the caller's indices."""
    for tensors, name in others:
        for i, (a, b) in enumerate(zip(first, tensors)):
            if b.dtype != a.dtype:
                raise TypeError(f"{name}[{i}] has dtype {b.dtype} but {first_name}[{i}] has dtype {a.dtype}")
            if b.shape != a.shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(b.shape)} but {first_name}[{i}] has shape "
                                 f"{tuple(a.shape)}")


def _plan_for_lists(first: list, first_name: str, others, rho, adaptive: bool) -> FusedSAMPlan:
    """The plan of one call of the functions below: grouped by dtype (one device per call: the op checks)."""
    _check_lengths(first, first_name, *others)
    if len({t.dtype for t in first}) == 1:  # one call of each op: no per-tensor lists (~10 us here)
        return FusedSAMPlan([None], [rho], [adaptive])
    n = len(first)
    plan = FusedSAMPlan([t.dtype for t in first], [rho] * n, [adaptive] * n)
    if len(plan.restores) > 1:
        _check_pairs(first, first_name, *others)
    return plan


def grad_sq_norm(grads, params=None, adaptive: bool = False) -> torch.Tensor:
    """Sum of ``g**2`` over all grads, or of ``(|w| * g)**2`` when ``adaptive`` (ASAM).

    Returns a 0-dim tensor on the grads' device: float32 (float64 when any grad is float64). Grads may be
    any view (one with gaps or overlaps is read through a dense copy).
    Deterministic (fixed reduction order) and free of host synchronisation.
    """
    grads = _as_tensor_list(grads, "grads")
    params = _as_tensor_list(params, "params") if adaptive and params is not None else []
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    plan = _plan_for_lists(grads, "grads", [(params, "params")] if adaptive else [], 0.0, bool(adaptive))
    return plan.sq_norm(params, grads)


def sam_perturb_(params, grads, backups, rho, adaptive: bool = False, eps: float = DEFAULT_EPS,
                 sq_norm: torch.Tensor | None = None) -> torch.Tensor:
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
    check_rho(rho)
    eps = check_eps(eps)
    if sq_norm is not None and not isinstance(sq_norm, torch.Tensor):
        raise TypeError(f"sq_norm must be a tensor or None, got {type(sq_norm).__name__}")
    _check_no_grad(params, "sam_perturb_")
    plan = _plan_for_lists(params, "params", [(grads, "grads"), (backups, "backups")], rho, bool(adaptive))
    return plan.perturb_(params, grads, backups, eps, sq_norm)


def sam_restore_(params, backups) -> None:
    """``w <- backup`` for every pair, bit-exact (undoes :func:`sam_perturb_`)."""
    params = _as_tensor_list(params, "params")
    backups = _as_tensor_list(backups, "backups")
    _check_no_grad(params, "sam_restore_")
    _plan_for_lists(params, "params", [(backups, "backups")], 0.0, False).restore_(params, backups)


def _check_no_grad(params: list, name: str) -> None:
    """The ops write params outside autograd: with grad mode on, a param that requires grad would be
    changed behind the graph's back (PyTorch refuses in-place ops on such leaves for the same reason)."""
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        raise RuntimeError(f"{name} updates params in place outside autograd, and some require grad: call it "
                           "under torch.no_grad(), as optimizers do")


def sam_perturbation(w_flat: torch.Tensor, g_flat: torch.Tensor, rho, adaptive: bool = False,
                     eps: float = DEFAULT_EPS):
    """Out-of-place SAM perturbation ``rho * g / ||g||`` (ASAM form when ``adaptive``), with autograd.

    For research code that differentiates through the perturbation: plain torch operations, so autograd
    differentiates it in ``w`` (when adaptive), ``g`` and a tensor ``rho``, to any order (the
    normalisation's Jacobian included). A zero gradient gives a zero perturbation (with ``eps > 0``,
    the default). A tensor ``rho`` that is negative or not finite gives NaN (checked on the device:
    no host sync), as :func:`sam_perturb_` skips its step for one.
    """
    if not isinstance(w_flat, torch.Tensor) or not isinstance(g_flat, torch.Tensor):
        raise TypeError("w_flat and g_flat must be tensors")
    if w_flat.shape != g_flat.shape:
        raise ValueError(f"w_flat has shape {tuple(w_flat.shape)} but g_flat has shape {tuple(g_flat.shape)}")
    if not g_flat.is_floating_point() or w_flat.dtype != g_flat.dtype:
        raise TypeError(f"w_flat and g_flat must share a floating dtype, got {w_flat.dtype} and {g_flat.dtype}")
    if w_flat.device != g_flat.device:
        raise ValueError(f"w_flat is on {w_flat.device} but g_flat is on {g_flat.device}")
    check_rho(rho)
    eps = check_eps(eps)
    if isinstance(rho, torch.Tensor):
        rho = torch.where((rho >= 0) & torch.isfinite(rho), rho, float("nan")).to(g_flat.device, g_flat.dtype)
        rho = rho.reshape(())
    u = g_flat * w_flat.abs() if adaptive else g_flat
    direction = g_flat * w_flat.square() if adaptive else g_flat
    return direction * (rho / (torch.linalg.vector_norm(u) + eps))
