"""The fused linear + loss against the materialised path, each measurement in a fresh process.

Workloads ``linear_loss_<N>x<H>x<V>``: forward + backward of ``loss(hidden @ weight.T, targets)`` with
gradients for hidden and weight, for the BiSAM lower bound (pass 1; phi="log") and the cross-entropy
(pass 2). Implementations:

  fused              bk.fused_linear_bisam_loss / bk.fused_linear_cross_entropy (chunked, no logits)
  fused_accum32      the same with accum_dtype=torch.float32 (the weight's gradient summed in float32)
  materialised       F.linear, then bk.bisam_loss / F.cross_entropy (the logits and their gradient)
  compiled           torch.compile of the materialised path
  liger              Liger-Kernel's fused linear cross-entropy (cross-entropy only; where importable)

Peak memory is counted above the inputs and their gradients: on CUDA from the allocator's peak, on
the CPU from the process's peak resident set (VmHWM, reset through /proc/self/clear_refs before the
measured calls). At a shape whose rows fit one chunk the fused path saves no memory. Every
implementation runs in its own process, so that neither allocator caches nor
another implementation's high-water mark leak into a number. The inputs are the same in every process
(one seed), and each row records its loss and gradient norms: the table's "agree" column is their
largest relative difference from the materialised path's.

    python -m bench.bench_linear_loss                          # CPU: 8192x128x32000 float32, both losses
    python -m bench.bench_linear_loss --shape 256x64x4000 --reps 2 --impls fused materialised
    python -m bench.bench_linear_loss --device cuda --dtype bfloat16 --shape 16384x4096x128256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ("materialised", "fused", "fused_accum32", "compiled", "liger")  # the baseline first: ratios as rows come
LOSSES = ("bisam", "ce")
VALUES = ("loss_value", "grad_norm_hidden", "grad_norm_weight")  # what each row records of its results
CPU_SHAPE = "8192x128x32000"
GPU_SHAPES = ("8192x4096x32000", "16384x4096x128256")


def parse_shape(shape: str) -> tuple[int, int, int]:
    n, h, v = (int(x) for x in shape.lower().split("x"))
    return n, h, v


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak bytes above the moment of reset(): CUDA allocator statistics, or the CPU process's VmHWM."""

    def __init__(self, device: str):
        self.device = device

    def reset(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
            self.base = _rss_bytes("VmRSS")

    def peak(self) -> int:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _rss_bytes("VmHWM") - self.base


def _step_fn(impl: str, loss: str):
    import torch
    import torch.nn.functional as F

    import bisam_kernels as bk

    if impl in ("fused", "fused_accum32"):
        accum = torch.float32 if impl == "fused_accum32" else None
        if loss == "bisam":
            return lambda h, w, t: bk.fused_linear_bisam_loss(h, w, t, phi="log", accum_dtype=accum)
        return lambda h, w, t: bk.fused_linear_cross_entropy(h, w, t, accum_dtype=accum)
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        if loss != "ce":
            raise ValueError("Liger-Kernel has no BiSAM loss")
        return lambda h, w, t: liger_fused_linear_cross_entropy(h, w, t)

    def materialised(h, w, t):
        z = F.linear(h, w)
        return bk.bisam_loss(z, t, phi="log") if loss == "bisam" else F.cross_entropy(z, t)

    if impl == "materialised":
        return materialised
    if impl == "compiled":
        return torch.compile(materialised)
    raise ValueError(f"unknown implementation {impl!r}")


def measure(impl: str, loss: str, shape: str, device: str, dtype: str, reps: int) -> dict:
    """In this process: median time of forward + backward and the peak memory above inputs and gradients."""
    import torch

    N, H, V = parse_shape(shape)
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    hidden = torch.randn(N, H, device=device, dtype=dt).requires_grad_()
    weight = (torch.randn(V, H, device=device, dtype=dt) / H ** 0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), device=device)
    fn = _step_fn(impl, loss)
    grad_bytes = sum(x.numel() * x.element_size() for x in (hidden, weight))

    def call():
        hidden.grad = weight.grad = None
        value = fn(hidden, weight, targets)
        value.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return value

    value = call()  # warm-up: compilation, allocator, BLAS; its results are what the rows compare
    values = {"loss_value": value.item(), "grad_norm_hidden": hidden.grad.float().norm().item(),
              "grad_norm_weight": weight.grad.float().norm().item()}
    hidden.grad = weight.grad = None
    memory = PeakMemory(device)
    memory.reset()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    peak = memory.peak()
    return {"impl": impl, "loss": loss, "workload": f"linear_loss_{shape}", "device": device, "dtype": dtype,
            "reps": reps, "median_s": statistics.median(times), "times_s": times,
            "peak_above_inputs_and_grads_bytes": peak - grad_bytes, **values}


def _in_fresh_process(impl, loss, shape, device, dtype, reps) -> dict | None:
    cmd = [sys.executable, "-m", "bench.bench_linear_loss", "--one", impl, "--losses", loss, "--shape", shape,
           "--device", device, "--dtype", dtype, "--reps", str(reps)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  {impl}/{loss}: failed ({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode})")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _available(impl: str, loss: str, device: str) -> bool:
    if impl == "liger":
        if loss != "ce" or device != "cuda":
            return False
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return False
    return True


def _ratios(row: dict, base: dict) -> None:
    row["speedup_vs_materialised"] = base["median_s"] / row["median_s"]
    row["peak_vs_materialised"] = (row["peak_above_inputs_and_grads_bytes"]
                                   / max(base["peak_above_inputs_and_grads_bytes"], 1))
    row["max_rel_diff_vs_materialised"] = max(abs(row[k] - base[k]) / max(abs(base[k]), 1e-30) for k in VALUES)


def compare(shape: str, device: str, dtype: str, reps: int, impls, losses, rows: list, save=lambda: None) -> None:
    """Every implementation in a fresh process, appended to rows (save() after each): prints each row as it
    comes, with its ratios to the materialised path once that has been measured (run it first)."""
    print(f"linear_loss_{shape} {dtype} on {device}: forward + backward (hidden and weight), median of {reps}; "
          "peak memory above the inputs and their gradients; each in a fresh process")
    print("speed-up: the materialised path's time / this one's (above 1: faster); memory: this peak / the "
          "materialised path's (below 1: less); agree: largest relative difference from the materialised "
          "path's loss and gradient norms (a bfloat16 materialised loss is itself rounded to bfloat16: 4e-3)")
    print(f"{'loss':6} {'impl':14} {'time':>10} {'speed-up':>9} {'peak MiB':>10} {'memory':>8} {'agree':>8}")
    for loss in losses:
        results = {}
        for impl in impls:
            if not _available(impl, loss, device):
                continue
            row = _in_fresh_process(impl, loss, shape, device, dtype, reps)
            if row is None:
                continue
            results[impl] = row
            rows.append(row)
            base = results.get("materialised")
            for other in results.values() if impl == "materialised" else [row]:
                if base:
                    _ratios(other, base)
            save()
            rt = f"{row['speedup_vs_materialised']:.2f}x" if base else "-"
            rm = f"{row['peak_vs_materialised']:.3f}x" if base else "-"
            ra = f"{row['max_rel_diff_vs_materialised']:.1e}" if base else "-"
            print(f"{loss:6} {impl:14} {row['median_s'] * 1e3:8.1f}ms {rt:>9} "
                  f"{row['peak_above_inputs_and_grads_bytes'] / 2**20:10.1f} {rm:>8} {ra:>8}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default=None, help=f"NxHxV (default: {CPU_SHAPE} on the CPU, "
                        f"{' and '.join(GPU_SHAPES)} on CUDA)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--dtype", default=None, help="float32 on the CPU, bfloat16 on CUDA by default")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per implementation, after one warm-up "
                        "(default: 3; the median is reported)")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS,
                        help="implementations (default: all; liger only on CUDA where importable)")
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES,
                        help="bisam: the BiSAM lower bound (phi=log); ce: cross-entropy (default: both)")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    parser.add_argument("--one", choices=IMPLS, help=argparse.SUPPRESS)  # the fresh process's job
    args = parser.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.one:
        print(json.dumps(measure(args.one, args.losses[0], args.shape, args.device, dtype, args.reps)))
        return 0
    shapes = [args.shape] if args.shape else (list(GPU_SHAPES) if args.device == "cuda" else [CPU_SHAPE])
    rows: list[dict] = []
    meta = _environment(args.device)

    def save():  # after every row: a time limit's interrupt keeps what was measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)

    for shape in shapes:
        compare(shape, args.device, dtype, args.reps, args.impls, args.losses, rows, save)
    return 0


def _environment(device: str) -> dict:
    """Where and when the rows were measured: versions, device, date, git revision."""
    import datetime
    import platform

    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:  # no git on the machine
        revision = ""
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    if device == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                name = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return {"device": name, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton_version, "date": datetime.date.today().isoformat(), "git_revision": revision or None}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
