"""examples/lightning_digits.py and examples/hf_trainer_digits.py: their --quick runs end to end (as CI runs
them) and print the test accuracy they return."""

from __future__ import annotations

import re

import pytest

@pytest.mark.parametrize("example, framework", [("lightning_digits", "lightning"),
                                                ("hf_trainer_digits", "transformers")])
def test_quick_run_prints_its_test_accuracy(example, framework, load_example, capsys, restore_threads):
    pytest.importorskip(framework)
    accuracy = load_example(example).main(["--quick"])
    printed = re.findall(r"test accuracy (\d\.\d{4})", capsys.readouterr().out)
    assert printed == [f"{accuracy:.4f}"]
    assert 0.15 < accuracy <= 1.0  # better than chance (0.1) after two short epochs


@pytest.mark.parametrize("example", ["lightning_digits", "hf_trainer_digits"])
def test_quick_keeps_an_explicit_epoch_count(example, load_example):
    pytest.importorskip("lightning" if example == "lightning_digits" else "transformers")
    module = load_example(example)
    assert module.parse_args(["--quick"]).epochs == 2
    assert module.parse_args(["--quick", "--epochs", "1"]).epochs == 1
    assert module.parse_args([]).epochs == 30
