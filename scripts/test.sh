#!/usr/bin/env bash
# The whole test suite, after set-up on a fresh machine. Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup.sh"
cd "$repo"
python -m pytest python_tests -q "$@"
