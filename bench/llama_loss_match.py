"""Llama-1B-shaped training (random weights, transformers): the loss with
qforge's fused and generic linear+CE drop-ins against the unfused run, step
for step, with the peak memory of each run.

    python bench/llama_loss_match.py --out bench/results/llama_loss_match.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from _record import environment

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))


def run(mode, args):
    import transformers
    from qforge.hf import patch_causal_lm
    cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                   num_hidden_layers=args.layers, num_attention_heads=32,
                                   num_key_value_heads=8, max_position_embeddings=4096,
                                   tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    if mode != "unfused":
        patch_causal_lm(model, mode=mode)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    g = torch.Generator(device="cuda").manual_seed(1)
    losses, times = [], []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for step in range(args.steps):
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device="cuda", generator=g)
        labels = ids.clone()
        labels[:, : args.seq // 4] = -100  # an untrained prompt
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(out.loss.item())
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    del model, opt
    torch.cuda.empty_cache()
    return dict(losses=losses, step_s=times, peak_beyond_weights_gib=peak)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/llama_loss_match.json")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    args = ap.parse_args()
    res = dict(model="Llama-3.2-1B shapes (hidden 2048, 16 layers, vocab 128256, tied embeddings), random init, bf16 weights, AdamW",
               batch=args.batch, seq=args.seq, steps=args.steps, **environment(["transformers"]), runs={})
    for mode in ("unfused", "fused", "generic"):
        res["runs"][mode] = run(mode, args)
        r = res["runs"][mode]
        print(f"{mode:8s} peak {r['peak_beyond_weights_gib']:.2f} GiB  "
              f"step {sorted(r['step_s'])[len(r['step_s']) // 2] * 1e3:.0f} ms  losses "
              + " ".join(f"{x:.4f}" for x in r["losses"]), flush=True)
    ref = res["runs"]["unfused"]["losses"]
    for mode in ("fused", "generic"):
        d = [abs(a - b) / abs(b) for a, b in zip(res["runs"][mode]["losses"], ref)]
        res["runs"][mode]["max_rel_loss_diff_vs_unfused"] = max(d)
        print(f"{mode}: max relative loss difference vs unfused over {len(d)} steps: {max(d):.2e}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
