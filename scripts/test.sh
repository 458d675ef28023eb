#!/usr/bin/env bash
# Runs every test: the C++ core (GoogleTest through ctest) and the Python layer (pytest).
# GPU tests are marked and skip without a CUDA device; run this on a GPU machine to run them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ctest --test-dir build/wheel --output-on-failure -j2
python3 -m pytest -q "$@"
