"""Fused layer kernels against eager PyTorch, side by side in one process on
one GPU: RMSNorm (Llama-3-8B hidden, 4096 tokens), SwiGLU (its MLP, 4096 x
14336) and RoPE (q of [2, 2048, 32, 128]), forward and backward, bf16.

  python bench/layer_kernels.py [--out bench/results/layer_kernels.json]

Eager is transformers' LlamaRMSNorm, F.silu(gate) * up and
apply_rotary_pos_emb's q * cos + rotate_half(q) * sin (on the [B, H, T, Dh]
view, as the attention module calls it; q only); its backward is autograd's (torch.autograd.grad). Each time is the
median over CUDA-event-timed calls, the inputs rotating over enough copies
to exceed the L2. GB/s counts the fewest bytes the op must move (every input
read once, every output written once), also for eager, and is compared with a
device-to-device copy measured in the same process.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, rotate_half

import qforge.layer as L
from _record import environment

DTYPE = torch.bfloat16
L2_ROTATION_BYTES = 4 * 2**30  # inputs rotate over at least this many bytes


def median_ms(fn, sets, reps=60):
    """Median milliseconds of fn(*s) over reps calls, cycling through `sets`."""
    for s in sets[:3]:
        fn(*s)
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s = sets[i % len(sets)]
        start.record()
        fn(*s)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copies(make, bytes_per_set):
    """Enough independent input sets that one pass over them exceeds the L2."""
    return [make() for _ in range(max(2, min(64, L2_ROTATION_BYTES // max(1, bytes_per_set))))]


def copy_gbps():
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), [()], reps=30)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def row(name, shape, moved_bytes, eager_ms, fused_ms, copy):
    r = dict(op=name, shape=list(shape), dtype="bfloat16", bytes=moved_bytes, eager_us=eager_ms * 1e3,
             fused_us=fused_ms * 1e3, speedup=eager_ms / fused_ms,
             eager_gbps=moved_bytes / (eager_ms * 1e-3) / 1e9, fused_gbps=moved_bytes / (fused_ms * 1e-3) / 1e9)
    r["fused_copy_fraction"] = r["fused_gbps"] / copy
    print(f"{name:22s} {str(tuple(shape)):22s} eager {r['eager_us']:8.1f} us {r['eager_gbps']:6.0f} GB/s | "
          f"fused {r['fused_us']:8.1f} us {r['fused_gbps']:6.0f} GB/s ({r['fused_copy_fraction']:.2f} of copy) "
          f"x{r['speedup']:.2f}", flush=True)
    return r


def bench_rms_norm(gen, copy, tokens=4096, dim=4096, eps=1e-5):
    es = torch.finfo(DTYPE).bits // 8
    hf = LlamaRMSNorm(dim, eps=eps).to("cuda", DTYPE).requires_grad_(False)
    hf.weight.normal_(generator=gen)
    w = hf.weight

    def make():
        x = torch.randn(tokens, dim, device="cuda", dtype=DTYPE, generator=gen)
        return x, torch.randn_like(x)

    sets = copies(make, 3 * tokens * dim * es)
    fwd_eager = median_ms(lambda x, dy: hf(x), sets)
    fwd_fused = median_ms(lambda x, dy: L.rms_norm_forward(x, w, eps), sets)
    graphs = []
    for x, dy in sets:
        xg = x.detach().requires_grad_()
        graphs.append((xg, hf(xg), dy))
    bwd_eager = median_ms(lambda x, y, dy: torch.autograd.grad(y, x, dy, retain_graph=True), graphs)
    saved = [(dy, x, L.rms_norm_forward(x, w, eps)[1]) for x, dy in sets]
    bwd_fused = median_ms(lambda dy, x, rstd: L.rms_norm_backward(dy, x, w, rstd), saved)
    n = tokens * dim * es
    return [row("rms_norm forward", (tokens, dim), 2 * n, fwd_eager, fwd_fused, copy),
            row("rms_norm backward", (tokens, dim), 3 * n, bwd_eager, bwd_fused, copy)]


def bench_swiglu(gen, copy, tokens=4096, inter=14336):
    es = torch.finfo(DTYPE).bits // 8

    def make():
        g = torch.randn(tokens, inter, device="cuda", dtype=DTYPE, generator=gen)
        return g, torch.randn_like(g), torch.randn_like(g)

    sets = copies(make, 5 * tokens * inter * es)
    fwd_eager = median_ms(lambda g, u, d: F.silu(g) * u, sets)
    fwd_fused = median_ms(lambda g, u, d: L.swiglu_forward(g, u), sets)
    graphs = []
    for g, u, d in sets:
        gg, ug = g.detach().requires_grad_(), u.detach().requires_grad_()
        graphs.append((gg, ug, F.silu(gg) * ug, d))
    bwd_eager = median_ms(lambda g, u, out, d: torch.autograd.grad(out, (g, u), d, retain_graph=True), graphs)
    bwd_fused = median_ms(lambda g, u, d: L.swiglu_backward(d, g, u), sets)
    bwd_inplace = median_ms(lambda g, u, d: L.swiglu_backward_(d, g, u), sets)  # overwrites g, u: last
    n = tokens * inter * es
    return [row("swiglu forward", (tokens, inter), 3 * n, fwd_eager, fwd_fused, copy),
            row("swiglu backward", (tokens, inter), 5 * n, bwd_eager, bwd_fused, copy),
            row("swiglu backward_", (tokens, inter), 5 * n, bwd_eager, bwd_inplace, copy)]


def bench_rope(gen, copy, shape=(2, 2048, 32, 128)):
    es = torch.finfo(DTYPE).bits // 8
    batch, seq, heads, head_dim = shape
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, device="cuda", dtype=torch.float32) / head_dim))
    freqs = torch.arange(seq, device="cuda", dtype=torch.float32)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[None].expand(batch, seq, head_dim)
    cos, sin = emb.cos().to(DTYPE).contiguous(), emb.sin().to(DTYPE).contiguous()  # as LlamaRotaryEmbedding

    def make():
        return (torch.randn(*shape, device="cuda", dtype=DTYPE, generator=gen),)

    sets = copies(make, torch.Size(shape).numel() * es)

    c, s = cos.unsqueeze(1), sin.unsqueeze(1)

    def eager(x):  # apply_rotary_pos_emb's q half, on the [B, H, T, Dh] view of [B, T, H, Dh]
        q = x.transpose(1, 2)
        return q * c + rotate_half(q) * s

    fwd_eager = median_ms(eager, sets)
    fwd_fused = median_ms(lambda x: L.rope_forward_(x, cos, sin), sets)
    graphs = []
    for (x,) in sets:
        xg = x.detach().requires_grad_()
        q = eager(xg)
        graphs.append((xg, q, torch.randn_like(q)))
    bwd_eager = median_ms(lambda x, q, dq: torch.autograd.grad(q, x, dq, retain_graph=True), graphs)
    bwd_fused = median_ms(lambda x: L.rope_backward_(x, cos, sin), sets)
    n = torch.Size(shape).numel() * es
    return [row("rope forward (in place)", shape, 2 * n, fwd_eager, fwd_fused, copy),
            row("rope backward (in place)", shape, 2 * n, bwd_eager, bwd_fused, copy)]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench/results/layer_kernels.json")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    copy = copy_gbps()
    print(f"device-to-device copy: {copy:.0f} GB/s (read + write)", flush=True)
    rows = bench_rms_norm(gen, copy) + bench_swiglu(gen, copy) + bench_rope(gen, copy)
    result = dict(**environment(["transformers"]), copy_gbps=copy,
                  min_fused_copy_fraction=min(r["fused_copy_fraction"] for r in rows), ops=rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "ops"}, indent=2))


if __name__ == "__main__":
    main()
