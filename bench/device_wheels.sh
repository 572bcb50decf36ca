#!/usr/bin/env bash
# Downloads, here (with network), the pure-Python peers the GPU machine lacks into .whl/ (ignored by git):
# Liger-Kernel (its fused linear cross-entropy, the linear-loss benchmark's peer) and pytorch-optimizer
# (its SAM, the peer_pytorch_optimizer rows). The GPU call carries them: run(..., carry=[".whl"]);
# bench/device_check.sh installs whatever lies in .whl/ before it starts, into a folder of its own.
# Their own needs (torch, triton, numpy) are on that machine already.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  liger-kernel==0.8.5 pytorch-optimizer==4.1.0
ls -l .whl
