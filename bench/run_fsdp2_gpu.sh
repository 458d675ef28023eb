#!/bin/bash
# The whole GPU job behind bench/results/fsdp2.json, for one call on a machine
# with two GPUs (each stage bounded by `timeout` and --max-seconds, so the job
# fits a 10-minute window). Needs QFORGE_LIBRARY (a CUDA build) and PYTHONPATH
# pointing at python/. Writes the parts and fsdp2.json under $1.
set -u
OUT=${1:-bench/results}
P=$OUT/fsdp2-parts
mkdir -p "$P"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 - "$P/versions.json" <<'PY'
import json, sys, torch, transformers, peft
v = {"device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}", "torch": torch.__version__,
     "cuda": torch.version.cuda, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
     "transformers": transformers.__version__, "peft": peft.__version__}
try:
    import bitsandbytes
    v["bitsandbytes"] = bitsandbytes.__version__
except Exception as e:  # noqa: BLE001
    v["bitsandbytes"] = f"unavailable: {e}"
json.dump(v, open(sys.argv[1], "w"))
print(v)
PY
RUN2="python3 -m torch.distributed.run --standalone --nproc-per-node 2 bench/fsdp2.py"
timeout 100 $RUN2 --name 8b_2gpu --steps 60 --max-seconds 50 --out "$P"
timeout 130 python3 bench/fsdp2.py --name 8b_1gpu --grad-accum 2 --steps 60 --max-seconds 85 --out "$P"
timeout 110 $RUN2 --name 70b_offload --model 70b --offload --steps 5 --warmup 1 --max-seconds 30 --out "$P"
timeout 80 $RUN2 --name 70b_no_offload --model 70b --steps 5 --warmup 1 --max-seconds 20 --out "$P"
timeout 50 $RUN2 --name peft_bnb_2gpu --stack peft_bnb --steps 5 --warmup 1 --max-seconds 15 --out "$P" 2>&1 | tail -5
python3 bench/fsdp2.py --combine "$P" --write "$OUT/fsdp2.json"
