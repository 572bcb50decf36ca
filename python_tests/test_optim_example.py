"""examples/train_digits.py: the command line, the progress bar, and an end-to-end --quick run."""

from __future__ import annotations

import math
import re

import pytest


@pytest.fixture(scope="module")
def train_digits(load_example):
    return load_example("train_digits")


def help_by_option(train_digits, capsys) -> dict[str, str]:
    """{'--epochs': 'training epochs per method and seed (default: 30)', ...} from the --help output."""
    with pytest.raises(SystemExit):
        train_digits.parse_args(["--help"])
    out = capsys.readouterr().out
    options = out[out.index("\n  -") + 1 :]  # each option's entry starts with an indented dash
    entries = {}
    for entry in re.split(r"\n(?=  -)", options):
        # "--name ARG   help", the help after two or more spaces or on the next lines
        signature, _, help_text = entry.strip().partition("  ")
        long_option = re.search(r"--[\w-]+", signature).group()
        entries[long_option] = " ".join(help_text.split())
    return entries


def test_help_describes_every_option_with_its_default(train_digits, capsys):
    entries = help_by_option(train_digits, capsys)
    assert {"--epochs", "--methods", "--quick", "--no-progress"} <= entries.keys()
    for option, help_text in entries.items():
        assert help_text, f"{option} has no help text"
        if option != "--help":
            assert "(default: " in help_text, f"{option} does not show its default: {help_text!r}"
    assert "(default: 30)" in entries["--epochs"]


def test_methods_have_command_line_names(train_digits, capsys):
    assert train_digits.parse_args(["--methods", "bisam_log", "sgd"]).methods == ["bisam_log", "sgd"]
    assert train_digits.parse_args(["--methods", "BiSAM_Tanh", "SAM"]).methods == ["bisam_tanh", "sam"]
    assert train_digits.parse_args(["--methods", "sgd", "SGD"]).methods == ["sgd"]  # one method, trained once
    help_text = help_by_option(train_digits, capsys)["--methods"]
    for name in ("sgd", "sam", "bisam_tanh", "bisam_log"):
        assert name in help_text
    with pytest.raises(SystemExit):
        train_digits.parse_args(["--methods", "adam"])
    assert "invalid choice: 'adam'" in capsys.readouterr().err


def test_quick_keeps_explicit_epochs_and_seeds(train_digits):
    quick = train_digits.parse_args(["--quick"])
    assert (quick.epochs, quick.seeds) == (2, [0])
    explicit = train_digits.parse_args(["--quick", "--epochs", "1", "--seeds", "3", "4"])
    assert (explicit.epochs, explicit.seeds) == (1, [3, 4])
    full = train_digits.parse_args([])
    assert (full.epochs, full.seeds) == (30, [0, 1, 2])


def test_progress_bar_shows_metrics_with_their_epoch_count(train_digits, monkeypatch, restore_threads):
    draws = []  # (count, postfix) at every redraw of the bar

    class RecordingTqdm(train_digits.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "mininterval": 0})  # redraw on every update, for a fixed record

        def display(self, msg=None, pos=None):
            if msg is None:  # not the clearing of the bar on close
                draws.append((self.n, self.postfix))
            return super().display(msg, pos)

    monkeypatch.setattr(train_digits, "tqdm", RecordingTqdm)
    train_digits.main(["--quick", "--methods", "SGD"])
    with_metrics = [count for count, postfix in draws if postfix and "test_acc=" in postfix]
    assert with_metrics == [1, 2], draws  # epoch k's metrics next to k/2, never next to 0/2


def test_train_digits_quick(train_digits, capsys, restore_threads):
    rows = train_digits.main(["--quick", "--no-progress"])
    out = capsys.readouterr()
    assert out.err == ""  # --no-progress: no bar
    table = [line for line in out.out.splitlines() if re.match(r"\| (SGD|SAM|BiSAM)", line)]
    assert [r["method"] for r in rows] == ["SGD", "SAM", "BiSAM (tanh)", "BiSAM (log)"]
    assert len(table) == 4
    for r, line in zip(rows, table):
        assert line.startswith(f"| {r['method']} | {r['acc']:.4f} | {r['loss']:.4f} |")
        assert 0.15 < r["acc"] <= 1.0, r  # better than chance (0.1) after two short epochs
        assert math.isfinite(r["loss"]) and r["sec_per_epoch"] > 0
