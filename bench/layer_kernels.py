"""Fused layer kernels against eager PyTorch, side by side in one process on
one GPU: RMSNorm (Llama-3-8B hidden, 4096 tokens), SwiGLU (its MLP, 4096 x
14336) and RoPE (q of [2, 2048, 32, 128]), forward and backward, bf16.

  python bench/layer_kernels.py [--out bench/results/layer_kernels.json]

Eager is transformers' LlamaRMSNorm, F.silu(gate) * up and
apply_rotary_pos_emb's q * cos + rotate_half(q) * sin (on the [B, H, T, Dh]
view, as the attention module calls it; q only); its backward is autograd's
(torch.autograd.grad). Times are GPU time per call as the profiler records
the kernels (host launch overhead left out; `fused_call_us` is the time per
back-to-back eager call, overhead included), the inputs rotating over enough
copies to exceed the L2. GB/s counts the fewest bytes the op must move (every
input read once, every output written once), also for eager, and is compared
with a device-to-device copy measured in the same process.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, rotate_half

import qforge.layer as L
from _record import environment

DTYPE = torch.bfloat16
L2_ROTATION_BYTES = 4 * 2**30  # inputs rotate over at least this many bytes


def gpu_ms(fn, sets, reps=40):
    """Milliseconds of GPU time per fn(*s) call (the kernels' durations as the
    profiler records them, so the host's launch overhead is left out), the
    calls cycling through `sets`."""
    for s in sets[:3]:
        fn(*s)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(reps):
            fn(*sets[i % len(sets)])
        torch.cuda.synchronize()
    us = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages())
    return us / 1e3 / reps


def call_ms(fn, sets, reps=40):
    """Milliseconds per call of back-to-back calls, host overhead included."""
    for s in sets[:3]:
        fn(*s)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for i in range(reps):
        fn(*sets[i % len(sets)])
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def copies(make, bytes_per_set):
    """Enough independent input sets that one pass over them exceeds the L2."""
    return [make() for _ in range(max(2, min(64, L2_ROTATION_BYTES // max(1, bytes_per_set))))]


def copy_gbps():
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = gpu_ms(lambda: dst.copy_(src), [()], reps=20)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def row(name, shape, moved_bytes, eager_ms, fused_ms, fused_call, copy):
    r = dict(op=name, shape=list(shape), dtype="bfloat16", bytes=moved_bytes, eager_us=eager_ms * 1e3,
             fused_us=fused_ms * 1e3, fused_call_us=fused_call * 1e3, speedup=eager_ms / fused_ms,
             eager_gbps=moved_bytes / (eager_ms * 1e-3) / 1e9, fused_gbps=moved_bytes / (fused_ms * 1e-3) / 1e9)
    r["fused_copy_fraction"] = r["fused_gbps"] / copy
    print(f"{name:24s} {str(tuple(shape)):20s} eager {r['eager_us']:7.1f} us {r['eager_gbps']:5.0f} GB/s | "
          f"fused {r['fused_us']:7.1f} us {r['fused_gbps']:5.0f} GB/s ({r['fused_copy_fraction']:.2f} of copy) "
          f"x{r['speedup']:.2f}; per call {r['fused_call_us']:.1f} us", flush=True)
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
    fwd_eager = gpu_ms(lambda x, dy: hf(x), sets)
    fused = lambda x, dy: L.rms_norm_forward(x, w, eps)  # noqa: E731
    fwd_fused, fwd_call = gpu_ms(fused, sets), call_ms(fused, sets)
    graphs = []
    for x, dy in sets:
        xg = x.detach().requires_grad_()
        graphs.append((xg, hf(xg), dy))
    bwd_eager = gpu_ms(lambda x, y, dy: torch.autograd.grad(y, x, dy, retain_graph=True), graphs)
    saved = [(dy, x, L.rms_norm_forward(x, w, eps)[1]) for x, dy in sets]
    fused = lambda dy, x, rstd: L.rms_norm_backward(dy, x, w, rstd)  # noqa: E731
    bwd_fused, bwd_call = gpu_ms(fused, saved), call_ms(fused, saved)
    n = tokens * dim * es
    return [row("rms_norm forward", (tokens, dim), 2 * n, fwd_eager, fwd_fused, fwd_call, copy),
            row("rms_norm backward", (tokens, dim), 3 * n, bwd_eager, bwd_fused, bwd_call, copy)]


def bench_swiglu(gen, copy, tokens=4096, inter=14336):
    es = torch.finfo(DTYPE).bits // 8

    def make():
        g = torch.randn(tokens, inter, device="cuda", dtype=DTYPE, generator=gen)
        return g, torch.randn_like(g), torch.randn_like(g)

    sets = copies(make, 5 * tokens * inter * es)
    fwd_eager = gpu_ms(lambda g, u, d: F.silu(g) * u, sets)
    fused = lambda g, u, d: L.swiglu_forward(g, u)  # noqa: E731
    fwd_fused, fwd_call = gpu_ms(fused, sets), call_ms(fused, sets)
    graphs = []
    for g, u, d in sets:
        gg, ug = g.detach().requires_grad_(), u.detach().requires_grad_()
        graphs.append((gg, ug, F.silu(gg) * ug, d))
    bwd_eager = gpu_ms(lambda g, u, out, d: torch.autograd.grad(out, (g, u), d, retain_graph=True), graphs)
    fused = lambda g, u, d: L.swiglu_backward(d, g, u)  # noqa: E731
    bwd_fused, bwd_call = gpu_ms(fused, sets), call_ms(fused, sets)
    fused = lambda g, u, d: L.swiglu_backward_(d, g, u)  # noqa: E731  (overwrites g, u: last)
    inplace_fused, inplace_call = gpu_ms(fused, sets), call_ms(fused, sets)
    n = tokens * inter * es
    return [row("swiglu forward", (tokens, inter), 3 * n, fwd_eager, fwd_fused, fwd_call, copy),
            row("swiglu backward", (tokens, inter), 5 * n, bwd_eager, bwd_fused, bwd_call, copy),
            row("swiglu backward_", (tokens, inter), 5 * n, bwd_eager, inplace_fused, inplace_call, copy)]


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

    fwd_eager = gpu_ms(eager, sets)
    fused = lambda x: L.rope_forward_(x, cos, sin)  # noqa: E731
    fwd_fused, fwd_call = gpu_ms(fused, sets), call_ms(fused, sets)
    graphs = []
    for (x,) in sets:
        xg = x.detach().requires_grad_()
        q = eager(xg)
        graphs.append((xg, q, torch.randn_like(q)))
    bwd_eager = gpu_ms(lambda x, q, dq: torch.autograd.grad(q, x, dq, retain_graph=True), graphs)
    fused = lambda x: L.rope_backward_(x, cos, sin)  # noqa: E731
    bwd_fused, bwd_call = gpu_ms(fused, sets), call_ms(fused, sets)
    n = torch.Size(shape).numel() * es
    return [row("rope forward (in place)", shape, 2 * n, fwd_eager, fwd_fused, fwd_call, copy),
            row("rope backward (in place)", shape, 2 * n, bwd_eager, bwd_fused, bwd_call, copy)]


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
