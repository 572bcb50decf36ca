"""The runner's bookkeeping: ratios compare implementations of the same workload and dtype."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import harness  # noqa: E402


def row(impl, dtype, seconds):
    return {"workload": "sam_x", "impl": impl, "dtype": dtype, "median_s": seconds, "floor_bytes": 100,
            "achieved_gbps": 100 / seconds / 1e9}


def test_ratios_pair_rows_of_the_same_dtype():
    rows = [row("fused", "float32", 1.0), row("eager", "float32", 3.0),
            row("fused", "bfloat16", 0.5), row("eager", "bfloat16", 2.0)]
    harness.add_ratios(rows, "fused", copy_bytes_per_s=1e9)
    assert [r["fused_speedup"] for r in rows] == [1.0, 3.0, 1.0, 4.0]
    assert rows[1]["fraction_of_copy_bw"] == rows[1]["achieved_gbps"]
