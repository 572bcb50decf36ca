"""bisam_step's language-model form (head=): the model returns hidden states, both passes run through the
fused linear losses, and the trajectory is that of the materialised form (the model returns logits)."""

import copy

import pytest
import torch
from torch import nn

import bisam_kernels as bk

V, H, T = 23, 16, 7


class TinyLM(nn.Module):
    """Embedding, one mixing layer, an LM head (optionally tied to the embedding)."""

    def __init__(self, tied: bool, bias: bool):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.mix = nn.Linear(H, H)
        self.head = self.embed if tied else nn.Linear(H, V, bias=bias)
        self.return_hidden = False

    def hidden(self, x):
        return torch.tanh(self.mix(self.embed(x)))

    def forward(self, x):
        h = self.hidden(x)
        if self.return_hidden:
            return h
        if isinstance(self.head, nn.Embedding):
            return h @ self.head.weight.t()
        return self.head(h)


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (4, T), generator=g)
    y = torch.randint(0, V, (4, T), generator=g)
    y[0, :2] = -100  # ignored tokens
    return x, y


@pytest.mark.parametrize("tied,bias", [(False, True), (False, False), (True, False)])
@pytest.mark.parametrize("ascent_loss", ["log", "tanh", "cross_entropy"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_head_form_follows_the_materialised_trajectory(device, tied, bias, ascent_loss, micro_batches):
    torch.manual_seed(0)
    materialised = TinyLM(tied, bias).to(device)
    fused = copy.deepcopy(materialised)
    fused.return_hidden = True
    opts = [bk.BiSAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9) for m in (materialised, fused)]
    kw = dict(ascent_loss=ascent_loss, mu=2.0, alpha=0.3, label_smoothing=0.1, micro_batches=micro_batches)
    for step in range(3):
        x, y = (t.to(device) for t in batch(step))
        a = bk.bisam_step(materialised, opts[0], x, y, **kw)
        b = bk.bisam_step(fused, opts[1], x, y, head=fused.head, **kw)
        assert b.logits is None
        torch.testing.assert_close(b.ascent_loss, a.ascent_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.ascent_norm, a.ascent_norm, rtol=1e-5, atol=1e-6)
    for p, q in zip(materialised.parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_head_form_errors():
    model = TinyLM(False, True)
    opt = bk.BiSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    x, y = batch(0)
    with pytest.raises(TypeError, match="head must be a module with a weight"):
        bk.bisam_step(model, opt, x, y, head=object())
    with pytest.raises(ValueError, match="label_smoothing_style='pytorch' only"):
        bk.bisam_step(model, opt, x, y, head=model.head, label_smoothing_style="released")
    with pytest.raises(ValueError, match="not among the optimizer's parameters"):
        bk.bisam_step(model, opt, x, y, head=nn.Linear(H, V))
    with pytest.raises(ValueError, match="must return hidden states .*still apply the head"):
        bk.bisam_step(model, opt, x, y, head=model.head)  # the model returns logits (return_hidden is False)
    with pytest.raises(ValueError, match=r"language-model form \(head=\) only"):
        bk.bisam_step(model, opt, x, y, accum_dtype=torch.float32)
    with pytest.raises(ValueError, match="accum_dtype must be None .* or torch.float32"):
        bk.bisam_step(model, opt, x, y, head=model.head, accum_dtype=torch.float64)


def test_head_form_passes_accum_dtype_to_both_fused_losses(monkeypatch):
    """accum_dtype=torch.float32 reaches both passes' fused losses (a bfloat16 head's weight gradient is then
    summed in float32 over the chunks); the step is otherwise the default one."""
    import bisam_kernels.training as training

    seen = []
    for name in ("fused_linear_bisam_loss", "fused_linear_cross_entropy"):
        original = getattr(training, name)
        monkeypatch.setattr(training, name, lambda *a, _f=original, _n=name, **k: seen.append((_n, k.get("accum_dtype")))
                            or _f(*a, **k))
    torch.manual_seed(0)
    default = TinyLM(False, True)
    default.return_hidden = True
    accumulated = copy.deepcopy(default)
    opts = [bk.BiSAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1) for m in (default, accumulated)]
    x, y = batch(0)
    bk.bisam_step(default, opts[0], x, y, head=default.head)
    bk.bisam_step(accumulated, opts[1], x, y, head=accumulated.head, accum_dtype=torch.float32)
    assert seen == [("fused_linear_bisam_loss", None), ("fused_linear_cross_entropy", None),
                    ("fused_linear_bisam_loss", torch.float32), ("fused_linear_cross_entropy", torch.float32)]
    for p, q in zip(default.parameters(), accumulated.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)  # float32 weights: the same sums
