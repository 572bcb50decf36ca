"""examples/train_digits.py --quick: the example runs end to end and prints its table."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import re

import torch

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"


def test_train_digits_quick(capsys):
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        rows = module.main(["--quick", "--no-progress"])
    finally:
        torch.set_num_threads(threads)  # the example sets 1 thread
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if re.match(r"\| (SGD|SAM|BiSAM)", line)]
    assert [r["method"] for r in rows] == ["SGD", "SAM", "BiSAM (tanh)", "BiSAM (log)"]
    assert len(table) == 4
    for r, line in zip(rows, table):
        assert line.startswith(f"| {r['method']} | {r['acc']:.4f} | {r['loss']:.4f} |")
        assert 0.15 < r["acc"] <= 1.0, r  # better than chance (0.1) after two short epochs
        assert math.isfinite(r["loss"]) and r["sec_per_epoch"] > 0
