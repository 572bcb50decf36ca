"""Hugging Face ``transformers.Trainer`` with BiSAM/SAM (``pip install bisam_kernels[huggingface]``).

:class:`BiSAMTrainer` is a ``Trainer`` whose training step is :func:`bisam_kernels.bisam_step` (both passes,
BatchNorm statistics frozen in pass 2 where the model has them)::

    trainer = BiSAMTrainer(
        model=model,                                   # a classifier (logits (N, K)) or a causal LM
        args=TrainingArguments(..., max_grad_norm=0),  # bf16=True for AMP; the Trainer's optimizer and schedule
        train_dataset=...,
        rho=0.05, ascent_loss="log",                   # BiSAM options; task="causal_lm" for language models
    )
    trainer.train()                                    # or trainer.train(resume_from_checkpoint=True)

The Trainer builds its optimizer as usual (``optim``, ``learning_rate``, ``weight_decay`` or
``optimizer_cls_and_kwargs``) and BiSAMTrainer wraps it in :class:`bisam_kernels.BiSAM`; schedulers,
logging, checkpoints (the base optimizer's state) and resuming are the Trainer's. The loss is computed from
the model's logits and the batch's ``labels`` (causal LMs: shifted by one token, ``-100`` ignored), not by
the model. Gradient accumulation is ``micro_batches=k``: both passes run over ``k`` micro-batches of the
device batch (the Trainer's ``gradient_accumulation_steps`` would step between micro-batches that SAM needs
together, so it must stay 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import transformers
from torch import nn

from bisam_kernels.optim import BiSAM
from bisam_kernels.training import BiSAMStepOutput, bisam_step

__all__ = ["BiSAMTrainer"]

TASKS = ("classification", "causal_lm")


class _Logits(nn.Module):
    """The model as bisam_step calls it: the batch's tensors in, what the loss takes out (see
    :meth:`BiSAMTrainer.loss_inputs`). A module, so that BatchNorm layers are found for freezing."""

    def __init__(self, model: nn.Module, select: Callable, call: Callable | None = None):
        super().__init__()
        self.model, self.select = model, select
        self.call = call or (lambda m, inputs: m(**inputs))  # how the model is run (its base, for a fused head)

    def forward(self, **inputs):
        return self.select(self.call(self.model, inputs))


class _SteppedOptimizer(torch.optim.Optimizer):
    """What the Trainer steps: nothing, as bisam_step has already stepped the BiSAM optimizer in the training
    step. Shares its param groups (the Trainer's LR scheduler sets their ``lr``) and its state dict (the
    Trainer's checkpoints)."""

    def __init__(self, bisam: BiSAM):  # no super().__init__: every attribute is the BiSAM optimizer's
        self.bisam = bisam
        self.defaults = bisam.defaults
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}

    @property
    def param_groups(self):
        return self.bisam.param_groups

    @property
    def state(self):
        return self.bisam.state

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.bisam.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return self.bisam.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.bisam.load_state_dict(state_dict)


class BiSAMTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains with BiSAM (or SAM: ``ascent_loss="cross_entropy"``).

    Args:
        *args, **kwargs: the ``Trainer``'s.
        rho, adaptive: :class:`bisam_kernels.BiSAM`'s radius and ASAM switch.
        task: ``"classification"`` (logits ``(N, K)`` or ``(..., K)`` against ``labels``) or ``"causal_lm"``
            (the logits of tokens ``0..T-2`` against the labels of tokens ``1..T-1``).
        fused_head: causal LMs: run the model's base (``model.base_model``: the decoder, its final norm
            included) and both passes' losses through :func:`bisam_kernels.fused_linear_bisam_loss` /
            :func:`bisam_kernels.fused_linear_cross_entropy` over its LM head (``get_output_embeddings()``;
            tied embeddings included, no bias): the ``(B, T, V)`` logits are never materialised. A
            constant logit scale (Cohere's ``logit_scale``, Granite's ``logits_scaling``) is applied to the
            hidden states; a model whose logits are otherwise not its head's output on the last hidden
            states (Gemma 2 and 3's final soft-capping, ...) is refused: at construction the trainer
            compares the two on four tokens.
        **step_options: :func:`bisam_kernels.bisam_step` options (``ascent_loss``, ``mu``, ``alpha``,
            ``loss_fn``, ``label_smoothing`` (default: the Trainer's ``label_smoothing_factor``),
            ``micro_batches``, ``sync_first_pass``, ``freeze_bn``, ...).

    AMP is the Trainer's ``bf16=True``. Refused, with the setting named: ``fp16=True`` (its GradScaler steps
    inside the Trainer's optimizer step, after SAM's two passes), ``gradient_accumulation_steps > 1`` (use
    ``micro_batches``), ``max_grad_norm > 0`` (the Trainer clips after the training step, where BiSAM has
    already stepped and zeroed the gradients), ``compute_loss_func`` (use ``ascent_loss=`` / ``loss_fn=``), and a causal language model
    (``*ForCausalLM``, ``*LMHeadModel``) with ``task="classification"``. The Trainer's logged ``loss`` is pass 2's
    (at ``w + e``); its logged ``grad_norm`` is 0: the BiSAM step consumes and zeroes the gradients before the
    Trainer looks (``BiSAMStepOutput.ascent_norm`` is the pass-1 norm).
    """

    def __init__(self, *args, rho: float = 0.05, adaptive: bool = False, task: str = "classification",
                 fused_head: bool = False, **kwargs):
        step_options = {name: kwargs.pop(name) for name in _STEP_OPTIONS if name in kwargs}
        super().__init__(*args, **kwargs)
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        settings = self.args
        for refused, why in (
            (settings.fp16, "fp16=True: use bf16=True (the fp16 GradScaler steps inside the Trainer's optimizer "
                            "step, after SAM's two passes)"),
            (settings.gradient_accumulation_steps != 1,
             f"gradient_accumulation_steps={settings.gradient_accumulation_steps}: use BiSAMTrainer(micro_batches=k) "
             "(SAM needs every micro-batch in both passes)"),
            (settings.max_grad_norm > 0, f"max_grad_norm={settings.max_grad_norm}: set TrainingArguments(max_grad_norm=0) "
                                         "(the Trainer clips after the training step, where BiSAM has already stepped)"),
        ):
            if refused:
                raise ValueError(f"BiSAMTrainer does not support TrainingArguments {why}")
        if self.compute_loss_func is not None:
            raise ValueError("BiSAMTrainer does not use compute_loss_func: pass the losses as ascent_loss= (pass 1) and "
                             "loss_fn= (pass 2), callables (logits, targets) -> loss")
        model_class = type(self.model).__name__
        config = getattr(self.model, "config", None)
        if getattr(config, "is_encoder_decoder", False) and self.model.get_output_embeddings() is not None:
            raise ValueError(f"{model_class} is a sequence-to-sequence LM: BiSAMTrainer supports classifiers (encoder-"
                             "decoder ones included) and causal LMs (the labels are taken out of the batch, so its "
                             "decoder inputs would not be built from them)")
        problem_type = getattr(config, "problem_type", None)
        if (task == "classification" and problem_type in ("regression", "multi_label_classification")
                and "loss_fn" not in step_options):
            raise ValueError(f"the model's problem_type is {problem_type!r}: BiSAMTrainer's built-in losses are "
                             "single-label; pass ascent_loss= and loss_fn= callables for this problem's loss")
        if task == "classification" and (model_class.endswith("ForCausalLM") or model_class.endswith("LMHeadModel")):
            raise ValueError(f"{model_class} looks like a causal language model: pass task='causal_lm' (its labels are "
                             "the next tokens; task='classification' would train it to copy the current token)")
        if fused_head and (task != "causal_lm" or getattr(self.model, "get_output_embeddings", lambda: None)() is None):
            raise ValueError("fused_head=True needs task='causal_lm' and a model with an output projection "
                             "(get_output_embeddings(), its LM head)")
        if step_options.get("accum_dtype") is not None and not fused_head:
            raise ValueError("accum_dtype applies to the fused linear losses: it needs fused_head=True")
        self.rho, self.adaptive, self.task, self.fused_head = rho, adaptive, task, fused_head
        self.head_scale = _fused_head_scale(self.model) if fused_head else None
        self.bisam_step_options = {"label_smoothing": settings.label_smoothing_factor, **step_options}
        self.bisam_optimizer: BiSAM | None = None

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, wrapped in BiSAM; the Trainer sees a stand-in whose step does nothing."""
        if self.optimizer is None:
            base = super().create_optimizer(model)
            self.bisam_optimizer = BiSAM(None, base, rho=self.rho, adaptive=self.adaptive)
            self.optimizer = _SteppedOptimizer(self.bisam_optimizer)
        return self.optimizer

    def loss_inputs(self, outputs) -> torch.Tensor:
        """What the losses take from the model's outputs: the logits (of tokens ``0..T-2`` for a causal LM).
        The hook for a fused linear loss: return the last hidden states here (with ``output_hidden_states``)
        and pass ``ascent_loss=`` / ``loss_fn=`` callables that take them with the targets."""
        if isinstance(outputs, torch.Tensor):
            logits = outputs
        else:  # a ModelOutput or a dict has "logits"; a tuple has them first
            logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        return logits[:, :-1] if self.task == "causal_lm" else logits

    def loss_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """The targets that match :meth:`loss_inputs`: ``labels`` (of tokens ``1..T-1`` for a causal LM)."""
        return labels[:, 1:] if self.task == "causal_lm" else labels

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        inputs = dict(self._prepare_inputs(inputs))
        if "labels" not in inputs:
            raise ValueError(f"BiSAMTrainer needs the batch's 'labels'; the batch has {sorted(inputs)}")
        out = self.bisam_step(model, inputs)
        return out.loss

    def bisam_step(self, model: nn.Module, inputs: dict) -> BiSAMStepOutput:
        """One BiSAM step on a prepared batch (a dict with ``labels``) through the Trainer's accelerator."""
        if self.bisam_optimizer is None:
            raise RuntimeError("BiSAMTrainer's optimizer was replaced: pass no optimizers=(...) to BiSAMTrainer "
                               "(its create_optimizer wraps the Trainer's optimizer in BiSAM)")
        targets = self.loss_targets(inputs.pop("labels"))
        replicated = self.accelerator.num_processes > 1
        if self.fused_head:  # the decoder's last hidden states of tokens 0..T-2; the head is the fused loss's
            scale = self.head_scale
            stepped = _Logits(model, lambda out: _scaled(out.last_hidden_state[:, :-1], scale),
                              call=lambda m, i: m.base_model(**i))
            head = {"head": model.get_output_embeddings()}
            if self.args.bf16:  # Accelerate's autocast wraps the model's own forward only, not its base's
                head["autocast_dtype"] = torch.bfloat16
        else:
            stepped, head = _Logits(model, self.loss_inputs), {}
        return bisam_step(
            stepped,
            self.bisam_optimizer,
            inputs,
            targets,
            **self.bisam_step_options,
            **head,
            no_sync=(lambda: self.accelerator.no_sync(model)) if replicated else None,
        )


def _scaled(hidden: torch.Tensor, scale: float) -> torch.Tensor:
    return hidden if scale == 1.0 else hidden * scale


def _fused_head_scale(model: nn.Module) -> float:
    """The factor s with ``model(ids).logits == lm_head(s * base_model(ids).last_hidden_state)``: the config's
    ``logit_scale`` (Cohere) or ``1 / logits_scaling`` (Granite), else 1. Checked on four tokens, in eval
    mode; a model for which no such s holds is refused (a fused head would train on other logits)."""
    config = getattr(model, "config", None)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        raise ValueError(f"fused_head=True: {type(model).__name__} soft-caps its logits "
                         f"(config.final_logit_softcapping={cap}), which the fused linear losses do not: "
                         "use fused_head=False")
    scale = float(getattr(config, "logit_scale", None) or 1.0) / float(getattr(config, "logits_scaling", None) or 1.0)
    head = model.get_output_embeddings()
    ids = torch.arange(min(4, head.weight.shape[0]), device=head.weight.device).unsqueeze(0)
    training = model.training
    model.eval()  # (no dropout)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
            fused = head(_scaled(model.base_model(input_ids=ids).last_hidden_state, scale)).float()
    finally:
        model.train(training)
    tolerance = 1e-2 * (1e-3 + logits.abs().max().item())  # (bf16 models included)
    if logits.shape != fused.shape or (logits - fused).abs().max().item() > tolerance:
        raise ValueError(f"fused_head=True: {type(model).__name__}'s logits are not its LM head's output on the last "
                         "hidden states (times a constant scale): the model post-processes them, and a fused head "
                         "would train on other logits. Use fused_head=False")
    return scale


# bisam_step's options that BiSAMTrainer takes as keywords (the rest are the Trainer's or its own).
_STEP_OPTIONS = ("ascent_loss", "mu", "alpha", "loss_fn", "label_smoothing", "label_smoothing_style",
                 "ignore_index", "micro_batches", "sync_first_pass", "freeze_bn", "accum_dtype")
