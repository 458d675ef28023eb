#!/usr/bin/env bash
# The main job on its embedded default (see `qforge --help` for the others).
set -euo pipefail
cd "$(dirname "$0")/.."
QFORGE_BUILD_TESTS=OFF bash scripts/setup.sh
exec qforge "$@"
