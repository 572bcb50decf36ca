#!/usr/bin/env bash
# One call on a GPU machine with no network (its own python3 with torch and triton):
#   bash bench/device_check.sh "$OUT"
# builds the extension with nvcc, runs the GPU tests, runs the benchmarks, writes logs and results
# into OUT_DIR and prints a short table last. It never changes GPU clocks or settings (read-only
# nvidia-smi queries only). Budget: at most 9 minutes on one H200 (build ~1.5, tests <= 2.5, benchmarks
# 3.5 plus the case running then, 1.5 at most); BISAM_TEST_SECONDS and BISAM_BENCH_SECONDS change it.
set -uo pipefail
out="${1:-${OUT:-}}"
if [ -z "$out" ]; then
  echo "usage: bash bench/device_check.sh OUT_DIR" >&2
  exit 2
fi
mkdir -p "$out"
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
start=$(date +%s)
stage() { echo "== $1 ($(($(date +%s) - start)) s)"; }

stage "device"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  "$py" -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -n 2
  git rev-parse HEAD 2>/dev/null || true
} 2>&1 | tee "$out/device.txt"

stage "build (nvcc, $(nproc) jobs)"
export MAX_JOBS="$(nproc)" BISAM_REQUIRE_CUDA=1
if ! "$py" -m pip install --no-build-isolation --no-deps -v -e . >"$out/build.log" 2>&1; then
  tail -n 40 "$out/build.log"
  echo "BUILD FAILED: see build.log"
  exit 1
fi
grep -o -- "-gencode=[^ ]*" "$out/build.log" | sort -u

stage "tests"
# The suites with GPU cases (CUDA ops, Triton kernels on CUDA tensors, the optimizer on CUDA); the
# CPU-only ones (AOT compilation, CMake build, gloo, the example) run in CI. A time limit keeps the budget.
timeout "${BISAM_TEST_SECONDS:-150}" "$py" -m pytest python_tests/test_sam_perturb.py \
  python_tests/test_bisam_loss.py python_tests/test_optim.py -q -p no:cacheprovider \
  --junitxml="$out/tests.xml" >"$out/tests.log" 2>&1
tests_rc=$?
tail -n 15 "$out/tests.log"

stage "benchmarks"
# The runner measures the workloads the targets are read from first, starts no case after its time
# budget and writes the results after every case; the outer limit only guards a case that hangs.
budget="${BISAM_BENCH_SECONDS:-210}"
timeout "$((budget + 90))" "$py" -m bench.run --out "$out/results" --time-budget "$budget" \
  >"$out/bench.log" 2>&1
bench_rc=$?

stage "done"
echo "tests exit code: $tests_rc   benchmarks exit code: $bench_rc"
# The short table last: the end of the benchmark output.
tail -n 100 "$out/bench.log"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
