"""The benchmark workloads are the architectures they claim to be (tensor and parameter counts)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import models  # noqa: E402


@pytest.mark.parametrize(
    "shapes,tensors,params",
    [
        (models.resnet56_param_shapes, 167, 853_018),
        (models.wrn28_10_param_shapes, 80, 36_479_194),
        (models.vit_b16_param_shapes, 152, 86_567_656),
        (models.gpt2_small_param_shapes, 148, 124_439_808),
        (models.decoder_1b_param_shapes, 201, 1_100_048_384),
    ],
)
def test_parameter_sets(shapes, tensors, params):
    s = shapes()
    assert len(s) == tensors and models.count_params(s) == params


def test_resnet56_model_matches_its_shapes():
    model = models.resnet56_cifar()
    assert [tuple(p.shape) for p in model.parameters()] == models.resnet56_param_shapes()
