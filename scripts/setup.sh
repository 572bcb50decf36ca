#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: virtualenv, pinned installs, the extension build.
# Sourced by scripts/test.sh and scripts/bench.sh; leaves the virtualenv activated.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${BISAM_VENV:-$repo/.venv}"

if [ ! -x "$venv/bin/python" ]; then
  # The pinned torch (a CUDA build) and the rest take about 6 GiB: say so now, not as a pip OSError.
  need_kib=$((7 * 1024 * 1024))
  probe="$(dirname "$venv")"
  while [ ! -d "$probe" ]; do probe="$(dirname "$probe")"; done  # (venv creates the missing folders)
  free_kib="$(df -Pk "$probe" | awk 'NR == 2 { print $4 }')"
  if [ "$free_kib" -lt "$need_kib" ]; then
    echo "set-up needs about 7 GiB free for $venv; $((free_kib / 1024)) MiB are free there." \
      "Free some space, or point BISAM_VENV at a disk with room." >&2
    exit 1
  fi
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
# Rebuild only when the sources, the build settings or torch's version (the extension links to its C++
# ABI) changed since the last successful build (csrc/emulated is not part of the extension:
# python_tests/test_cuda_emulated.py builds it).
build_stamp="$repo/build/.extension.sha"
torch_version="$(python -c 'import torch; print(torch.__version__)')"
build_key="$(cd "$repo" && cat setup.py $(find csrc -type f -not -path "csrc/emulated/*" | sort) | sha256sum | cut -d' ' -f1)-${BISAM_REQUIRE_CUDA:-}-${TORCH_CUDA_ARCH_LIST:-}-${BISAM_FORCE_CPU:-}-$torch_version"
if [ "$(cat "$build_stamp" 2>/dev/null)" = "$build_key" ] && python -c "import bisam_kernels" 2>/dev/null; then
  built_now=""
else
  if ! (cd "$repo" && python -m pip install -v --no-build-isolation --no-deps -e . >"$log" 2>&1); then
    tail -n 60 "$log"
    echo "extension build failed; full log: build/extension-build.log" >&2
    exit 1
  fi
  echo "$build_key" > "$build_stamp"
  built_now=1
fi
# The log is that of the last build: the CUDA architectures it compiled for (none for a CPU-only build).
archs="$({ grep -o -- "-gencode=[^ ]*" "$log" || true; } | sed 's/.*code=//' | sort -u | tr '\n' ' ' | sed 's/ $//')"
if [ -n "$built_now" ]; then
  grep -m1 -o "bisam_kernels: building the [A-Za-z-]* extension" "$log" || true
  for cu in $(grep -o "nvcc .* -c [^ ]*\.cu" "$log" | grep -o "[^ ]*\.cu$" | sort -u); do
    echo "  nvcc compiled ${cu#"$repo"/} for $archs"
  done
fi
# Which kernels the extension carries and whether a GPU is here to run them: with nvcc but no GPU
# (CI) the CUDA kernels are built all the same, and everything runs on the CPU.
python - "$archs" "$built_now" <<'EOF_PY'
import sys
import torch
import bisam_kernels as bk

archs, built_now = sys.argv[1:]
kernels = f"built with CUDA kernels for {archs}" if bk.built_with_cuda() else "built CPU-only"
device = f"GPU: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU present: running on the CPU"
print(f"bisam_kernels: extension {kernels}; {device}" if built_now
      else f"bisam_kernels: extension up to date ({kernels}; {device})")
EOF_PY
