"""Measurement tools shared by the benchmark suites and the runner.

Timing: the median over batches of back-to-back calls (about 10 ms each) of the wall-clock time between
synchronisations, on the GPU as on the CPU: the host's launch work counts, as in a training loop. (CUDA
events after an L2 flush, as triton.testing.do_bench times, leave out the launch work the host does
during the flush, up to ~0.1 ms per call: for launch-bound calls, most of a many-kernel baseline's
overhead.) Inputs rotate across copies larger than the last-level cache so repeated calls do not
measure the cache. Bandwidth is compared with a device-to-device copy
measured in the same process (bytes read + bytes written).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

CACHE_BYTES = {"cuda": 60 << 20, "cpu": 64 << 20}  # H200 L2 is 50 MB; CPU L3 sizes vary: err large


@dataclass
class Case:
    """One implementation of one workload. `make` builds fresh state and returns the callable to time
    (called with no arguments); `floor_bytes` is the DESIGN.md section 4 traffic of one call."""

    workload: str
    impl: str
    make: Callable[[], Callable[[], object]]
    floor_bytes: int
    params: dict = field(default_factory=dict)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rotation_count(bytes_per_set: int, device: str, cap: int = 32) -> int:
    """How many copies of the inputs make one pass larger than twice the cache."""
    return max(1, min(cap, math.ceil(2 * CACHE_BYTES[device] / max(1, bytes_per_set))))


def median_time(fn: Callable[[], object], device: str, min_time_s: float = 0.5, max_reps: int = 200) -> float:
    """Median seconds per call of fn, after warm-up: batches of back-to-back calls of about 10 ms, each timed
    from one synchronisation to the next (see the module docstring)."""
    fn()  # warm-up (compilation, first-touch page faults, lazy initialisation)
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    per_batch = max(1, min(1000, int(0.01 / max(time.perf_counter() - start, 1e-7))))
    times = []
    deadline = time.perf_counter() + min_time_s
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < max_reps):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(per_batch):
            fn()
        synchronize(device)
        times.append((time.perf_counter() - start) / per_batch)
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Bytes per second of a large copy (read + write), on random data."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    seconds = median_time(lambda: dst.copy_(src), device, min_time_s=1.0, max_reps=20)
    return 2 * n * 4 / seconds


def count_launches(fn: Callable[[], object], device: str) -> int:
    """CUDA kernels launched by one call; on the CPU, top-level operators dispatched."""
    fn()
    synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        synchronize(device)
    events = prof.events()
    if device == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in events if e.cpu_parent is None and e.name.startswith(("aten::", "bisam::")))


def extra_memory(fn: Callable[[], object], device: str) -> int:
    """Memory one call needs beyond what was allocated before it. CUDA: the peak allocated above the
    pre-call level. CPU: the bytes its operators allocate (frees outside operators are not seen, so
    this bounds the peak from above)."""
    fn()
    synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated() - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(0, e.self_cpu_memory_usage) for e in prof.events())


def environment(device: str) -> dict:
    """Device, versions and driver, for the results file."""
    import platform

    info = {
        "device": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()),
        "device_kind": device,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "python": platform.python_version(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["driver"] = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
        props = torch.cuda.get_device_properties(0)
        info["sm_count"] = props.multi_processor_count
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def measure(case: Case, device: str, min_time_s: float = 0.5, details: bool = True) -> dict:
    """Time one case; with `details`, also its launches and extra memory."""
    fn = case.make()
    row = {"workload": case.workload, "impl": case.impl, **case.params, "floor_bytes": case.floor_bytes}
    row["median_s"] = median_time(fn, device, min_time_s=min_time_s)
    row["achieved_gbps"] = case.floor_bytes / row["median_s"] / 1e9
    if details:
        row["launches"] = count_launches(fn, device)
        row["extra_memory_bytes"] = extra_memory(fn, device)
    del fn
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def add_ratios(rows: list[dict], fused: str, copy_bytes_per_s: float) -> list[dict]:
    """Per workload and dtype: speedup of the fused impl over each other impl, fraction of copy bandwidth."""
    by_workload: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_workload.setdefault((r["workload"], r.get("dtype")), {})[r["impl"]] = r
    for impls in by_workload.values():
        base = impls.get(fused)
        for r in impls.values():
            if r["floor_bytes"]:
                r["fraction_of_copy_bw"] = r["achieved_gbps"] * 1e9 / copy_bytes_per_s
            if base is not None:
                r["fused_speedup"] = r["median_s"] / base["median_s"]  # >1: the fused op is faster
    return rows
