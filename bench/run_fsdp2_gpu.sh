#!/bin/bash
# The whole GPU job behind bench/results/fsdp2.json, for one call on a machine
# with two GPUs (each stage bounded by `timeout` and --max-seconds). Needs
# QFORGE_LIBRARY (a CUDA build) and PYTHONPATH pointing at python/. Writes the
# parts and fsdp2.json under $1. SKIP names stages to leave out (their parts
# from an earlier run can be put in $1/fsdp2-parts beforehand), e.g.
# SKIP="70b_offload peft_bnb_2gpu". STEPS sets the 8B runs' steps (default 60).
set -u
OUT=${1:-bench/results}
P=$OUT/fsdp2-parts
STEPS=${STEPS:-60}
SKIP=" ${SKIP:-} "
mkdir -p "$P"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 - "$P/versions.json" <<'PY'
import json, sys, torch, transformers, peft
v = {"device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}", "torch": torch.__version__,
     "cuda": torch.version.cuda, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
     "transformers": transformers.__version__, "peft": peft.__version__,
     "gpu_peer_access": torch.cuda.device_count() > 1 and torch.cuda.can_device_access_peer(0, 1)}
try:
    import bitsandbytes
    v["bitsandbytes"] = bitsandbytes.__version__
except Exception as e:  # noqa: BLE001
    v["bitsandbytes"] = f"unavailable: {e}"
json.dump(v, open(sys.argv[1], "w"))
print(v)
PY
stage() {  # stage NAME TIMEOUT COMMAND...: run unless NAME is in SKIP
    local name=$1 limit=$2
    shift 2
    case "$SKIP" in *" $name "*) echo "skipping $name"; return;; esac
    timeout "$limit" "$@"
}
RUN2="python3 -m torch.distributed.run --standalone --nproc-per-node 2 bench/fsdp2.py"
S8=$((STEPS * 11 / 10 + 5))  # seconds for the 8B steps (~1 s each on one GPU at grad_accum 2)
stage 8b_1gpu $((S8 + 45)) python3 bench/fsdp2.py --name 8b_1gpu --grad-accum 2 --steps "$STEPS" --max-seconds $S8 --out "$P"
stage 8b_2gpu $((S8 + 45)) $RUN2 --name 8b_2gpu --steps "$STEPS" --max-seconds $S8 --out "$P"
stage 8b_2gpu_keep_gathered $((S8 + 45)) $RUN2 --name 8b_2gpu_keep_gathered --keep-gathered --steps "$STEPS" \
    --max-seconds $S8 --out "$P"
stage 8b_1gpu_fused $((S8 + 45)) python3 bench/fsdp2.py --name 8b_1gpu_fused --fused-layers --grad-accum 2 \
    --steps "$STEPS" --max-seconds $S8 --out "$P"
stage 8b_2gpu_fused_keep_gathered $((S8 + 45)) $RUN2 --name 8b_2gpu_fused_keep_gathered --fused-layers \
    --keep-gathered --steps "$STEPS" --max-seconds $S8 --out "$P"
stage 8b_2gpu_bf16 60 $RUN2 --name 8b_2gpu_bf16 --stack bf16 --steps 3 --warmup 1 --max-seconds 10 --out "$P"
stage 70b_offload 110 $RUN2 --name 70b_offload --model 70b --offload --steps 5 --warmup 1 --max-seconds 30 --out "$P"
stage 70b_no_offload 80 $RUN2 --name 70b_no_offload --model 70b --steps 4 --warmup 1 --max-seconds 12 --out "$P"
stage peft_bnb_2gpu 50 $RUN2 --name peft_bnb_2gpu --stack peft_bnb --steps 5 --warmup 1 --max-seconds 15 --out "$P" \
    2>&1 | tail -5
python3 bench/fsdp2.py --combine "$P" --write "$OUT/fsdp2.json"
