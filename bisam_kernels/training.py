"""Training-loop helpers for BiSAM/SAM: BatchNorm statistics, the one-call step, AMP, accumulation, DDP.

- :func:`frozen_bn_stats`: a context manager that freezes the running statistics of every BatchNorm
  (any ``_BatchNorm`` subclass, SyncBatchNorm included, and InstanceNorm with tracked statistics) for
  the second pass, as the released training script does (momentum 0, then restored).
- :func:`bisam_step`: the whole BiSAM step in one call: surrogate loss at ``w``, ``first_step``,
  cross-entropy with label smoothing at ``w + e`` with BatchNorm statistics frozen, ``second_step``;
  with optional ``torch.amp`` autocast and ``GradScaler``, gradient accumulation over micro-batches,
  and DDP (per-replica perturbation with ``no_sync`` on pass 1, or a synchronised pass 1).

FSDP2 (``fully_shard``) needs nothing here: :class:`bisam_kernels.BiSAM` sees DTensor parameters,
all-reduces the squared norm of the local shards over the sharding process group and perturbs each
shard with that global norm.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from bisam_kernels.ops.cross_entropy import SMOOTHING_STYLES, cross_entropy
from bisam_kernels.ops.fused_linear import _check_accum_dtype, fused_linear_bisam_loss, fused_linear_cross_entropy
from bisam_kernels.ops.row_loss import bisam_loss
from bisam_kernels.optim import BiSAM

__all__ = ["frozen_bn_stats", "bisam_step", "BiSAMStepOutput"]


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Freeze BatchNorm running statistics inside the block (the released script's bypass).

    Every normalisation module with running statistics (``_BatchNorm`` subclasses: BatchNorm1d/2d/3d,
    SyncBatchNorm, lazy variants; and InstanceNorm with ``track_running_stats=True``) gets
    ``momentum = 0`` (its statistics update becomes the identity) and its momentum back on exit. The
    normalisation itself still uses the batch statistics, as in training. ``num_batches_tracked`` keeps
    counting as in the released script, except for modules with ``momentum=None`` (cumulative average),
    whose count is the averaging denominator: it is restored on exit so the frozen pass does not count.
    Nests, and restores on exceptions. No host synchronisation.
    """
    saved = []
    for m in model.modules():
        if isinstance(m, _NormBase) and m.track_running_stats:
            count = None
            if m.momentum is None and m.num_batches_tracked is not None:
                count = m.num_batches_tracked.clone()
            saved.append((m, m.momentum, count))
            m.momentum = 0.0
    try:
        yield model
    finally:
        for m, momentum, count in reversed(saved):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


class BiSAMStepOutput(NamedTuple):
    """What :func:`bisam_step` returns; all detached tensors on the device (no host sync)."""

    ascent_loss: torch.Tensor  # pass-1 (surrogate) loss at w, mean over the batch
    loss: torch.Tensor  # pass-2 training loss at w + e, mean over the batch
    logits: torch.Tensor | None  # pass-1 logits at w (for accuracy), all micro-batches; None with a head
    ascent_norm: torch.Tensor  # first_step's gradient norm; not finite: the perturbation was skipped


_ASCENT_LOSSES = ("log", "tanh", "cross_entropy")


def _builtin_loss(name: str, reduction: str, mu: float, alpha: float, label_smoothing: float, smoothing_style: str,
                  ignore_index: int, head: nn.Module | None, accum_dtype: torch.dtype | None = None):
    """The built-in losses, all with the classes last ((..., K) logits, as bisam_loss takes them). With a
    head, they take the hidden states and run the fused linear losses over head.weight / head.bias (read at
    each call: pass 2 sees the perturbed weights)."""
    if head is not None:
        def hidden_states(h):
            if not isinstance(h, torch.Tensor) or h.shape[-1] != head.weight.shape[1]:
                got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
                raise ValueError(f"with head=, the model must return hidden states (..., {head.weight.shape[1]}) "
                                 f"(the head's input width), got {got}: does the model still apply the head?")
            return h

        if name == "cross_entropy":
            return lambda h, y: fused_linear_cross_entropy(hidden_states(h), head.weight, y,
                                                           getattr(head, "bias", None), label_smoothing, reduction,
                                                           ignore_index, accum_dtype=accum_dtype)
        return lambda h, y: fused_linear_bisam_loss(hidden_states(h), head.weight, y, getattr(head, "bias", None),
                                                    name, mu, alpha, reduction, ignore_index, accum_dtype=accum_dtype)
    if name == "cross_entropy":
        return lambda z, y: cross_entropy(z, y, label_smoothing, smoothing_style, reduction, ignore_index)
    return lambda z, y: bisam_loss(z, y, phi=name, mu=mu, alpha=alpha, reduction=reduction, ignore_index=ignore_index)


def _split(batch, k: int) -> list:
    if isinstance(batch, torch.Tensor):
        return list(torch.tensor_split(batch, k))
    if isinstance(batch, (tuple, list)):
        parts = [_split(t, k) for t in batch]
        return [type(batch)(p[i] for p in parts) for i in range(k)]
    if isinstance(batch, Mapping):
        parts = {name: _split(t, k) for name, t in batch.items()}
        return [{name: p[i] for name, p in parts.items()} for i in range(k)]
    raise TypeError(f"inputs must be a tensor, a tuple/list or a dict of tensors, got {type(batch).__name__}")


def _call(model: nn.Module, inputs):
    """``model(inputs)``; ``model(*inputs)`` for a tuple/list, ``model(**inputs)`` for a dict."""
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def _ddp(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DDP wrapper of the model, also under ``torch.compile(DDP(model))`` (the order PyTorch recommends,
    whose ``OptimizedModule`` hides it), else None."""
    model = getattr(model, "_orig_mod", model)
    return model if isinstance(model, nn.parallel.DistributedDataParallel) else None


def _one_pass(model, chunks, targets_chunks, loss_fn, weights, backward, no_sync, autocast, sync: bool,
              keep_logits: bool):
    total, logits_out = None, []
    last = len(chunks) - 1
    for i, (x, y) in enumerate(zip(chunks, targets_chunks)):
        with contextlib.nullcontext() if sync and i == last else no_sync():
            with autocast():
                logits = _call(model, x)
                loss = loss_fn(logits, y)
                w = weights[i]
                if not (isinstance(w, float) and w == 1.0):
                    loss = loss * w
            backward(loss)
        total = loss.detach() if total is None else total + loss.detach()
        if keep_logits:
            logits_out.append(logits.detach())
    return total, logits_out


def bisam_step(
    model: nn.Module,
    optimizer: BiSAM,
    inputs,
    targets: torch.Tensor,
    *,
    ascent_loss: str | Callable = "log",
    mu: float = 1.0,
    alpha: float = 0.1,
    loss_fn: Callable | None = None,
    label_smoothing: float = 0.1,
    label_smoothing_style: str = "pytorch",
    ignore_index: int = -100,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    micro_batches: int = 1,
    sync_first_pass: bool = False,
    freeze_bn: bool = True,
    head: nn.Module | None = None,
    accum_dtype: torch.dtype | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> BiSAMStepOutput:
    """One BiSAM (or SAM) training step: two forward/backward passes and the optimizer update.

    Args:
        model: the network (plain, DDP-wrapped, or FSDP2-sharded); called as ``model(inputs)``
            (``model(*inputs)`` for a tuple, ``model(**inputs)`` for a dict of tensors).
        optimizer: a :class:`bisam_kernels.BiSAM` over the model's parameters.
        inputs, targets: the batch; for the built-in losses the model returns logits ``(N, K)`` or
            ``(..., K)`` with the classes last (a language model's ``(B, T, V)``) and ``targets`` are class
            indices of the logits' shape without the last dimension (or class probabilities of the
            logits' shape, for the cross-entropy).
        ascent_loss: the pass-1 loss at ``w``: ``"log"`` or ``"tanh"`` (BiSAM's lower bound,
            :func:`bisam_kernels.bisam_loss` with ``mu``/``alpha``), ``"cross_entropy"`` (plain SAM: the
            pass-2 loss, label smoothing included), or a callable ``(logits, targets) -> mean loss``.
        loss_fn: the pass-2 training loss at ``w + e``; default cross-entropy with ``label_smoothing``.
        label_smoothing_style: ``"pytorch"`` (``F.cross_entropy``'s ``s / K`` on every class) or
            ``"released"`` (the BiSAM release's ``smooth_crossentropy``: ``1 - s`` on the target, ``s / (K - 1)``
            on every other class; see :func:`bisam_kernels.smooth_cross_entropy`).
        ignore_index: targets ignored by the built-in losses (the mean is over the other rows; with no
            valid row the loss is NaN with one micro-batch, as ``F.cross_entropy``, 0 with several; the
            gradient is 0 either way).
        scaler: a ``torch.amp.GradScaler``; both passes are scaled, pass 1 needs no unscale (the
            perturbation direction does not depend on the scale), pass 2 goes through ``scaler.step`` and
            ``scaler.update``. An overflowed pass 1 (its perturbation skipped) counts as an overflowed
            step: the update is skipped and the scale backs off, on every DDP replica alike.
        autocast_dtype: run the forward passes under ``torch.autocast`` with this dtype (``torch.bfloat16``,
            ``torch.float16``); ``None``: no autocast (or the caller's own).
        micro_batches: split the batch into this many micro-batches and accumulate the gradients of
            both passes; the result equals one pass over the whole batch (up to BatchNorm batch statistics).
        sync_first_pass: DDP only. ``False`` (default): each replica perturbs with its own gradient
            (pass 1 under ``no_sync``, no communication, the "m-sharpness" of the SAM paper);
            ``True``: pass-1 gradients are all-reduced, so all replicas apply the same perturbation.
        freeze_bn: freeze BatchNorm running statistics in pass 2 (:func:`frozen_bn_stats`).
        head: the language-model form. The model returns hidden states ``(..., H)`` and ``head`` holds the
            output projection: a module with ``weight`` ``(V, H)`` and optionally ``bias`` ``(V,)`` (an
            ``nn.Linear``; an ``nn.Embedding`` for tied embeddings), among the optimizer's parameters. The
            built-in losses then run through :func:`bisam_kernels.fused_linear_bisam_loss` and
            :func:`bisam_kernels.fused_linear_cross_entropy`: the ``(..., V)`` logits are never
            materialised (label smoothing in the ``"pytorch"`` style only; class-index targets only). A
            callable loss receives the hidden states.
        accum_dtype: with ``head``, the fused losses' ``accum_dtype``: ``torch.float32`` sums a bfloat16 head's
            weight gradient in float32 over the chunks (their error otherwise grows with the chunk count).
        backward: how a pass's (micro-batch) loss is back-propagated; default ``scaler.scale(loss).backward()``
            (``loss.backward()`` without a scaler). For training frameworks that own the backward (Lightning's
            ``manual_backward``): it must apply the loss scaling of ``scaler`` itself; ``scaler`` is then used
            for the optimizer step and ``scaler.update`` only.
        no_sync: a context manager factory under which a backward does not all-reduce the gradients; default
            the DDP model's ``no_sync``, compiled or not (nothing for other models). Given: the model is taken to be replicated
            (data parallel), as for DDP.

    Returns :class:`BiSAMStepOutput` ``(ascent_loss, loss, logits, ascent_norm)``, detached, on the device
    (``logits`` is None in the language-model form).

    Runs eagerly (the optimizer steps are graph breaks under ``torch.compile``): compile the model.
    """
    if not isinstance(optimizer, BiSAM):
        raise TypeError(f"optimizer must be a bisam_kernels.BiSAM (or SAM), got {type(optimizer).__name__}")
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be a positive int, got {micro_batches!r}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    if targets.dim() == 0:
        raise ValueError("targets must have a batch dimension, got a 0-dim tensor")
    if accum_dtype is not None and head is None:
        raise ValueError("accum_dtype applies to the fused linear losses of the language-model form (head=) only")
    if label_smoothing_style not in SMOOTHING_STYLES:
        raise ValueError(f"label_smoothing_style must be one of {SMOOTHING_STYLES}, got {label_smoothing_style!r}")
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if head is not None:
        if not isinstance(getattr(head, "weight", None), torch.Tensor):
            raise TypeError(f"head must be a module with a weight (V, H) (an nn.Linear or nn.Embedding), got "
                            f"{type(head).__name__}")
        if label_smoothing_style != "pytorch":
            raise ValueError("the language-model form (head=) supports label_smoothing_style='pytorch' only")
        _check_accum_dtype(accum_dtype)  # (before pass 1 touches any gradient)
        if id(head.weight) not in optimized:
            raise ValueError("head.weight is not among the optimizer's parameters: pass the model's own output "
                             "projection (e.g. head=model.lm_head), whose parameters the optimizer updates")
    batch = targets.shape[0]
    if micro_batches > max(batch, 1):
        raise ValueError(f"micro_batches={micro_batches} exceeds the batch size {batch}")

    x_chunks, y_chunks = _split(inputs, micro_batches), _split(targets, micro_batches)
    # One micro-batch: the built-in losses are mean-reduced (as F.cross_entropy: NaN when no row is valid).
    # Several: sum-reduced and weighted by 1 / (valid rows of the whole batch, at least 1), on the device.
    # A user's mean-reduced loss is weighted by its micro-batch's share of the rows. Either way the
    # micro-batch losses add up to the batch mean.
    fractions = [y.shape[0] / max(batch, 1) for y in y_chunks]
    if micro_batches == 1:
        reduction, per_row = "mean", [1.0]
    elif targets.is_floating_point():  # class probabilities (..., K): every row counts
        reduction, per_row = "sum", [targets.shape[-1] / max(targets.numel(), 1)] * micro_batches
    else:
        n_valid = (targets != ignore_index).sum().clamp_min(1).to(torch.float32)  # no host sync
        reduction, per_row = "sum", [1.0 / n_valid] * micro_batches

    def builtin(name):
        return (_builtin_loss(name, reduction, mu, alpha, label_smoothing, label_smoothing_style, ignore_index, head,
                              accum_dtype), per_row)

    loss2, w2 = builtin("cross_entropy") if loss_fn is None else (loss_fn, fractions)
    if isinstance(ascent_loss, str):
        if ascent_loss not in _ASCENT_LOSSES:
            raise ValueError(f"ascent_loss must be one of {_ASCENT_LOSSES} or a callable, got {ascent_loss!r}")
        loss1, w1 = (loss2, w2) if ascent_loss == "cross_entropy" else builtin(ascent_loss)
    elif callable(ascent_loss):
        loss1, w1 = ascent_loss, fractions
    else:
        raise TypeError(f"ascent_loss must be a string or a callable, got {type(ascent_loss).__name__}")

    ddp = _ddp(model)
    distributed = no_sync is not None or ddp is not None
    if no_sync is None:
        no_sync = ddp.no_sync if ddp is not None else contextlib.nullcontext
    if backward is None:
        def backward(loss):
            (scaler.scale(loss) if scaler is not None else loss).backward()

    device_type = targets.device.type
    if autocast_dtype is not None:
        autocast = lambda: torch.autocast(device_type=device_type, dtype=autocast_dtype)  # noqa: E731
    else:
        autocast = contextlib.nullcontext

    optimizer.zero_grad()
    # The model's trainable parameters outside this optimizer (another optimizer's, say) keep the gradient
    # they had plus pass 2's, as after one forward/backward of the training loss: pass 1's (of the
    # surrogate at w) goes to a fresh tensor that is dropped.
    outside = [p for p in model.parameters() if p.requires_grad and id(p) not in optimized]
    outside_grads = [p.grad for p in outside]
    for p in outside:
        p.grad = None
    ascent, logits = _one_pass(model, x_chunks, y_chunks, loss1, w1, backward, no_sync, autocast, sync_first_pass,
                               head is None)
    norm = optimizer.first_step(zero_grad=True)
    for p, grad in zip(outside, outside_grads):
        p.grad = grad
    if scaler is not None and scaler.is_enabled() and not sync_first_pass and distributed:
        # Each replica perturbed with its own pass-1 gradients, so an overflow there is local: a NaN factor
        # on the pass-2 loss carries it through DDP's gradient all-reduce, and every replica skips the step.
        overflow = torch.where(torch.isfinite(norm), 1.0, float("nan")).to(torch.float32)
        w2 = [w * overflow for w in w2]
    with frozen_bn_stats(model) if freeze_bn else contextlib.nullcontext():
        try:
            loss, _ = _one_pass(model, x_chunks, y_chunks, loss2, w2, backward, no_sync, autocast, True, False)
        except BaseException:
            optimizer.restore()  # never leave the weights perturbed
            raise
    optimizer.second_step(zero_grad=True, scaler=scaler)
    if scaler is not None:
        scaler.update()
    if not logits:  # the language-model form: no logits exist
        logits = None
    else:
        logits = logits[0] if len(logits) == 1 else torch.cat(logits)
    return BiSAMStepOutput(ascent, loss, logits, norm.detach())
