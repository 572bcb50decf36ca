"""bisam_kernels.integrations.huggingface with the real transformers Trainer, on the CPU: a classifier with
BatchNorm and a tiny GPT-2 follow the plain ``bk.bisam_step`` loop (same initialisation, batches in order, the
Trainer's linear schedule), with micro-batches and bf16 autocast; a run resumed from a Trainer checkpoint
continues exactly; unsupported settings raise errors that name them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import bisam_kernels as bk
from test_optim import assert_models_close

transformers = pytest.importorskip("transformers")
from bisam_kernels.integrations.huggingface import BiSAMTrainer  # noqa: E402

BATCH, STEPS_PER_EPOCH, LR = 8, 3, 0.05


class TinyClassifier(nn.Module):
    """Features in, ``{"logits": ...}`` out, with BatchNorm (frozen in pass 2)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16, bias=False), nn.BatchNorm1d(16), nn.SiLU(), nn.Linear(16, 5))

    def forward(self, features, labels=None):
        return {"logits": self.net(features)}


def _tiny_gpt2() -> nn.Module:
    config = transformers.GPT2Config(vocab_size=40, n_positions=12, n_embd=16, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _classification_data():
    gen = torch.Generator().manual_seed(0)
    n = BATCH * STEPS_PER_EPOCH
    x, y = torch.randn(n, 6, generator=gen), torch.randint(0, 5, (n,), generator=gen)
    return [{"features": x[i], "labels": y[i]} for i in range(n)]


def _lm_data():
    gen = torch.Generator().manual_seed(0)
    n = BATCH * STEPS_PER_EPOCH
    ids = torch.randint(0, 40, (n, 10), generator=gen)
    labels = ids.clone()
    labels[::3, 7:] = -100  # padding-like positions, ignored by the losses
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def _args(tmp_path, **kwargs) -> transformers.TrainingArguments:
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, num_train_epochs=2,
                   learning_rate=LR, lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=0.0,
                   train_sampling_strategy="sequential", save_strategy="no", logging_strategy="no",
                   report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    return transformers.TrainingArguments(**{**options, **kwargs})


def _trainer(model, data, tmp_path, step_options=None, **args) -> BiSAMTrainer:
    return BiSAMTrainer(model=model, args=_args(tmp_path, **args), train_dataset=data, rho=0.1,
                        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": LR, "momentum": 0.9}),
                        **(step_options or {}))


class _Logits(nn.Module):
    """The plain loop's model: the batch's tensors in, the logits the losses take out."""

    def __init__(self, model, causal: bool):
        super().__init__()
        self.model, self.causal = model, causal

    def forward(self, **inputs):
        logits = self.model(**inputs)["logits"]
        return logits[:, :-1] if self.causal else logits


def _plain_loop(model, data, epochs, causal, autocast_dtype=None, **step_options):
    opt = bk.BiSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=LR, momentum=0.9)
    sched = transformers.get_linear_schedule_with_warmup(opt, 0, epochs * STEPS_PER_EPOCH)
    net = _Logits(model, causal)
    for _ in range(epochs):
        for i in range(0, len(data), BATCH):
            batch = torch.utils.data.default_collate(data[i : i + BATCH])
            labels = batch.pop("labels")
            bk.bisam_step(net, opt, batch, labels[:, 1:] if causal else labels, label_smoothing=0.0,
                          autocast_dtype=autocast_dtype, **step_options)
            sched.step()


@pytest.mark.parametrize(
    "task, step_options",
    [
        ("classification", dict(ascent_loss="log")),
        ("classification", dict(ascent_loss="tanh", micro_batches=2)),
        ("causal_lm", dict(ascent_loss="log")),
        ("causal_lm", dict(ascent_loss="cross_entropy", micro_batches=2)),  # plain SAM
    ],
)
def test_trainer_follows_the_plain_bisam_step_loop(tmp_path, task, step_options):
    causal = task == "causal_lm"
    model, data = (_tiny_gpt2(), _lm_data()) if causal else (TinyClassifier(), _classification_data())
    plain = copy.deepcopy(model)
    trainer = _trainer(model, data, tmp_path, dict(task=task, **step_options))
    trainer.train()
    assert trainer.state.global_step == 2 * STEPS_PER_EPOCH
    _plain_loop(plain, data, 2, causal, **step_options)
    assert_models_close(model, plain, 1e-6)  # weights and BatchNorm statistics


def _largest_relative_gap(ours: nn.Module, ref: nn.Module) -> float:
    return max(((w.double() - ref.state_dict()[n].double()).norm() / ref.state_dict()[n].double().norm().clamp_min(1e-30)).item()
               for n, w in ours.state_dict().items() if w.is_floating_point())


def test_bf16_autocast_comes_from_the_trainer_settings(tmp_path):
    """bf16=True runs both passes in bf16: the blocks' outputs are bf16, and the run follows the plain bf16 loop,
    not the fp32 one. (Not bit for bit: the Trainer's batches reach oneDNN's bf16 matmuls in another layout,
    and a last-bit difference grows over the steps: up to 6% of the bf16-fp32 gap over 8 seeds.)"""
    model, data = _tiny_gpt2(), _lm_data()
    plain_bf16, plain_fp32 = copy.deepcopy(model), copy.deepcopy(model)
    dtypes = set()
    model.transformer.h[0].mlp.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    _trainer(model, data, tmp_path, dict(task="causal_lm"), bf16=True, num_train_epochs=1).train()
    assert dtypes == {torch.bfloat16}
    _plain_loop(plain_bf16, data, 1, True, autocast_dtype=torch.bfloat16)
    _plain_loop(plain_fp32, data, 1, True)
    assert _largest_relative_gap(model, plain_bf16) <= 0.25 * _largest_relative_gap(model, plain_fp32)


def test_resume_from_a_trainer_checkpoint_continues_exactly(tmp_path):
    data = _classification_data()
    model = TinyClassifier()
    straight = copy.deepcopy(model)
    _trainer(straight, data, tmp_path / "straight").train()

    _trainer(model, data, tmp_path / "run", save_strategy="steps", save_steps=4).train()
    resumed = TinyClassifier()  # other weights: everything comes from the checkpoint
    _trainer(resumed, data, tmp_path / "run").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    assert_models_close(resumed, straight, 0)


@pytest.mark.parametrize(
    "setting, match",
    [
        (dict(gradient_accumulation_steps=2), "gradient_accumulation_steps=2: use BiSAMTrainer\\(micro_batches=k\\)"),
        (dict(max_grad_norm=1.0), "max_grad_norm=1.0: set TrainingArguments\\(max_grad_norm=0\\)"),
    ],
)
def test_unsupported_settings_are_named(tmp_path, setting, match):
    with pytest.raises(ValueError, match=match):
        _trainer(TinyClassifier(), _classification_data(), tmp_path, **setting)


def test_missing_labels_and_an_unknown_task_are_named(tmp_path):
    with pytest.raises(ValueError, match="task must be one of"):
        _trainer(TinyClassifier(), _classification_data(), tmp_path, dict(task="regression"))
    unlabelled = [{"features": row["features"]} for row in _classification_data()]
    with pytest.raises(ValueError, match="needs the batch's 'labels'"):
        _trainer(TinyClassifier(), unlabelled, tmp_path).train()


def test_models_the_built_in_losses_do_not_fit_are_refused(tmp_path):
    """A sequence-to-sequence LM (its decoder inputs come from the labels, which the step takes out) and a
    multi-label or regression problem type without the user's own losses are named, not trained wrongly; an
    encoder-decoder classifier, a multi-label model with its own losses, and soft (float) labels through the
    built-in cross-entropy train."""
    bart = dict(vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=16)
    with pytest.raises(ValueError, match="sequence-to-sequence LM"):
        _trainer(transformers.BartForConditionalGeneration(transformers.BartConfig(**bart)), _lm_data(), tmp_path)
    classifier = transformers.BartForSequenceClassification(transformers.BartConfig(**bart, num_labels=5))
    eos = classifier.config.eos_token_id  # (its classification head reads the one end-of-sequence token)
    ids = [{"input_ids": torch.cat([torch.where(row["input_ids"][:-1] == eos, eos + 1, row["input_ids"][:-1]),
                                    torch.tensor([eos])]), "labels": row["input_ids"][0] % 5} for row in _lm_data()]
    _trainer(classifier, ids, tmp_path / "bart", dict(ascent_loss="cross_entropy"), num_train_epochs=1).train()

    def multi_label():
        model = TinyClassifier()
        model.config = transformers.PretrainedConfig(problem_type="multi_label_classification")
        return model

    with pytest.raises(ValueError, match="problem_type is 'multi_label_classification'"):
        _trainer(multi_label(), _classification_data(), tmp_path)
    bce = lambda z, y: nn.functional.binary_cross_entropy_with_logits(z, y)  # noqa: E731
    multi_hot = [dict(row, labels=(torch.rand(5) < 0.4).float()) for row in _classification_data()]
    _trainer(multi_label(), multi_hot, tmp_path / "bce", dict(ascent_loss=bce, loss_fn=bce), num_train_epochs=1).train()

    hard, soft = TinyClassifier(), TinyClassifier()
    soft.load_state_dict(hard.state_dict())
    one_hot = [dict(row, labels=nn.functional.one_hot(row["labels"], 5).float()) for row in _classification_data()]
    _trainer(hard, _classification_data(), tmp_path / "hard", dict(ascent_loss="cross_entropy")).train()
    _trainer(soft, one_hot, tmp_path / "soft", dict(ascent_loss="cross_entropy")).train()
    assert_models_close(soft, hard, 1e-6)


def test_a_causal_lm_as_classification_and_compute_loss_func_are_refused(tmp_path):
    with pytest.raises(ValueError, match="looks like a causal language model: pass task='causal_lm'"):
        _trainer(_tiny_gpt2(), _lm_data(), tmp_path)
    with pytest.raises(ValueError, match="does not use compute_loss_func"):
        BiSAMTrainer(model=TinyClassifier(), args=_args(tmp_path), train_dataset=_classification_data(),
                     compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum())


@pytest.mark.parametrize("ascent_loss", ["log", "cross_entropy"])
def test_fused_head_follows_the_materialised_trainer(tmp_path, ascent_loss, monkeypatch):
    """fused_head=True (the decoder's hidden states, the fused linear losses over the tied LM head) trains the
    causal LM as the materialised logits do, and does run the fused losses."""
    import bisam_kernels.training as training

    calls = []
    fused_ce = training.fused_linear_cross_entropy
    monkeypatch.setattr(training, "fused_linear_cross_entropy", lambda *a, **k: calls.append(1) or fused_ce(*a, **k))
    model, data = _tiny_gpt2(), _lm_data()
    fused = copy.deepcopy(model)
    options = dict(task="causal_lm", ascent_loss=ascent_loss, label_smoothing=0.1)
    _trainer(model, data, tmp_path / "materialised", options).train()
    assert not calls
    _trainer(fused, data, tmp_path / "fused", dict(options, fused_head=True)).train()
    assert len(calls) == 2 * STEPS_PER_EPOCH * (2 if ascent_loss == "cross_entropy" else 1)  # pass 2 (and SAM's pass 1)
    assert_models_close(fused, model, 1e-5)
    with pytest.raises(ValueError, match="fused_head=True needs task='causal_lm'"):
        _trainer(TinyClassifier(), _classification_data(), tmp_path, dict(fused_head=True))
    with pytest.raises(ValueError, match="accum_dtype .* needs fused_head=True"):
        _trainer(_tiny_gpt2(), data, tmp_path, dict(options, accum_dtype=torch.float32))


def test_fused_head_runs_the_decoder_in_bf16_with_the_trainer(tmp_path):
    """bf16=True: Accelerate's autocast wraps the model's own forward only; the fused head runs the model's base
    (and the fused losses) under the same autocast, so it follows the materialised bf16 Trainer, not fp32."""
    model, data = _tiny_gpt2(), _lm_data()
    fused, fused_fp32 = copy.deepcopy(model), copy.deepcopy(model)
    options = dict(task="causal_lm", label_smoothing=0.1)
    _trainer(model, data, tmp_path / "materialised", options, bf16=True, num_train_epochs=1).train()
    _trainer(fused, data, tmp_path / "fused", dict(options, fused_head=True), bf16=True, num_train_epochs=1).train()
    _trainer(fused_fp32, data, tmp_path / "fp32", dict(options, fused_head=True), num_train_epochs=1).train()

    # bf16 like the materialised run (0 here: the same bf16 matmuls), not fp32 (the two gaps were equal before)
    assert _largest_relative_gap(fused, model) <= 0.25 * _largest_relative_gap(fused_fp32, model)
    accumulated = copy.deepcopy(fused_fp32)  # (any weights: only that the option reaches the step is checked)
    _trainer(accumulated, data, tmp_path / "accum", dict(options, fused_head=True, accum_dtype=torch.float32),
             bf16=True, max_steps=1).train()
    assert all(torch.isfinite(p).all() for p in accumulated.parameters())


_DECODER = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=0, eos_token_id=0)


@pytest.mark.parametrize("family", ["cohere", "granite"])
def test_fused_head_applies_a_constant_logit_scale(tmp_path, family):
    """Cohere multiplies its logits by config.logit_scale, Granite divides them by config.logits_scaling: the fused
    head scales the hidden states by the same factor and follows the materialised trainer."""
    if family == "cohere":
        model = transformers.CohereForCausalLM(transformers.CohereConfig(logit_scale=0.0625, **_DECODER))
    else:
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(logits_scaling=8.0, **_DECODER))
    fused, data = copy.deepcopy(model), _lm_data()
    options = dict(task="causal_lm", label_smoothing=0.0)
    _trainer(model, data, tmp_path / "materialised", options).train()
    trainer = _trainer(fused, data, tmp_path / "fused", dict(options, fused_head=True))
    assert trainer.head_scale == (0.0625 if family == "cohere" else 1 / 8.0)
    trainer.train()
    assert_models_close(fused, model, 1e-5)


def test_fused_head_refuses_logits_it_cannot_reproduce(tmp_path):
    """A final soft-capping (Gemma 2) and any other post-processing of the logits (found by comparing them with
    the head's output on four tokens) are refused: the fused head would train on other logits."""
    gemma = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(final_logit_softcapping=30.0, head_dim=8, **_DECODER))
    with pytest.raises(ValueError, match="soft-caps its logits"):
        _trainer(gemma, _lm_data(), tmp_path, dict(task="causal_lm", fused_head=True))

    class ShiftedLogits(transformers.GPT2LMHeadModel):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits + 1.0
            return out

    model = ShiftedLogits(_tiny_gpt2().config)
    model.train()
    with pytest.raises(ValueError, match="not its LM head's output"):
        _trainer(model, _lm_data(), tmp_path, dict(task="causal_lm", fused_head=True))
    assert model.training  # the check's eval mode is undone
