#!/bin/bash
# Where the time of a two-GPU FSDP2 step goes (issue 10's scaling): one GPU
# without FSDP against two GPUs at the same per-GPU batch, each with a
# torch.profiler summary per rank (bench/fsdp2_profile.py), for FSDP2's own
# prefetching and explicit prefetch 1 and 2 layers ahead; plus the bf16 FSDP2
# reference of the all-gather bytes. Needs QFORGE_LIBRARY (a CUDA build) and
# PYTHONPATH pointing at python/. Writes everything under $1.
set -u
OUT=${1:-/tmp/fsdp2-profile}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
RUN2="python3 -m torch.distributed.run --standalone --nproc-per-node 2 bench/fsdp2.py"
COMMON="--steps 7 --warmup 4 --profile 2 --max-seconds 20 --out $OUT"
timeout 60 python3 bench/fsdp2.py --name 8b_1gpu_a1 $COMMON
timeout 60 $RUN2 --name 8b_2gpu_p0 --prefetch 0 $COMMON
timeout 60 $RUN2 --name 8b_2gpu_p1 --prefetch 1 $COMMON
timeout 60 $RUN2 --name 8b_2gpu_p2 --prefetch 2 $COMMON
timeout 60 $RUN2 --name 8b_2gpu_bf16 --stack bf16 --steps 3 --warmup 1 --max-seconds 10 --out "$OUT"
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("*.json")):
    d = json.loads(f.read_text())
    print(f.stem, d.get("tokens_per_s"), d.get("step_s"), d.get("peak_gib_per_rank"), d.get("collective_bytes_per_step_per_rank"))
PY
