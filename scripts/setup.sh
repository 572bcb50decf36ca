#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: virtualenv, pinned installs, the extension build.
# Sourced by scripts/test.sh and scripts/bench.sh; leaves the virtualenv activated.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${BISAM_VENV:-$repo/.venv}"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
stamp="$venv/.requirements-dev.sha"
want="$(sha256sum "$repo/requirements-dev.txt" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -r "$repo/requirements-dev.txt"
  echo "$want" > "$stamp"
fi

# With nvcc present the CUDA build is required: a broken .cu must fail here, not fall back to CPU.
if command -v nvcc >/dev/null 2>&1 && [ -z "${BISAM_FORCE_CPU:-}" ]; then
  export BISAM_REQUIRE_CUDA=1
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"  # no GPU to detect: build for Hopper
  fi
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
mkdir -p "$repo/build"
log="$repo/build/extension-build.log"
if ! (cd "$repo" && python -m pip install -v --no-build-isolation --no-deps -e . >"$log" 2>&1); then
  tail -n 60 "$log"
  echo "extension build failed; full log: build/extension-build.log" >&2
  exit 1
fi
grep -m1 -o "bisam_kernels: building the [A-Za-z-]* extension" "$log" || true
grep -o "nvcc .*\.cu -o [^ ]*\|-gencode=[^ ]*" "$log" | sort -u | sed 's/^/  /' || true
python -c "import bisam_kernels as bk; print('bisam_kernels built; CUDA kernels:', bk.built_with_cuda())"
