#!/usr/bin/env bash
# Installs what building and testing qforge needs on a Debian machine, then
# builds and installs the package (incrementally: build/wheel is kept).
# Idempotent; every step is skipped when already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v g++ >/dev/null || need_apt+=(g++)
command -v cmake >/dev/null || need_apt+=(cmake)
[ -f /usr/include/gtest/gtest.h ] || need_apt+=(libgtest-dev)
command -v python3 >/dev/null || need_apt+=(python3 python3-pip python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need_apt[@]}"
fi

# nvcc is optional: with it the library gets CUDA kernels for sm_75..sm_90
[ -d /usr/local/cuda/bin ] && export PATH="$PATH:/usr/local/cuda/bin"

PIP="python3 -m pip"
$PIP install -q --disable-pip-version-check scikit-build-core cmake ninja
$PIP install -q --disable-pip-version-check --no-build-isolation \
  -C cmake.define.QFORGE_BUILD_TESTS="${QFORGE_BUILD_TESTS:-ON}" ".[test]"
