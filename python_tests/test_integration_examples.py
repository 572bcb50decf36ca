"""The framework integrations as a user meets them: examples/lightning_digits.py and hf_trainer_digits.py run
end to end with --quick (as CI runs them) and print the test accuracy they return; the core package imports
neither framework."""

from __future__ import annotations

import re
import subprocess
import sys

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


def test_the_core_package_imports_no_framework():
    """The integrations are optional extras: `import bisam_kernels` loads neither Lightning nor transformers."""
    code = ("import sys, bisam_kernels, bisam_kernels.integrations; "
            "print(sorted(m for m in ('lightning', 'transformers', 'accelerate') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
