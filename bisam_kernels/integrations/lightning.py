"""Lightning: train a ``LightningModule`` with BiSAM/SAM (``pip install bisam_kernels[lightning]``).

Subclass :class:`BiSAMModule` instead of ``LightningModule``; its ``training_step`` runs
:func:`bisam_kernels.bisam_step` (both passes, BatchNorm statistics frozen in pass 2) under Lightning's
manual optimization::

    class Classifier(BiSAMModule):
        def __init__(self):
            super().__init__(ascent_loss="log", micro_batches=1)  # any bk.bisam_step option
            self.net = ...

        def forward(self, x):
            return self.net(x)  # logits

        def configure_optimizers(self):
            opt = bk.BiSAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=...)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    L.Trainer(max_epochs=30, precision="16-mixed", strategy="ddp").fit(Classifier(), loader)

Lightning keeps what it owns: autocast and the loss scaling of its precision plugin (``"16-mixed"``: its
GradScaler, through ``manual_backward``; ``"bf16-mixed"``), DDP's gradient all-reduce (pass 1 per replica
under ``no_sync`` unless ``sync_first_pass=True``), checkpoints (the optimizer's state, the schedulers,
the step count) and ``global_step``. The schedulers of ``configure_optimizers`` step as in automatic
optimization (``interval`` ``"step"`` or ``"epoch"``, ``frequency``). Gradient accumulation is
``micro_batches=k`` (the batch is split; Lightning's ``accumulate_grad_batches`` needs automatic
optimization, which SAM's two passes rule out).
"""

from __future__ import annotations

import inspect

import lightning.pytorch as pl
import torch
from torch.nn.parallel import DistributedDataParallel

from bisam_kernels.optim import BiSAM
from bisam_kernels.training import BiSAMStepOutput, bisam_step

__all__ = ["BiSAMModule"]

# bisam_step options that the Trainer sets (precision plugin, strategy), not the module.
_OWNED_BY_LIGHTNING = {
    "scaler": "Trainer(precision='16-mixed') brings its GradScaler",
    "autocast_dtype": "Trainer(precision='16-mixed' or 'bf16-mixed') autocasts the training step",
    "backward": "Lightning's manual_backward is used",
    "no_sync": "the Trainer's strategy decides",
}


def _check_step_options(options: dict) -> None:
    for name, reason in _OWNED_BY_LIGHTNING.items():
        if name in options:
            raise TypeError(f"BiSAMModule does not take the bisam_step option {name!r}: {reason}")
    known = set(inspect.signature(bisam_step).parameters) - {"model", "optimizer", "inputs", "targets"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown bisam_step option(s) {unknown}; the options are {sorted(known - set(_OWNED_BY_LIGHTNING))}")


class BiSAMModule(pl.LightningModule):
    """A ``LightningModule`` whose training step is :func:`bisam_kernels.bisam_step`.

    Args:
        **step_options: :func:`bisam_kernels.bisam_step` options (``ascent_loss``, ``mu``, ``alpha``,
            ``loss_fn``, ``label_smoothing``, ``micro_batches``, ``sync_first_pass``, ``freeze_bn``, ...); not
            ``scaler``, ``autocast_dtype``, ``backward`` or ``no_sync``, which come from the Trainer.

    ``forward`` returns the logits; batches are ``(inputs, targets)`` (override :meth:`training_step` and
    call :meth:`bisam_step` for other layouts). ``configure_optimizers`` returns one
    :class:`bisam_kernels.BiSAM` (or ``SAM``), with optional LR schedulers. Logs ``train_loss`` (pass 2, at
    ``w + e``) and ``train_ascent_loss`` (pass 1, at ``w``). Overrides of ``on_fit_start`` (it checks that
    automatic optimization is off), ``on_train_epoch_end`` (it steps the epoch-interval schedulers) and
    ``on_train_batch_start`` / ``on_train_batch_end`` (they check that the step took a BiSAM step) call
    ``super()``. ReduceLROnPlateau is refused at fit start (step it yourself).
    """

    def __init__(self, **step_options):
        super().__init__()
        _check_step_options(step_options)
        self.automatic_optimization = False  # the two passes and both optimizer steps are bisam_step's
        self.bisam_step_options = step_options

    def training_step(self, batch, batch_idx: int):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"BiSAMModule.training_step expects (inputs, targets) batches, got {type(batch).__name__}: "
                            "override training_step and call self.bisam_step(inputs, targets)")
        inputs, targets = batch
        out = self.bisam_step(inputs, targets)
        self.log("train_loss", out.loss, prog_bar=True)
        self.log("train_ascent_loss", out.ascent_loss)
        return out.loss

    def bisam_step(self, inputs, targets, **step_options) -> BiSAMStepOutput:
        """One BiSAM step on a batch, through the Trainer's precision and strategy; ``step_options`` override
        the module's. Counts as one optimizer step (``global_step``) and steps the step-interval schedulers."""
        _check_step_options(step_options)
        self._check_manual_optimization()
        lightning_optimizer = self.optimizers()
        if isinstance(lightning_optimizer, list):
            raise ValueError(
                f"configure_optimizers must return one optimizer for BiSAMModule, got {len(lightning_optimizer)}"
            )
        optimizer = lightning_optimizer.optimizer
        if not isinstance(optimizer, BiSAM):
            raise TypeError(
                "configure_optimizers must return a bisam_kernels.BiSAM (or SAM) for BiSAMModule, "
                f"got {type(optimizer).__name__}"
            )
        strategy = self.trainer.strategy
        replicated = isinstance(strategy.model, DistributedDataParallel)
        # Lightning counts an optimizer step (global_step, the step progress in checkpoints) through these
        # two hooks of the LightningOptimizer; its step() cannot run SAM's two passes under every precision
        # plugin (a GradScaler would run the closure before the perturbation), so bisam_step steps instead.
        lightning_optimizer._on_before_step()
        out = bisam_step(
            self,
            optimizer,
            inputs,
            targets,
            **{**self.bisam_step_options, **step_options},
            scaler=getattr(strategy.precision_plugin, "scaler", None),
            backward=self.manual_backward,
            no_sync=strategy.block_backward_sync if replicated else None,
        )
        lightning_optimizer._on_after_step()
        self._stepped = True
        self._step_schedulers("step", self.trainer.fit_loop.epoch_loop.batch_idx + 1)
        return out

    def on_train_batch_start(self, batch, batch_idx: int):
        self._stepped = False

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if not self._stepped:  # (Lightning would otherwise loop without ever counting a step)
            raise RuntimeError(f"{type(self).__name__}.training_step took no BiSAM step: a training_step of a "
                               "BiSAMModule must call self.bisam_step(inputs, targets)")

    def on_fit_start(self) -> None:
        self._check_manual_optimization()  # in automatic optimization Lightning would step the optimizer first
        for config in self.trainer.lr_scheduler_configs:
            # (Lightning clears reduce_on_plateau under manual optimization: the scheduler's type tells)
            if config.reduce_on_plateau or isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                raise ValueError(
                    "BiSAMModule does not step ReduceLROnPlateau: step it yourself where its metric is known "
                    "(e.g. in on_validation_epoch_end)"
                )

    def _check_manual_optimization(self) -> None:
        if self.automatic_optimization:
            raise RuntimeError(
                f"{type(self).__name__}.automatic_optimization is True: BiSAM needs manual optimization "
                "(BiSAMModule.__init__ sets it to False; do not set it back)"
            )

    def on_train_epoch_end(self) -> None:
        # Only for a whole epoch: a max_steps stop mid-epoch runs this hook too, where Lightning's automatic
        # optimization steps no epoch-interval scheduler.
        if self.trainer.fit_loop.epoch_loop._num_ready_batches_reached():
            self._step_schedulers("epoch", self.trainer.current_epoch + 1)

    def _step_schedulers(self, interval: str, count: int) -> None:
        """Lightning's rule for automatic optimization: when ``count`` (the batch's index in its epoch, from 1,
        or the epoch's, from 1) is a multiple of the ``frequency``."""
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == interval and count % config.frequency == 0:
                config.scheduler.step()
