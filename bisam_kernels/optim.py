"""BiSAM / SAM optimizer on the fused perturbation ops: a drop-in for the canonical PyTorch SAM.

The interface is the canonical one (``first_step``, ``second_step``, ``step(closure)``, a base optimizer
built over the same param groups). Under the hood ``first_step`` is one fused norm + perturbation over all
parameters (``bisam_kernels.ops.sam_perturb_``) and ``second_step`` one fused restore: backups are
allocated once and reused, and neither step synchronises with the host, so both can be captured in a
CUDA graph. BiSAM differs from SAM only in the loss of the first pass (``bisam_kernels.bisam_loss``);
the optimizer is the same, exported twice as ``BiSAM`` and ``SAM``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch.amp.grad_scaler import OptState

from bisam_kernels.ops.sam_perturb import DEFAULT_EPS, FusedSAMPlan, _rho_key, check_rho

__all__ = ["BiSAM", "SAM"]

try:  # DTensor parameters (FSDP2 ``fully_shard``); public since torch 2.5
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    _DTensor = None


def _is_dtensor(t: torch.Tensor) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view: in-place writes reach the DTensor), else the tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def _same_layout(backup: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a backup can still hold the weight (the fused ops write it element for element)."""
    return (backup.shape == weight.shape and backup.dtype == weight.dtype and backup.device == weight.device
            and backup.stride() == weight.stride())


def _shard_groups(p: torch.Tensor) -> tuple:
    """Process groups over which a DTensor parameter is sharded (its squared norm is summed over them)."""
    if not _is_dtensor(p):
        return ()
    mesh = p.device_mesh
    return tuple(mesh.get_group(dim) for dim, placement in enumerate(p.placements) if placement.is_shard())


def _check_group(group: dict, where: str = "") -> None:
    prefix = f"{where} " if where else ""
    check_rho(group["rho"], f"{prefix}rho")
    if not isinstance(group["adaptive"], bool):
        raise TypeError(f"{prefix}adaptive must be a bool, got {type(group['adaptive']).__name__}")


def _check_unique(group: dict, where: str) -> None:
    """A parameter listed twice would be perturbed twice by one fused call: name it now. Items are tensors
    or, from ``named_parameters()``, (name, tensor) pairs."""
    seen: dict[int, int] = {}
    names = group.get("param_names")
    for i, item in enumerate(group["params"]):
        name, p = item if isinstance(item, tuple) else (names[i] if names else None, item)
        j = seen.setdefault(id(p), i)
        if j != i:
            label = f"{name!r} (params[{i}])" if name is not None else f"params[{i}] (shape {tuple(p.shape)})"
            raise ValueError(f"{where}: {label} is listed twice (also at index {j}); "
                             "each parameter may appear once")


def _check_rho_tensor_value(rho, where: str) -> None:
    """A tensor rho's value, once, when the group is built (one host sync then; a value set later is
    checked on the device: an invalid one skips the perturbation and the norm reads NaN)."""
    if isinstance(rho, torch.Tensor) and not (torch.isfinite(rho) & (rho >= 0)).all():
        raise ValueError(f"{where}rho must be finite and non-negative, got {rho.detach().cpu().reshape(-1).tolist()}")


# The steps change Python state (backups, whether the weights are perturbed): inside a compiled function
# they are graph breaks, and under fullgraph=True an error raised before anything runs.
_runs_eagerly = torch.compiler.disable(
    reason="the SAM steps change Python state and run eagerly: compile the model, not the step"
)


class _Plan(NamedTuple):
    """The fused calls of one step, cached while the signature (groups, params with grads) is unchanged."""

    signature: tuple
    params: list  # the parameters with gradients, in the order of the fused plan
    weights: list  # their local tensors (DTensor shards are re-read every step)
    backups: list
    fused: FusedSAMPlan


class BiSAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization with fused multi-tensor steps (canonical SAM interface).

    Args:
        params: parameters or param groups (a group may set its own ``rho`` and ``adaptive``). When
            ``base_optimizer`` is an instance, ``params`` may be ``None`` (its params are used) or must
            hold exactly the instance's parameters.
        base_optimizer: an optimizer class (``torch.optim.SGD``, ``torch.optim.AdamW``, ...) built over
            the same param groups with ``**base_kwargs``, a callable returning an optimizer (e.g. a
            ``functools.partial``), or an optimizer instance.
        rho: neighbourhood radius (default for every group). A float, or a one-element tensor on the
            params' device (a schedulable value for CUDA graphs).
        adaptive: ASAM (perturbation ``rho * w**2 * g / || |w| g ||``).
        **base_kwargs: passed to the base optimizer class (lr, momentum, weight_decay, ...).

    The perturbation uses one global norm over all groups (each group's ``adaptive`` decides its terms),
    scaled by each group's ``rho``. Parameters whose ``.grad`` is ``None`` at ``first_step`` are neither
    perturbed nor restored; ``first_step`` with no gradient at all raises. A non-finite gradient norm (an
    overflowed fp16 pass) skips the perturbation instead of writing NaN weights; ``first_step`` returns
    the norm (a 0-dim tensor on the device) so this can be logged without a host sync, and
    ``second_step(scaler=...)`` then counts the step as overflowed (skipped, the scale backs off).

    The steps change Python state (the backups, whether the weights are perturbed), so they always run
    eagerly: inside a ``torch.compile``d function they are a graph break (an error under
    ``fullgraph=True``, raised before anything runs). Compile the model, not the step.

    ``param_groups`` are shared with the base optimizer, so LR schedulers attached to this optimizer
    work; ``state_dict()`` holds the base optimizer's state (momentum, Adam moments) and the groups'
    ``rho``/``adaptive``, never the transient backups.
    """

    def __init__(self, params, base_optimizer, rho=0.05, adaptive: bool = False, **base_kwargs):
        _check_group({"rho": rho, "adaptive": adaptive})
        _check_rho_tensor_value(rho, "")
        self._backups: dict[torch.Tensor, torch.Tensor] = {}
        self._plan: _Plan | None = None
        self._perturbed: tuple[list[torch.Tensor], _Plan] | None = None  # (weights, plan) of the first step
        self._ascent_norm: torch.Tensor | None = None  # the first step's norm, until second_step
        self._stepping_base = False  # second_step is stepping the base through self.step (its hooks run)
        defaults = dict(rho=rho, adaptive=adaptive, **base_kwargs)

        if isinstance(base_optimizer, torch.optim.Optimizer):
            if isinstance(base_optimizer, BiSAM):
                raise TypeError("base_optimizer must not itself be a BiSAM/SAM optimizer")
            if base_kwargs:
                raise TypeError(
                    f"base_kwargs {sorted(base_kwargs)} cannot be applied to an optimizer instance; "
                    "pass the optimizer class instead"
                )
            base = base_optimizer
            own = [p for g in base.param_groups for p in g["params"]]
            if params is not None:
                given = _flatten_params(params)
                if {id(p) for p in given} != {id(p) for p in own} or len(given) != len(own):
                    raise ValueError("params must be the parameters of the base_optimizer instance (or None)")
            super().__init__(base.param_groups, defaults)  # sets rho/adaptive on the instance's groups
        else:
            if isinstance(base_optimizer, type):
                if not issubclass(base_optimizer, torch.optim.Optimizer):
                    raise TypeError(
                        f"base_optimizer must be a torch.optim.Optimizer subclass or instance, "
                        f"got the class {base_optimizer.__name__}"
                    )
                if issubclass(base_optimizer, BiSAM):
                    raise TypeError("base_optimizer must not itself be a BiSAM/SAM optimizer")
            elif not callable(base_optimizer):
                raise TypeError(
                    f"base_optimizer must be a torch.optim.Optimizer subclass or instance, "
                    f"got {type(base_optimizer).__name__}"
                )
            if params is None:
                raise TypeError("params is required when base_optimizer is not an optimizer instance")
            super().__init__(params, defaults)
            base = base_optimizer(self.param_groups, **base_kwargs)
            if not isinstance(base, torch.optim.Optimizer):
                raise TypeError(
                    f"base_optimizer must build a torch.optim.Optimizer, got {type(base).__name__}"
                )
        self.base_optimizer = base
        self.param_groups = base.param_groups  # one list of groups, shared (canonical SAM)
        self.state = base.state  # the base's per-parameter state (momentum, moments), for tools that look
        self.defaults.update(base.defaults)

    # ------------------------------------------------------------------------------------------
    # param groups
    # ------------------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        where = f"param group {len(self.param_groups)}"
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            param_group["params"] = [params]
        elif not isinstance(params, set):  # (torch rejects a set) read here before torch: keep a list
            param_group["params"] = list(params)
        _check_unique(param_group, where)
        _check_group({"rho": self.defaults["rho"], "adaptive": self.defaults["adaptive"], **param_group}, where)
        _check_rho_tensor_value(param_group.get("rho", self.defaults["rho"]), f"{where} ")
        base = self.__dict__.get("base_optimizer")
        if base is None:  # during __init__
            super().add_param_group(param_group)
        else:
            param_group.setdefault("rho", self.defaults["rho"])
            param_group.setdefault("adaptive", self.defaults["adaptive"])
            base.add_param_group(param_group)  # appends to the shared list

    # ------------------------------------------------------------------------------------------
    # the two steps
    # ------------------------------------------------------------------------------------------

    def _backup_for(self, p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        b = self._backups.get(p)
        if b is None or not _same_layout(b, local):
            b = torch.empty_like(local, memory_format=torch.preserve_format)
            self._backups[p] = b
        return b

    def _signature(self) -> tuple:
        """What the plan depends on: the groups (their params lists, rho, adaptive, device and dtype) and
        which parameters have gradients. Cheap enough to compute every step (no tensor work)."""
        groups = self.param_groups
        return (
            tuple(
                (id(g["params"]), len(g["params"]), g["adaptive"], _rho_key(g["rho"]),
                 (g["params"][0].device, g["params"][0].dtype) if g["params"] else None)
                for g in groups
            ),
            tuple([p.grad is None for g in groups for p in g["params"]]),
        )  # fmt: skip

    def _build_plan(self, signature: tuple) -> _Plan:
        """The parameters with gradients, their backups (allocated once) and the fused calls over them."""
        params, weights, keys, rhos, adaptives, shards = [], [], [], [], [], []
        for i, group in enumerate(self.param_groups):
            _check_group(group, f"param group {i}")  # rho may have been changed since the group was added
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("BiSAM does not support sparse gradients")
                w = _local(p)
                params.append(p)
                weights.append(w)
                keys.append((w.device, w.dtype))
                rhos.append(group["rho"])
                adaptives.append(group["adaptive"])
                shards.append(_shard_groups(p))
        backups = [self._backup_for(p, w) for p, w in zip(params, weights)]
        return _Plan(signature, params, weights, backups, FusedSAMPlan(keys, rhos, adaptives, shards))

    @_runs_eagerly
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> torch.Tensor:
        """Ascent step ``w <- w + e(w)`` from the current gradients; keeps ``w`` for :meth:`second_step`.

        Returns the global gradient norm as a 0-dim tensor on the device (no host sync). Raises
        ``RuntimeError`` when no parameter has a gradient (the pass-1 backward is missing).
        """
        if self._perturbed is not None:
            raise RuntimeError(
                "first_step() was called twice without second_step(): the weights are already perturbed"
            )
        signature = self._signature()
        plan = self._plan
        if plan is None or plan.signature != signature:
            plan = self._plan = self._build_plan(signature)
        if not plan.params:
            raise RuntimeError(
                "first_step() found no gradients: no parameter of this optimizer has a .grad. Run the pass-1 "
                "backward first (e.g. bk.bisam_loss(model(x), y).backward()), or use bk.bisam_step (under "
                "Lightning: subclass bisam_kernels.integrations.lightning.BiSAMModule)"
            )
        try:
            weights, norm = self._perturb(plan)
        except (ValueError, TypeError):
            # The weights' layout or dtype changed since the plan was built (model.to(memory_format=...) or
            # module.double() after the first step): the fused ops check before they write anything, so
            # rebuild the plan and retry.
            if all(_same_layout(b, _local(p)) for p, b in zip(plan.params, plan.backups)):
                raise
            plan = self._plan = self._build_plan(signature)
            weights, norm = self._perturb(plan)
        self._perturbed, self._ascent_norm = (weights, plan), norm
        if zero_grad:
            self.zero_grad()
        return norm

    @staticmethod
    def _perturb(plan: _Plan) -> tuple[list[torch.Tensor], torch.Tensor]:
        if plan.fused.sharded:  # DTensor local shards are re-read every step; plain tensors are cached
            weights, grads = [_local(p) for p in plan.params], [_local(p.grad) for p in plan.params]
        else:
            weights, grads = plan.weights, [p.grad for p in plan.params]
        return weights, plan.fused.perturb_(weights, grads, plan.backups, DEFAULT_EPS)

    @_runs_eagerly
    @torch.no_grad()
    def restore(self) -> None:
        """Undo :meth:`first_step` (``w <- backup``, bit-exact) without stepping the base optimizer."""
        if self._perturbed is None:
            raise RuntimeError("second_step()/restore() was called without first_step(): nothing to restore")
        (weights, plan), self._perturbed = self._perturbed, None
        plan.fused.restore_(weights, plan.backups)

    def _count_ascent_overflow(self, scaler: torch.amp.GradScaler) -> None:
        """Count a skipped perturbation (a non-finite pass-1 norm: overflowed fp16 gradients) as an overflow
        of this step, on the device: ``scaler.step`` skips the base step and ``scaler.update`` backs off, as
        for an overflowed pass 2. Without it a scale too large for pass 1 would never shrink, and the run
        would silently train as SGD. The scaler keeps its per-optimizer overflow flags in
        ``_per_optimizer_states`` (the same layout since torch 1.6; tested)."""
        norm, self._ascent_norm = self._ascent_norm, None
        state = scaler._per_optimizer_states[id(self)]
        if state["stage"] is not OptState.UNSCALED:  # else the caller unscaled already (to clip, say)
            scaler.unscale_(self)
        found = state["found_inf_per_device"]
        device = next(iter(found), norm.device)
        overflow = (~torch.isfinite(norm)).to(device, torch.float32).reshape(1)
        found[device] = found[device] + overflow if device in found else overflow

    @_runs_eagerly
    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None):
        """Restore ``w`` and let the base optimizer step with the gradients taken at ``w + e(w)``.

        With ``scaler`` (a ``torch.amp.GradScaler``), the base step goes through ``scaler.step`` (which
        unscales, and skips the step on inf/NaN gradients); call ``scaler.update()`` afterwards as usual.
        A pass 1 whose norm was not finite (its perturbation was skipped) counts as an overflow too: the
        step is skipped and the scale backs off. The weights are restored in every case.
        """
        self.restore()
        if scaler is not None and scaler.is_enabled():
            self._count_ascent_overflow(scaler)
        # Through self.step, so that step hooks registered on this optimizer run as for any optimizer
        # (GradScaler.step calls it too: its unscale_ bookkeeping is keyed to this optimizer).
        self._stepping_base = True
        try:
            self.step() if scaler is None else scaler.step(self)
        finally:
            self._stepping_base = False
        self._opt_called = True  # tells LR schedulers attached to this optimizer that it stepped
        if zero_grad:
            self.zero_grad()

    @_runs_eagerly
    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """Canonical SAM step: the gradients at ``w`` must already be computed; ``closure`` re-evaluates
        the training loss with a full forward-backward pass at ``w + e(w)``."""
        if closure is None:
            # Called by second_step (directly or through GradScaler.step); or with every gradient zero, where
            # there is no ascent direction and SAM's step is the base optimizer's (torch.distributed.checkpoint's
            # get_state_dict / set_state_dict initialise an optimizer's state so; the check syncs per gradient).
            if self._stepping_base or self._gradients_are_zero():
                return self.base_optimizer.step()
            raise RuntimeError(
                "BiSAM.step() requires a closure that does a full forward-backward pass; "
                "or call first_step() and second_step() yourself"
            )
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        loss = closure()
        self.restore()
        self.base_optimizer.step()  # (not second_step: this call's hooks already run around the SAM step)
        return loss

    def _gradients_are_zero(self) -> bool:
        grads = [_local(p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None]
        return bool(grads) and not any(bool(t.any()) for t in grads)

    @property
    def perturbed(self) -> bool:
        """True between :meth:`first_step` and :meth:`second_step` (the weights are at ``w + e``)."""
        return self._perturbed is not None

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The base optimizer's state dict (its state plus the shared groups, with ``rho``/``adaptive``)."""
        if self._perturbed is not None:
            warnings.warn(
                "state_dict() taken between first_step() and second_step(): the model's weights are perturbed",
                stacklevel=2,
            )
        for hook in self._optimizer_state_dict_pre_hooks.values():  # hooks registered on this optimizer
            hook(self)
        state_dict = self.base_optimizer.state_dict()
        for hook in self._optimizer_state_dict_post_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict from :meth:`state_dict` (or from the canonical SAM; its backups are dropped)."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():  # hooks registered on this optimizer
            state_dict = hook(self, state_dict) or state_dict
        state_dict = dict(state_dict)
        state_dict["state"] = {
            k: {n: v for n, v in s.items() if n != "old_p"} for k, s in state_dict.get("state", {}).items()
        }
        state_dict["state"] = {k: s for k, s in state_dict["state"].items() if s}
        held_rhos = [group["rho"] for group in self.param_groups]
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group, held in zip(self.param_groups, held_rhos):
            group.setdefault("rho", self.defaults["rho"])
            group.setdefault("adaptive", self.defaults["adaptive"])
            if isinstance(held, torch.Tensor):  # the caller's rho tensor stays the one in use (and schedulable),
                with torch.no_grad():           # holding the loaded value
                    held.copy_(torch.as_tensor(group["rho"]).reshape(held.shape))
                group["rho"] = held
        for i, group in enumerate(self.param_groups):
            _check_group(group, f"param group {i}")
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self) -> dict:
        """Pickling and deepcopy leave out the backups, except between the two steps: there they hold the
        unperturbed weights, which the copy's second_step() / restore() must still be able to put back."""
        state = dict(self.__dict__)
        if self._perturbed is None:
            state["_backups"], state["_plan"], state["_ascent_norm"] = {}, None, None
        else:
            warnings.warn("BiSAM pickled or copied between first_step() and second_step(): the model's weights are "
                          "perturbed; the copy keeps the backups to restore them", stacklevel=2)
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_optimizer={self.base_optimizer!r})"


def _flatten_params(params: Iterable) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for item in [params] if isinstance(params, torch.Tensor) else list(params):
        if isinstance(item, dict):
            ps = item["params"]
            out.extend([ps] if isinstance(ps, torch.Tensor) else list(ps))
        else:
            out.append(item)
    return out


SAM = BiSAM
"""The same optimizer under the name plain-SAM users look for (the ascent loss is the caller's choice)."""
