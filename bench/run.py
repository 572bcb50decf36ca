"""Runs every microbenchmark on the available device, side by side, and records the results.

    python -m bench.run                 # full run: table, bench/results/<device>-<date>.json and .png
    python -m bench.run --quick         # a fast subset (CI): results under build/bench-quick/

Every row: median time, speedup of the fused implementation over each baseline, bytes moved
(the DESIGN.md section 4 floor), achieved GB/s and its fraction of the copy bandwidth measured
in the same run, launches per call (CUDA kernels; on the CPU, operators dispatched), peak extra
memory. The JSON format is described in bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

PROCESS_START = time.monotonic()  # --time-budget counts from here: imports and set-up included

# The profiler behind the launches and memory columns writes to stderr, through the progress bar:
# kineto logs "USDT: ... profiler_start/stop" at its top level, above ERROR (where it also reports
# the missing GPU on every CPU-only run), so only level 6 hides it; and c10 logs one WARNING when
# a block allocated before a memory profile is freed inside it (expected: the CPU column counts
# allocations only). ERROR keeps C++ errors; warnings raised through Python calls still show.
# Set before torch is imported (c10 reads its level then); a value set by the caller wins.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import harness  # noqa: E402
from bench.bench_bisam_loss import loss_cases  # noqa: E402
from bench.bench_sam_perturb import PEERS, sam_cases  # noqa: E402
from bench.bench_train_step import train_step_cases  # noqa: E402

FUSED = "fused"
# Workloads that the issues' targets are read from (ResNet-56 and ViT-B perturb + restore, the loss
# at (128, 10) and the two LM shapes, the training step): measured first, so a run with a time
# budget (bench/device_check.sh) spends it on them before the other workloads.
TARGET_WORKLOADS = {"sam_resnet56", "sam_vit_b16", "loss_128x10", "loss_8192x32000", "loss_4096x128256",
                    "train_step_resnet56"}


def build_cases(device: str, quick: bool, compiled: bool) -> list[harness.Case]:
    """Every case in the order the table lists them: the SAM workloads, the loss workloads, the
    training step; within a workload the fused implementation first, then the baselines."""
    impls = ("fused", "released", "eager") + (("compiled",) if compiled else ())
    cases = []
    dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" and not quick else [])
    for dtype in dtypes:
        cases += sam_cases(device, dtype=dtype, workloads=["resnet56"] if quick else None, impls=impls + PEERS)
        cases += loss_cases(device, dtype=dtype, shapes=[(128, 10), (128, 100)] if quick else None, impls=impls)
    batch = 8 if quick else (128 if device == "cuda" else 32)
    return cases + train_step_cases(device, batch=batch)


def collect_cases(device: str, quick: bool, compiled: bool) -> list[harness.Case]:
    """The cases in measurement order: the target workloads, their torch.compile baselines (which
    compile for a minute each), then the same for every other workload. Stable: otherwise in the
    order of build_cases."""
    cases = build_cases(device, quick, compiled)
    return sorted(cases, key=lambda c: (c.workload not in TARGET_WORKLOADS, c.impl == "compiled"))


def in_built_order(rows: list[dict], built: list[harness.Case]) -> list[dict]:
    """The rows in the order of their cases in `built` (build_cases), whatever order they were
    measured in."""
    position = {(c.workload, c.params.get("dtype"), c.impl): i for i, c in enumerate(built)}
    return sorted(rows, key=lambda r: position[(r["workload"], r.get("dtype"), r["impl"])])


def add_step_overhead(rows: list[dict]) -> None:
    """Share of the fused BiSAM step spent outside its two forward/backward passes."""
    steps = {r["impl"]: r for r in rows if r["workload"].startswith("train_step")}
    if "fused" in steps and "passes" in steps:
        fused = steps["fused"]
        fused["overhead_outside_passes"] = 1.0 - steps["passes"]["median_s"] / fused["median_s"]


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def format_table(rows: list[dict], copy_gbps: float) -> str:
    """One line per row, in the order given."""
    impl_width = max([10] + [len(r["impl"]) + 2 for r in rows])  # peer_pytorch_optimizer is 22 characters
    header = (f"{'workload':<24}{'dtype':<10}{'impl':<{impl_width}}{'median':>12}{'fused x':>9}{'GB/s':>9}"
              f"{'of copy':>9}{'launches':>10}{'mem MiB':>10}")
    lines = [f"copy bandwidth measured in this run: {copy_gbps:.1f} GB/s", header, "-" * len(header)]
    for r in rows:
        t = r["median_s"]
        bandwidth = (f"{r['achieved_gbps']:9.1f}{100 * r['fraction_of_copy_bw']:8.1f}%"
                     if r["floor_bytes"] else f"{'-':>9}{'-':>9}")
        time_text = f"{t * 1e3:9.3f} ms" if t >= 1e-3 else f"{t * 1e6:9.1f} us"
        speedup = f"{r['fused_speedup']:8.2f}x" if "fused_speedup" in r else f"{'':9}"
        peak = r.get("extra_memory_bytes")
        lines.append(
            f"{r['workload']:<24}{r.get('dtype', ''):<10}{r['impl']:<{impl_width}}{time_text:>12}{speedup}"
            f"{bandwidth}{r.get('launches', ''):>10}{'' if peak is None else f'{peak / 2**20:10.1f}'}"
        )
    for r in rows:
        share = r.get("overhead_outside_passes")
        if share is not None and share >= 0:
            lines.append(f"{r['workload']}: {100 * share:.1f}% of the fused BiSAM step is spent outside its two "
                         "forward/backward passes")
        elif share is not None:  # the passes alone timed slower than the whole step: below the timing noise
            lines.append(f"{r['workload']}: the time outside the two forward/backward passes is below this run's "
                         f"timing noise (the passes alone measured {-100 * share:.1f}% slower than the whole step)")
    return "\n".join(lines)


_COLORS = {"fused": "tab:blue", "released": "tab:red", "eager": "tab:orange", "compiled": "tab:green",
           "peer_pytorch_optimizer": "tab:brown", "passes": "tab:purple", "sgd": "tab:gray"}


def _grouped_bars(ax, rows, keys, impls, value, label) -> None:
    """One group of horizontal bars per (workload, dtype) key, centred on its row index; value(row)
    gives a bar's length or None for no bar."""
    height = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        ys, xs = [], []
        for j, key in enumerate(keys):
            r = next((r for r in rows if (r["workload"], r.get("dtype", "")) == key and r["impl"] == impl), None)
            x = value(r) if r is not None else None
            if x is not None:
                ys.append(j - 0.4 + (k + 0.5) * height)
                xs.append(x)
        if xs:
            ax.barh(ys, xs, height=height, label=label(impl), color=_COLORS.get(impl))


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r["workload"], r.get("dtype", "")) for r in rows))  # in the order of the rows
    impls = [i for i in _COLORS if i != FUSED and any(r["impl"] == i for r in rows)]
    fig, (ax_speed, ax_bw) = plt.subplots(1, 2, figsize=(14, 0.6 * len(keys) + 3), sharey=True)
    _grouped_bars(ax_speed, rows, keys, impls, lambda r: r.get("fused_speedup"), lambda impl: f"vs {impl}")
    ax_speed.axvline(1.0, color="black", linewidth=0.8)
    ax_speed.set_xscale("log")
    ax_speed.set_yticks(range(len(keys)), [f"{w} ({d})" if d else w for w, d in keys])
    ax_speed.invert_yaxis()
    ax_speed.set_xlabel("speedup of the fused implementation (x, log scale)")
    # Implementations without a byte floor (the training step) have no bandwidth bar.
    _grouped_bars(ax_bw, rows, keys, [FUSED] + impls,
                  lambda r: 100 * r["fraction_of_copy_bw"] if r["floor_bytes"] else None, lambda impl: impl)
    ax_bw.axvline(100.0, color="black", linewidth=0.8)
    ax_bw.set_xlabel("achieved bandwidth on the floor bytes, % of measured copy bandwidth")
    for ax in (ax_speed, ax_bw):
        if ax.get_legend_handles_labels()[0]:  # a run cut short may have no baseline row yet
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small, fast subset (what CI runs)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="results folder (default bench/results, or build/bench-quick)")
    parser.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=None,
                        help="include torch.compile baselines (default: on the GPU, and on the CPU unless --quick)")
    parser.add_argument("--min-time", type=float, default=None, help="seconds of timing per case")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds since the process started: start no case after this (the rest are listed "
                             "as skipped_for_time, as they are after an interrupt)")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    device = args.device
    compiled = args.compiled if args.compiled is not None else not args.quick
    min_time = args.min_time if args.min_time is not None else (0.1 if args.quick else 0.5)
    out_dir = args.out or os.path.join(ROOT, "build/bench-quick" if args.quick else "bench/results")
    os.makedirs(out_dir, exist_ok=True)

    env = harness.environment(device)
    now = datetime.datetime.now(datetime.timezone.utc)
    device_tag = "-".join(filter(None, [device, "".join(c if c.isalnum() else "-" for c in env["device"]).strip("-").lower()]))
    stem = os.path.join(out_dir, f"{device_tag}-{now.strftime('%Y-%m-%d')}")
    copy_bps = harness.copy_bandwidth(device, nbytes=(256 << 20) if args.quick else (1 << 30))
    result = {
        "format": "bisam_kernels-bench/1",
        "date": now.isoformat(timespec="seconds"),
        "git_revision": git_revision(),
        "quick": args.quick,
        "environment": env,
        "copy_bandwidth_gbps": copy_bps / 1e9,
        "rows": [],
        "skipped_for_time": [],
    }
    rows = result["rows"]
    cases = collect_cases(device, args.quick, compiled)

    def save() -> None:
        # One row per measured case, in order: the rest were not measured.
        result["skipped_for_time"] = [f"{c.workload} {c.params.get('dtype', '')} {c.impl}".strip()
                                      for c in cases[len(rows):]]
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=2)

    interrupted = False
    try:
        for case in tqdm(cases, desc=f"benchmarks on {device}", unit="case"):
            if args.time_budget is not None and time.monotonic() - PROCESS_START > args.time_budget:
                break
            rows.append(harness.measure(case, device, min_time_s=min_time))
            harness.add_ratios(rows, FUSED, copy_bps)
            add_step_overhead(rows)
            save()  # after every case: a run killed outright keeps what it measured
    except KeyboardInterrupt:  # SIGINT, e.g. bench/device_check.sh's time limit: report what was measured
        interrupted = True
    save()
    title = f"bisam_kernels on {env['device']} (torch {env['torch']}, triton {env['triton']}), {now.date()}"
    # The JSON keeps the measurement order (skipped_for_time follows from it); the table and plot
    # list the workloads in their natural order.
    table_rows = in_built_order(rows, build_cases(device, args.quick, compiled))
    if rows:
        plot(table_rows, stem + ".png", title)
    print(format_table(table_rows, copy_bps / 1e9))
    if result["skipped_for_time"]:
        reason = "interrupted" if interrupted else f"time budget of {args.time_budget:g} s spent"
        print(f"not measured ({reason}): " + ", ".join(result["skipped_for_time"]))
    print(f"results: {os.path.relpath(stem, ROOT)}.json" + (" and .png" if rows else ""))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
