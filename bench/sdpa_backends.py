"""Time torch's scaled_dot_product_attention backends at Llama-3.1-8B attention shapes
(32 query heads, 8 KV heads repeated, head dim 128, causal, bf16): forward + backward of one
layer per length, for each backend that accepts the inputs. At long context attention is
nearly all of a training step's time, so this decides which backend qforge's bench prefers.

  python bench/sdpa_backends.py --lengths 2048,32768,131072 --out sdpa.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from _record import environment

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def time_one(backend, t, heads, kv_heads, dim, reps):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, heads, t, dim, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(1, kv_heads, t, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, kv_heads, t, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    k = k.repeat_interleave(heads // kv_heads, 1).requires_grad_()  # as transformers' repeat_kv
    v = v.repeat_interleave(heads // kv_heads, 1).requires_grad_()
    go = torch.randn_like(q)
    with sdpa_kernel([BACKENDS[backend]]):
        for i in range(reps + 1):
            if i == 1:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.backward(go)
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,32768,131072")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    rows = []
    for t in [int(x) for x in a.lengths.split(",")]:
        reps = max(1, min(20, (1 << 32) // (t * t)))
        flops = 4 * t * t * a.dim * a.heads / 2 * 3.5  # causal forward (2 GEMMs) + backward (~2.5x)
        for name in BACKENDS:
            try:
                s = time_one(name, t, a.heads, a.kv_heads, a.dim, reps)
                rows.append(dict(backend=name, tokens=t, ms=s * 1e3, tflops=flops / s / 1e12))
            except RuntimeError as e:
                rows.append(dict(backend=name, tokens=t, error=str(e).splitlines()[0][:200]))
            print(rows[-1], flush=True)
            torch.cuda.empty_cache()
    result = dict(**environment(),
                  shape=dict(heads=a.heads, kv_heads=a.kv_heads, dim=a.dim, causal=True, dtype="bfloat16"),
                  fwd_bwd=rows)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
