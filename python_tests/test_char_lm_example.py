"""examples/train_char_lm.py (--quick, end to end) and bench/bench_linear_loss.py (a small shape, each
implementation in a fresh process): they run, and print what they claim."""

from __future__ import annotations

import json
import math
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_char_lm_quick_prints_every_method(load_example, capsys):
    assert load_example("train_char_lm").main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "standard library's source" in out
    for name in ("AdamW", "SAM", "BiSAM (log)"):
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        bits, loss, per_step = (float(x) for x in re.findall(r"[-\d.]+", line[len(name):]))
        assert math.isfinite(bits) and 0 < bits < 8 and math.isfinite(loss) and per_step > 0
    assert " 5 steps" in out


def test_char_lm_explicit_options_win_over_quick(load_example, capsys):
    assert load_example("train_char_lm").main(["--quick", "--steps", "3", "--methods", "adamw"]) == 0
    assert " 3 steps" in capsys.readouterr().out


def test_corpus_is_the_standard_library_source(load_example):
    text = load_example("train_char_lm").load_corpus(10_000)
    assert len(text) == 10_000 and "def " in text


def test_linear_loss_benchmark_small_shape(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "bench.bench_linear_loss", "--shape", "512x16x3000", "--reps", "1",
                           "--impls", "fused", "materialised", "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert {"device", "torch", "date", "git_revision"} <= set(result["meta"])
    rows = result["rows"]
    assert {(r["loss"], r["impl"]) for r in rows} == {(lo, im) for lo in ("bisam", "ce") for im in ("fused", "materialised")}
    for r in rows:  # (the peak memory of so small a shape is within the allocator's noise: not judged here)
        assert r["median_s"] > 0 and "speedup_vs_materialised" in r and "peak_vs_materialised" in r
        assert r["max_rel_diff_vs_materialised"] < 1e-4  # float32: the same loss and gradients
    assert "linear_loss_512x16x3000" in proc.stdout
