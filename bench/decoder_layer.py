"""qforge.decoder on the GPU: its attention kernels against the fp32 math path, and the training
step with fused decoder layers against plain checkpointed layers, with the top kernels by GPU
time of each (torch.profiler).

  python bench/decoder_layer.py [--layers 8] [--seq 2048] [--batch 2] [--steps 3] [--fused off,on]
      [--out bench/results/decoder_layer.json]

1. Attention: `decoder.attention_forward/backward` with each CUDA kernel (flash with cu_seqlens,
   cuDNN for dense rows) against the fp32 math path on random bf16 q/k/v of grouped-query shapes,
   packed rows of random document lengths (1 included), with and without a sliding window:
   largest error of o and of dq/dk/dv relative to the largest reference value.
2. Step: Llama-3.1-8B layer shapes (--layers of them), NF4 + LoRA r=16 on all 7 projections,
   bf16 autocast, checkpoints offloaded, cuDNN attention preferred; fused vs checkpointed
   recompute, same weights and batches: tokens/s, peak memory, losses, top kernels.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import environment  # noqa: E402
from train_step import model_arguments  # noqa: E402


def check_attention(device, seed=0):
    from qforge import decoder

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for B, T, Hq, Hkv, D, packed, window in [(2, 1000, 8, 2, 128, True, None), (1, 777, 4, 4, 64, True, 100),
                                             (2, 512, 32, 8, 128, False, None), (1, 1537, 6, 2, 64, False, 300)]:
        if packed:
            pos = []
            for _ in range(B):
                row, left = [], T
                while left:
                    n = min(left, 1 if not row else int(torch.randint(1, T // 3 + 2, (1,), generator=gen)))
                    row += list(range(n))
                    left -= n
                pos.append(row)
            position_ids = torch.tensor(pos, device=device)
        else:
            position_ids = None
        docs = decoder.packed_documents(position_ids, None, B, T, device)
        q, k, v, do = (torch.randn(B * T, h, D, generator=gen).to(device, torch.bfloat16)
                       for h in (Hq, Hkv, Hkv, Hq))
        scale = D ** -0.5
        ref_o, ref_state = decoder.attention_forward(q.float(), k.float(), v.float(), docs, scale, window, "math")
        ref_grads = decoder.attention_backward(do.float(), q.float(), k.float(), v.float(), ref_o, ref_state, docs,
                                               scale, window, "math")
        kernels = ["flash"] + (["cudnn"] if docs.dense and window is None else [])
        for kernel in kernels:
            try:
                o, state = decoder.attention_forward(q, k, v, docs, scale, window, kernel)
                grads = decoder.attention_backward(do, q, k, v, o, state, docs, scale, window, kernel)
            except Exception as e:  # noqa: BLE001  (reported beside the others)
                rows.append(dict(kernel=kernel, shape=[B, T, Hq, Hkv, D], packed=packed, window=window,
                                 error=f"{type(e).__name__}: {str(e)[:400]}"))
                continue
            rel = lambda a, b: float((a.float() - b).abs().max() / b.abs().max())  # noqa: E731
            lse = state[0].float()
            if kernel == "cudnn":  # [B, Hq, T(, 1)] -> the math path's [Hq, B*T]
                lse = lse.reshape(B, Hq, T).permute(1, 0, 2).reshape(Hq, B * T)
            rows.append(dict(kernel=kernel, shape=[B, T, Hq, Hkv, D], packed=packed, window=window,
                             documents=len(docs.bounds) - 1, o=rel(o, ref_o),
                             lse=float((lse.reshape(-1) - ref_state[0].reshape(-1)).abs().max())
                             if lse.numel() == ref_state[0].numel() else f"shape {tuple(lse.shape)}",
                             dq=rel(grads[0], ref_grads[0]), dk=rel(grads[1], ref_grads[1]),
                             dv=rel(grads[2], ref_grads[2])))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def step_bench(a, fused: str, device):
    from train_step import batches, build_qforge, make_config

    from qforge.attention import prefer_cudnn_attention

    a.fused_layers = fused
    torch.manual_seed(a.seed)
    model = build_qforge(make_config(a), a, device, compiled=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, fused=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    losses, times, prof_rows = [], [], None
    with prefer_cudnn_attention():
        for step, (ids, labels) in enumerate(batches(a, device)):
            profile = step == a.warmup + a.steps - 1
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) if profile else None
            torch.cuda.synchronize()
            t = time.perf_counter()
            if prof:
                prof.__enter__()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if prof:
                prof.__exit__(None, None, None)
                events = sorted(prof.key_averages(), key=lambda e: -getattr(e, "device_time_total", 0))
                total = sum(getattr(e, "device_time_total", 0) for e in events)
                prof_rows = [dict(name=e.key[:120], ms=getattr(e, "device_time_total", 0) / 1e3, calls=e.count)
                             for e in events[:a.top]]
                prof_rows.append(dict(name="(all kernels)", ms=total / 1e3))
            else:
                times.append(time.perf_counter() - t)
            losses.append(loss.item())
    timed = times[a.warmup:] or times
    status = getattr(model, "_qforge_fused_status", None)
    return dict(fused_layers=str(status or "off"), tokens_per_s=a.batch * a.seq * len(timed) / sum(timed),
                step_ms=[t * 1e3 for t in timed], peak_gib=torch.cuda.max_memory_allocated() / 2**30, losses=losses,
                top_kernels_last_step=prof_rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap, layers=8, steps=3, warmup=1)
    ap.add_argument("--tile", type=int, default=8192)
    ap.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--skip-step", action="store_true")
    ap.add_argument("--fused", default="off,on", help="which steps to run: off (checkpointed), on (fused layers)")
    ap.add_argument("--out", default="bench/results/decoder_layer.json")
    a = ap.parse_args()
    a.prompt_heavy = False
    device = torch.device("cuda")
    out = dict(**environment(["transformers"]))
    ops = {}
    for name in ("_flash_attention_forward", "_flash_attention_backward", "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_cudnn_attention_backward"):
        op = getattr(torch.ops.aten, name, None)
        ops[name] = str(op.default._schema) if op is not None else "missing"
    out["op_schemas"] = ops
    out["attention"] = check_attention(device)
    if not a.skip_step:
        out["config"] = dict(layers=a.layers, hidden=a.hidden, intermediate=a.intermediate, heads=a.heads,
                             kv_heads=a.kv_heads, seq=a.seq, batch=a.batch, lora_r=a.rank, offload=a.offload,
                             tile=a.tile, attention="cudnn preferred", autocast="bf16")
        out["step"] = {}
        for fused in a.fused.split(","):
            if fused not in ("off", "on"):
                raise SystemExit(f"--fused: expected off and/or on, got {fused!r}")
            out["step"][fused] = step_bench(a, fused, device)
            r = out["step"][fused]
            print(f"fused {fused}: {r['tokens_per_s']:.0f} tok/s, peak {r['peak_gib']:.2f} GiB, losses {r['losses']}",
                  flush=True)
            for row in r["top_kernels_last_step"]:
                print(f"   {row['ms']:9.2f} ms {row.get('calls', ''):>6} {row['name']}", flush=True)
            torch.cuda.empty_cache()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
