#!/usr/bin/env bash
# One batched device run for the loss capability: CUDA tests + benchmarks.
# Expects a built libqforge.so and test_loss_lce in $CARRY (default .carry-loss)
# and the peers' wheels in .whl/. Writes logs and JSON to $OUT (default out/).
set -u
export PYTHONUNBUFFERED=1
CARRY=${CARRY:-.carry-loss}
OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/liger_kernel-*.whl .whl/cut_cross_entropy-*.whl 2>&1 | tail -2
export QFORGE_LIBRARY=$PWD/$CARRY/libqforge.so
export PYTHONPATH=/tmp/site:$PWD/python:$PWD/tests/python
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo "== C++ tests"; "$CARRY"/test_loss_lce 2>&1 | tail -8
  echo "== pytest (cuda)"; python3 -m pytest -q -p no:cacheprovider tests/python/test_loss.py \
    tests/python/test_loss_generic.py -m cuda 2>&1 | tail -15
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  echo "== bench"; python3 bench/linear_loss.py --out "$OUT"/linear_loss.json ${BENCH_ARGS:-} 2>&1 | tee "$OUT"/bench.log | grep -v "^\s*$" | tail -60
fi
if [ "${SKIP_LLAMA:-0}" != 1 ]; then
  echo "== llama"; python3 bench/llama_loss_match.py --out "$OUT"/llama_loss_match.json ${LLAMA_ARGS:-} 2>&1 | tail -8
fi
