#!/usr/bin/env bash
# The main job: set-up on a fresh machine, then every microbenchmark against PyTorch-native SAM
# on the available device (table printed; JSON + PNG under bench/results/). Arguments go to
# bench/run.py (e.g. --quick).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup.sh"
cd "$repo"
python -m bench.run "$@"
