#!/usr/bin/env bash
# One call on a GPU machine with no network (its own python3 with torch and triton):
#   bash bench/device_check.sh "$OUT"
# with the peers' wheels carried in .whl/ (fetch them here first: bash bench/device_wheels.sh).
# builds the extension with nvcc, runs the GPU tests, runs the benchmarks, writes logs and results
# into OUT_DIR and prints a short table last. It never changes GPU clocks or settings (read-only
# nvidia-smi queries only). Every stage runs against one deadline, BISAM_CHECK_SECONDS (default 540)
# after the start: the build gets at most 4 minutes, the tests at most 2.5, the linear loss at most
# 2.5, the benchmarks the rest. Time limits send SIGINT, so pytest and the runners still write their
# reports (each runner writes its JSON after every row). OUT_DIR ends with 8 files, the most the
# device tool brings back: device.txt, build.log, tests.log, linear_loss.log, linear_loss.json,
# bench.log, results/<tag>.json and results/<tag>.png.
set -uo pipefail
out="${1:-${OUT:-}}"
if [ -z "$out" ]; then
  echo "usage: bash bench/device_check.sh OUT_DIR" >&2
  exit 2
fi
mkdir -p "$out"
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1  # logs complete up to a kill; no progress bars in them
total="${BISAM_CHECK_SECONDS:-540}"
if ! [[ "$total" =~ ^[0-9]+$ ]]; then
  echo "BISAM_CHECK_SECONDS must be a whole number of seconds, got '$total'" >&2
  exit 2
fi
start=$(date +%s)
stage() { echo "== $1 ($(($(date +%s) - start)) s)"; }
left() { echo $((start + total - $(date +%s))); }
clamp() { local v=$1; [ "$v" -lt "$2" ] && v=$2; [ "$v" -gt "$3" ] && v=$3; echo "$v"; }

stage "device"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  "$py" -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -n 2
  git rev-parse HEAD 2>/dev/null || true
} 2>&1 | tee "$out/device.txt"

if compgen -G ".whl/*.whl" >/dev/null; then
  stage "peers from .whl (bench/device_wheels.sh)"
  site="$(mktemp -d)"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl \
    && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  ls .whl | tee -a "$out/device.txt"
fi

stage "build (nvcc, $(nproc) jobs)"
export MAX_JOBS="$(nproc)" BISAM_REQUIRE_CUDA=1
build_seconds="$(clamp $(($(left) - 120)) 30 240)"
timeout -k 10 "$build_seconds" "$py" -m pip install --no-build-isolation --no-deps -v -e . >"$out/build.log" 2>&1
build_rc=$?
if [ "$build_rc" -ne 0 ]; then
  tail -n 40 "$out/build.log"
  [ "$build_rc" -eq 124 ] && echo "BUILD TIMED OUT after $build_seconds s (BISAM_CHECK_SECONDS=$total)"
  echo "BUILD FAILED (exit code $build_rc): see build.log"
  exit 1
fi
grep -o -- "-gencode=[^ ]*" "$out/build.log" | sort -u

stage "tests"
# The GPU tests, wherever they are: every one is marked `cuda` (CUDA ops, Triton kernels on CUDA
# tensors, the optimizer on CUDA); the CPU-only ones (AOT compilation, CMake build, gloo, the example, the
# CUDA emulation) run in CI. A time limit keeps the budget: the CUDA C++ ops and the optimizer's
# tests run first (pytest keeps the order of the files it is given), and the durations size the next run.
first="python_tests/test_sam_perturb.py python_tests/test_optim.py"
# shellcheck disable=SC2046
timeout -s INT -k 15 "$(clamp $(($(left) - 120)) 30 150)" "$py" -m pytest $first \
  $(ls python_tests/test_*.py | grep -v -e /test_sam_perturb.py -e /test_optim.py) -m cuda -q -p no:cacheprovider \
  --durations=25 >"$out/tests.log" 2>&1
tests_rc=$?
tail -n 15 "$out/tests.log"

stage "linear loss"
# The fused linear + loss against the materialised path (and Liger-Kernel where importable) at the
# language-model shape, each implementation in a fresh process; the table is its last lines.
# The baseline first, then the fused path, Liger, and the float32 accumulation last.
timeout -s INT -k 10 "$(clamp $(($(left) - 150)) 60 150)" "$py" -m bench.bench_linear_loss --device cuda \
  --shape 16384x4096x128256 --impls materialised fused liger fused_accum32 --reps 3 --json "$out/linear_loss.json" \
  >"$out/linear_loss.log" 2>&1
tail -n 6 "$out/linear_loss.log"

stage "benchmarks"
# The runner measures the workloads the targets are read from first and writes its results after every
# case. It starts no case after its budget (counted from its start), which leaves the last case about a
# minute (a torch.compile baseline compiles for about that long) before the SIGINT at the deadline.
bench_seconds="$(clamp $(($(left) - 5)) 60 100000)"
timeout -s INT -k 15 "$bench_seconds" "$py" -m bench.run --out "$out/results" \
  --time-budget "$((bench_seconds > 120 ? bench_seconds - 75 : bench_seconds / 2))" >"$out/bench.log" 2>&1
bench_rc=$?

stage "done"
echo "tests exit code: $tests_rc   benchmarks exit code: $bench_rc"
# The short table last: the end of the benchmark output.
tail -n 100 "$out/bench.log"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
