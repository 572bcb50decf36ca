"""pytest-benchmark set-up: benchmarks run with --benchmark-enable; ratios are printed at the end."""

import os
import sys

# `bench` is imported as a package (bench.models, bench.harness) from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = {}
    for bench in session.benchmarks:
        if bench.stats is None or not bench.stats.rounds:
            continue
        impl = bench.extra_info.get("impl")
        if impl is None:
            continue
        groups.setdefault(bench.group, {})[impl] = bench
    write = terminalreporter.write_line
    write("")
    write("speedup of the fused implementation (median time of each baseline / median time of fused):")
    for group, impls in sorted(groups.items()):
        fused = impls.get("fused")
        if fused is None:
            continue
        parts = []
        for impl, bench in sorted(impls.items()):
            if impl == "fused":
                continue
            parts.append(f"{bench.stats.median / fused.stats.median:6.2f}x vs {impl}")
        gbps = fused.extra_info.get("floor_bytes", 0) / fused.stats.median / 1e9
        write(f"  {group:<28} fused {fused.stats.median * 1e3:9.3f} ms  {gbps:7.1f} GB/s   " + "   ".join(parts))
