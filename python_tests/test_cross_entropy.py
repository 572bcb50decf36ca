"""The pass-2 cross-entropy: classes last, both label-smoothing conventions, against float64 models."""

import pytest
import torch
import torch.nn.functional as F

import bisam_kernels as bk
from bisam_kernels import references as R
from bisam_kernels.ops.cross_entropy import cross_entropy


@pytest.mark.parametrize("K", [2, 3, 10, 1000])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_released_smoothing_matches_the_released_formula(K, smoothing):
    logits = torch.randn(13, K, dtype=torch.float64, requires_grad=True) * 3
    targets = torch.randint(0, K, (13,))
    ref = R.smooth_crossentropy_released(logits, targets, smoothing)
    got = bk.smooth_cross_entropy(logits, targets, smoothing, reduction="none")
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bk.smooth_cross_entropy(logits, targets, smoothing), ref.mean())
    g_ref, = torch.autograd.grad(ref.sum(), logits)
    g, = torch.autograd.grad(got.sum(), logits)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_released_smoothing_differs_from_pytorchs():
    """The two conventions put different mass off the target: not the same loss or gradient."""
    logits = torch.randn(8, 10, requires_grad=True)
    targets = torch.randint(0, 10, (8,))
    released = bk.smooth_cross_entropy(logits, targets, 0.1)
    ours = cross_entropy(logits, targets, 0.1, "pytorch")
    torch.testing.assert_close(ours, F.cross_entropy(logits, targets, label_smoothing=0.1))
    g1, = torch.autograd.grad(released, logits)
    g2, = torch.autograd.grad(ours, logits)
    assert (g1 - g2).abs().max() > 1e-4


@pytest.mark.parametrize("style", ["pytorch", "released"])
def test_classes_last_and_ignored_rows(style):
    logits = torch.randn(2, 7, 5, dtype=torch.float64)
    targets = torch.randint(0, 5, (2, 7))
    targets[0, :3] = -100
    got = cross_entropy(logits, targets, 0.1, style, reduction="none")
    assert got.shape == (2, 7) and torch.all(got[0, :3] == 0)
    flat = cross_entropy(logits.reshape(14, 5), targets.reshape(14), 0.1, style, reduction="none")
    torch.testing.assert_close(got.reshape(14), flat)
    mean = cross_entropy(logits, targets, 0.1, style)
    torch.testing.assert_close(mean, flat.sum() / (targets != -100).sum())


@pytest.mark.parametrize("style", ["pytorch", "released"])
def test_int32_targets_as_bisam_loss_takes_them(style):
    """bisam_step's two passes share the targets: pass 2 takes the int32 class indices pass 1 takes."""
    logits = torch.randn(6, 9, dtype=torch.float64)
    targets = torch.randint(0, 9, (6,))
    targets[1] = -100
    torch.testing.assert_close(cross_entropy(logits, targets.int(), 0.1, style), cross_entropy(logits, targets, 0.1, style))


def test_low_precision_logits_give_a_float32_released_loss():
    logits = torch.randn(6, 9, dtype=torch.float16)
    targets = torch.randint(0, 9, (6,))
    loss = bk.smooth_cross_entropy(logits, targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, R.smooth_crossentropy_released(logits, targets).mean().float())


def test_bad_input():
    z, y = torch.randn(4, 5), torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match="style"):
        cross_entropy(z, y, 0.1, "uniform")
    with pytest.raises(ValueError, match="smoothing"):
        bk.smooth_cross_entropy(z, y, 1.5)
    with pytest.raises(ValueError, match="movedim"):  # (B, C, T) logits get a hint
        bk.smooth_cross_entropy(torch.randn(2, 5, 7), torch.randint(0, 5, (2, 7)))
    with pytest.raises(TypeError, match="class indices"):
        bk.smooth_cross_entropy(z, torch.softmax(z, 1))
    with pytest.raises(TypeError, match="class indices"):  # (a bool target would read as classes 0/1)
        bk.smooth_cross_entropy(z, y > 2)
    with pytest.raises(TypeError, match="floating"):
        bk.smooth_cross_entropy(z.long(), y)
    with pytest.raises(ValueError, match="at least 2 classes"):  # the target distribution would sum to 0.9
        bk.smooth_cross_entropy(torch.randn(4, 1), torch.zeros(4, dtype=torch.long), 0.1)
    assert torch.equal(bk.smooth_cross_entropy(torch.randn(4, 1), torch.zeros(4, dtype=torch.long), 0.0),
                       torch.tensor(0.0))
