#!/usr/bin/env bash
# One batched device run for the layer kernels and the fp32 NF4 dequant: CUDA
# tests + benchmarks. Expects a built libqforge.so and test_layer in $CARRY
# (default .carry-layer; rebuilt here for sm_90 when they do not load) and
# bitsandbytes unpacked in $CARRY/site. Writes logs and JSON to $OUT.
set -u
export PYTHONUNBUFFERED=1
CARRY=$(realpath "${CARRY:-.carry-layer}")
OUT=${OUT:-out}
mkdir -p "$OUT"
SITE=$CARRY/site
# the toolkit's cuBLASLt, else the one PyTorch's wheels bring
CUBLAS_PIP=$(python3 -c "import nvidia.cublas, os; print(os.path.dirname(nvidia.cublas.__file__) + '/lib')" 2>/dev/null)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${CUBLAS_PIP:-}:${LD_LIBRARY_PATH:-}
if ! python3 -c "import ctypes; ctypes.CDLL('$CARRY/libqforge.so')" || ! "$CARRY"/test_layer --gtest_list_tests > /dev/null; then
  echo "== carried build does not load: building for sm_90"
  { timeout 300 cmake -S . -B /tmp/build -G Ninja -DQFORGE_CUDA=ON -DQFORGE_CUDA_ARCHS=90 -DQFORGE_BUILD_TESTS=ON \
      -DCMAKE_BUILD_TYPE=Release && timeout 300 cmake --build /tmp/build -j16 --target qforge test_layer; } \
    > "$OUT"/build.log 2>&1 || { tail -20 "$OUT"/build.log; exit 1; }
  CARRY=/tmp/build
  cp /tmp/build/tests/cpp/test_layer "$CARRY"/
fi
export QFORGE_LIBRARY=$CARRY/libqforge.so
export PYTHONPATH=$SITE:$PWD/python:$PWD/tests/python
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo "== C++ tests"; timeout 120 "$CARRY"/test_layer > "$OUT"/test_layer.log 2>&1
  grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure" "$OUT"/test_layer.log | head -30
  echo "== pytest (cuda)"; timeout 240 python3 -m pytest -q -p no:cacheprovider tests/python/test_layer.py \
    tests/python/test_nf4.py -m cuda > "$OUT"/pytest.log 2>&1; tail -15 "$OUT"/pytest.log
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  echo "== bench layer kernels"; timeout 180 python3 bench/layer_kernels.py --out "$OUT"/layer_kernels.json 2>&1 | tail -14
  echo "== bench nf4"; timeout 180 python3 bench/nf4_dequant.py --out "$OUT"/nf4_dequant.json > "$OUT"/bench_nf4.log 2>&1
  grep -v "^\s*$" "$OUT"/bench_nf4.log | tail -45
fi
