"""bisam_kernels.integrations.lightning with the real Lightning Trainer, on the CPU: the Trainer's run follows the
plain ``bk.bisam_step`` loop (same initialisation, same batches) under each precision plugin, with micro-batches
and LR schedulers; a run resumed from a Trainer checkpoint continues exactly; DDP over gloo; misconfigurations
raise errors that name them."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import bisam_kernels as bk
from test_distributed import _per_replica_reference_step
from test_optim import assert_models_close

L = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402
from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: E402

from bisam_kernels.integrations.lightning import BiSAMModule  # noqa: E402

BATCH, STEPS_PER_EPOCH = 8, 3


def _net(norm: str = "bn") -> nn.Module:
    """SiLU, not ReLU: runs that agree to rounding (DDP's all-reduce) stay close (see test_optim.small_cnn)."""
    layer = nn.BatchNorm1d(16) if norm == "bn" else nn.LayerNorm(16)
    return nn.Sequential(nn.Linear(6, 16, bias=False), layer, nn.SiLU(), nn.Linear(16, 5))


def _data(seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    n = BATCH * STEPS_PER_EPOCH
    return TensorDataset(torch.randn(n, 6, generator=gen), torch.randint(0, 5, (n,), generator=gen))


def _make_optimizer(params):
    return bk.BiSAM(params, torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9, weight_decay=1e-3)


def _make_scheduler(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.8)


class Classifier(BiSAMModule):
    def __init__(self, net: nn.Module, interval: str = "step", frequency: int = 1, **step_options):
        super().__init__(**step_options)
        self.net, self.interval, self.frequency = net, interval, frequency

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        opt = _make_optimizer(self.parameters())
        schedule = {"scheduler": _make_scheduler(opt), "interval": self.interval, "frequency": self.frequency}
        return {"optimizer": opt, "lr_scheduler": schedule}


def _trainer(**kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    return L.Trainer(**{**options, **kwargs})


def _fit(module: BiSAMModule, data: TensorDataset, **trainer_kwargs) -> L.Trainer:
    trainer = _trainer(**trainer_kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, DataLoader(data, batch_size=BATCH))
    return trainer


def _ddp_batches(data: TensorDataset, epoch: int, replicas: int = 2):
    """The global batches of Lightning's DDP run: its DistributedSampler shuffles training data (seed 0 plus
    the epoch) and deals the order out to the replicas in turn; each replica takes BATCH // replicas."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch))
    per_replica = [order[r::replicas] for r in range(replicas)]
    for i in range(0, len(per_replica[0]), BATCH // replicas):
        idx = torch.cat([p[i : i + BATCH // replicas] for p in per_replica])
        yield data[idx]


def _plain_loop(net, data, epochs, interval, frequency, precision, **step_options):
    """What the Trainer should do: bk.bisam_step over the same batches, schedulers stepped by hand (Lightning's
    rule: a step-interval frequency counts the batches of each epoch)."""
    opt = _make_optimizer(net.parameters())
    sched = _make_scheduler(opt)
    amp = {"16-mixed": dict(scaler=torch.amp.GradScaler("cpu"), autocast_dtype=torch.float16),
           "bf16-mixed": dict(autocast_dtype=torch.bfloat16)}.get(precision, {})
    for epoch in range(epochs):
        for batch_idx, (x, y) in enumerate(DataLoader(data, batch_size=BATCH)):
            bk.bisam_step(net, opt, x, y, **amp, **step_options)
            if interval == "step" and (batch_idx + 1) % frequency == 0:
                sched.step()
        if interval == "epoch" and (epoch + 1) % frequency == 0:
            sched.step()
    return opt


@pytest.mark.parametrize(
    "precision, interval, frequency, step_options",
    [
        ("32-true", "step", 1, dict(ascent_loss="log")),
        ("32-true", "epoch", 1, dict(ascent_loss="tanh", micro_batches=2)),
        ("32-true", "step", 2, dict(ascent_loss="cross_entropy", label_smoothing=0.0)),  # plain SAM
        ("16-mixed", "step", 1, dict()),
        ("bf16-mixed", "epoch", 1, dict(micro_batches=2)),
    ],
)
def test_trainer_follows_the_plain_bisam_step_loop(precision, interval, frequency, step_options):
    data = _data()
    module = Classifier(_net(), interval, frequency, **step_options)
    plain = copy.deepcopy(module.net)
    if precision == "16-mixed":  # Lightning turns Trainer(precision="16-mixed") into bf16 on the CPU: ask for it
        trainer = _fit(module, data, plugins=[MixedPrecision("16-mixed", "cpu")])
    else:
        trainer = _fit(module, data, precision=precision)
    opt = _plain_loop(plain, data, 2, interval, frequency, precision, **step_options)
    assert trainer.global_step == 2 * STEPS_PER_EPOCH  # Lightning counted every BiSAM step
    assert_models_close(module.net, plain, 1e-6)  # weights and BatchNorm statistics
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


class _AutomaticSGD(L.LightningModule):
    """The reference for when schedulers step: Lightning's automatic optimization with the same schedule."""

    def __init__(self, interval: str, frequency: int):
        super().__init__()
        self.net, self.interval, self.frequency = _net(), interval, frequency

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05)
        schedule = {"scheduler": _make_scheduler(opt), "interval": self.interval, "frequency": self.frequency}
        return {"optimizer": opt, "lr_scheduler": schedule}


@pytest.mark.parametrize("interval, frequency, limits", [
    ("step", 2, dict(max_epochs=2)),  # 3 batches per epoch: the frequency counts each epoch's batches
    ("step", 2, dict(max_epochs=3)),
    ("epoch", 1, dict(max_steps=5)),  # stops mid-epoch: no scheduler step for the cut epoch
    ("epoch", 2, dict(max_epochs=3)),
])
def test_schedulers_step_when_automatic_optimization_steps_them(interval, frequency, limits):
    steps = []
    for module in (_AutomaticSGD(interval, frequency), Classifier(_net(), interval, frequency)):
        trainer = _fit(module, _data(), **{"max_epochs": -1, **limits})
        steps.append((trainer.lr_scheduler_configs[0].scheduler.last_epoch, trainer.global_step))
    assert steps[1] == steps[0]


def test_resume_from_a_trainer_checkpoint_continues_exactly(tmp_path):
    data = _data()
    net = _net()
    straight = Classifier(copy.deepcopy(net))
    _fit(straight, data, max_epochs=2)

    first = Classifier(copy.deepcopy(net))
    trainer = _fit(first, data, max_epochs=1)
    path = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(path)
    resumed = Classifier(_net())  # other weights: everything comes from the checkpoint
    trainer = _trainer(max_epochs=2)
    trainer.fit(resumed, DataLoader(data, batch_size=BATCH), ckpt_path=path)
    assert trainer.global_step == 2 * STEPS_PER_EPOCH
    assert_models_close(resumed, straight, 0)


class _AutomaticClassifier(Classifier):
    def __init__(self):
        super().__init__(_net())
        self.automatic_optimization = True


class _AdamClassifier(Classifier):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters())


class _PlateauClassifier(Classifier):
    def configure_optimizers(self):
        opt = _make_optimizer(self.parameters())
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": "train_loss"}}


class _PlainStepClassifier(Classifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)  # forgets self.bisam_step


@pytest.mark.parametrize(
    "module, error, match",
    [
        (_AutomaticClassifier, RuntimeError, "automatic_optimization is True"),
        (_AdamClassifier, TypeError, "configure_optimizers must return a bisam_kernels.BiSAM .* got Adam"),
        (_PlateauClassifier, ValueError, "does not step ReduceLROnPlateau"),
        (_PlainStepClassifier, RuntimeError, "must call self.bisam_step"),
    ],
)
def test_misconfigured_module_errors_name_the_cause(module, error, match):
    with pytest.raises(error, match=match):
        _fit(module() if module is _AutomaticClassifier else module(_net()), _data(), max_epochs=1)


def test_trainer_accumulation_is_refused_by_lightning_with_its_setting_named():
    """Accumulation is BiSAMModule(micro_batches=k); Lightning refuses its own in manual optimization."""
    with pytest.raises(MisconfigurationException, match="accumulate_grad_batches=2"):
        _fit(Classifier(_net()), _data(), accumulate_grad_batches=2)


def test_unknown_step_options_are_refused_at_construction():
    with pytest.raises(TypeError, match=r"unknown bisam_step option\(s\) \['ascnet_loss'\]"):
        Classifier(_net(), ascnet_loss="tanh")


def test_options_owned_by_the_trainer_are_refused():
    with pytest.raises(TypeError, match="'scaler'.*precision='16-mixed'"):
        Classifier(_net(), scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(TypeError, match="'autocast_dtype'"):
        Classifier(_net(), autocast_dtype=torch.bfloat16)


class _SpawnedClassifier(Classifier):
    def teardown(self, stage: str) -> None:
        # The last hook a spawned worker runs. Once, in CI, rank 1 aborted at interpreter exit ("terminate called
        # without an active exception") after fit had finished: the gloo group is destroyed here instead, so
        # nothing of it is left to tear down at exit (about 5 s a test).
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.parametrize("sync_first_pass", [True, False])
def test_ddp_follows_the_single_process_recomputation(sync_first_pass):
    """Two gloo processes, each half of every batch (Lightning's DistributedSampler). A synchronised pass 1
    is one process's step on the whole batch; per-replica pass 1 (the default: each replica perturbs with
    its own half's gradient, under the strategy's no_sync) averages the halves' pass-2 gradients, each taken
    at its own perturbation (test_distributed's recomputation). LayerNorm: no batch statistics."""
    data = _data()
    module = _SpawnedClassifier(_net("ln"), sync_first_pass=sync_first_pass)
    plain = copy.deepcopy(module.net)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer = _trainer(strategy="ddp_spawn", devices=2, max_epochs=1)
        trainer.fit(module, DataLoader(data, batch_size=BATCH // 2))
    opt = _make_optimizer(plain.parameters())
    sched = _make_scheduler(opt)
    for x, y in _ddp_batches(data, epoch=0):
        if sync_first_pass:
            bk.bisam_step(plain, opt, x, y)
        else:
            _per_replica_reference_step(plain, opt, x, y)
        sched.step()
    assert_models_close(module.net, plain, 1e-6)
