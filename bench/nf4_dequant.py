"""NF4 double-dequant benchmark, side by side in one process on one GPU:
qforge's fused kernel, bitsandbytes' dequantize_4bit(..., out=) (the same
three-kernel path as Unsloth's fast_dequantize), and a device-to-device copy
as the roofline.

  python bench/nf4_dequant.py [--iters 1000] [--out bench/results/nf4_dequant.json]

Reports the challenge harness (three MLP configs, 1000 iterations, synchronize
after each dequant, wall clock) and, for Llama 3 8B / 70B and Qwen2.5-14B
weight shapes and bf16, fp16 and fp32 outputs, the
GPU time per dequant (20 calls replayed from one CUDA graph) and the time per
eager call (back-to-back calls, CUDA events: launch path included), checks every output bit-for-bit against
bitsandbytes, writes JSON and a PNG plot.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import bitsandbytes.functional as bnb_F
import qforge.nf4 as nf4
from _record import environment

HARNESS = [(2048, 8192, torch.float16), (1024, 4096, torch.bfloat16), (4096, 14336, torch.bfloat16)]
SHAPES = {  # (out_features, in_features)
    "llama3-8b q/o_proj": (4096, 4096),
    "llama3-8b k/v_proj": (1024, 4096),
    "llama3-8b gate/up_proj": (14336, 4096),
    "llama3-8b down_proj": (4096, 14336),
    "llama3-70b q/o_proj": (8192, 8192),
    "llama3-70b k/v_proj": (1024, 8192),
    "llama3-70b gate/up_proj": (28672, 8192),
    "llama3-70b down_proj": (8192, 28672),
    "qwen2.5-14b gate/up_proj": (13824, 5120),
}
SHAPE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def quantized(rows, cols, dtype, gen):
    w = torch.randn(rows, cols, device="cuda", generator=gen, dtype=torch.float32) * 0.02
    packed, state = bnb_F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    state.dtype = dtype
    return packed, state


def event_time(fn, reps):
    """Mean milliseconds per call over `reps` back-to-back calls (after warm-up)."""
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def graph_time(fn, reps):
    """Mean milliseconds per call of `reps` calls captured in one CUDA graph:
    the GPU's time alone, without the per-call launch path. None if `fn`
    cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
    except RuntimeError as e:
        print(f"  (not capturable: {str(e).splitlines()[0]})")
        return None
    return event_time(graph.replay, 5) / reps


def copy_bandwidth(nbytes):
    """Bytes read + written per second by a device-to-device copy of nbytes."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = event_time(lambda: dst.copy_(src), 50)
    return 2 * nbytes / (ms * 1e-3)


def bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def harness(iters, gen):
    """The challenge's timing loop: dequantize gate, up, down with a synchronize after each."""
    results = []
    for hd, m, dtype in HARNESS:
        weights = [quantized(m, hd, dtype, gen), quantized(m, hd, dtype, gen), quantized(hd, m, dtype, gen)]
        outs = [torch.empty(s.shape, dtype=dtype, device="cuda") for _, s in weights]
        exact = all(
            torch.equal(bits(nf4.dequantize(p, s)), bits(bnb_F.dequantize_4bit(p, s))) for p, s in weights
        )
        impls = {
            "qforge": lambda p, s, o: nf4.dequantize(p, s, out=o),
            "bitsandbytes": lambda p, s, o: bnb_F.dequantize_4bit(p, s, out=o),
        }
        seconds = {}
        for name, fn in impls.items():
            for (p, s), o in zip(weights, outs):  # warm-up
                fn(p, s, o)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                for (p, s), o in zip(weights, outs):
                    fn(p, s, o)
                    torch.cuda.synchronize()
            seconds[name] = time.perf_counter() - t0
        results.append(dict(hd=hd, m=m, dtype=str(dtype).removeprefix("torch."), iters=iters,
                            qforge_s=seconds["qforge"], bitsandbytes_s=seconds["bitsandbytes"],
                            speedup=seconds["bitsandbytes"] / seconds["qforge"], bit_exact=exact))
        print(f"harness hd={hd:5d} m={m:5d} {results[-1]['dtype']:8s}: qforge {seconds['qforge']:.3f} s, "
              f"bitsandbytes {seconds['bitsandbytes']:.3f} s, x{results[-1]['speedup']:.2f}, bit-exact {exact}")
    return results


def per_shape(gen, reps):
    rows = []
    for name, (rows_, cols) in SHAPES.items():
        for dtype in SHAPE_DTYPES:
            packed, state = quantized(rows_, cols, dtype, gen)
            out = torch.empty(state.shape, dtype=dtype, device="cuda")
            ref = torch.empty_like(out)
            qf = lambda: nf4.dequantize(packed, state, out=out)  # noqa: E731
            bnb = lambda: bnb_F.dequantize_4bit(packed, state, out=ref)  # noqa: E731
            qf_call, bnb_call = event_time(qf, reps), event_time(bnb, reps)
            qf_ms, bnb_ms = graph_time(qf, 20) or qf_call, graph_time(bnb, 20) or bnb_call
            exact = torch.equal(bits(out), bits(ref))
            n = out.numel()
            moved = n // 2 + n * out.element_size() + state.absmax.numel()  # codes + output + 8-bit absmax
            copy_bps = copy_bandwidth(moved // 2)  # copying half the bytes reads+writes the same amount
            row = dict(name=name, shape=[rows_, cols], dtype=str(dtype).removeprefix("torch."),
                       output_mib=n * out.element_size() / 2**20, bytes_moved=moved,
                       qforge_us=qf_ms * 1e3, bitsandbytes_us=bnb_ms * 1e3, speedup=bnb_ms / qf_ms,
                       qforge_call_us=qf_call * 1e3, bitsandbytes_call_us=bnb_call * 1e3,
                       copy_gbps=copy_bps / 1e9,
                       qforge_copy_fraction=moved / (qf_ms * 1e-3) / copy_bps,
                       bitsandbytes_copy_fraction=moved / (bnb_ms * 1e-3) / copy_bps, bit_exact=exact)
            rows.append(row)
            print(f"{name:24s} {row['dtype']:8s} {rows_:5d}x{cols:5d}: kernel qforge {row['qforge_us']:7.1f} us "
                  f"({row['qforge_copy_fraction']:.2f} of copy), bnb {row['bitsandbytes_us']:7.1f} us "
                  f"({row['bitsandbytes_copy_fraction']:.2f}), x{row['speedup']:.2f}; per eager call "
                  f"{row['qforge_call_us']:.1f} vs {row['bitsandbytes_call_us']:.1f} us; exact {exact}")
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["dtype"] == "bfloat16"]
    labels = [f"{r['name']}\n{r['shape'][0]}x{r['shape'][1]}" for r in sel]
    x = range(len(sel))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.bar([i - 0.2 for i in x], [r["qforge_copy_fraction"] for r in sel], 0.4, label="qforge (1 kernel)")
    ax.bar([i + 0.2 for i in x], [r["bitsandbytes_copy_fraction"] for r in sel], 0.4, label="bitsandbytes (3 kernels)")
    ax.axhline(0.85, color="gray", ls="--", lw=1, label="target 0.85")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("fraction of device-to-device copy bandwidth")
    ax.set_title(f"NF4 double dequant to bf16, {torch.cuda.get_device_name()}")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--out", default="bench/results/nf4_dequant.json")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    harness_rows = harness(args.iters, gen)
    shape_rows = per_shape(gen, args.reps)
    qf = sum(r["qforge_s"] for r in harness_rows)
    bnb = sum(r["bitsandbytes_s"] for r in harness_rows)
    large = [r["qforge_copy_fraction"] for r in shape_rows if r["output_mib"] >= 64]
    result = dict(
        **environment(["bitsandbytes"]),
        harness_speedup_vs_bitsandbytes=bnb / qf,
        harness_seconds=dict(qforge=qf, bitsandbytes=bnb),
        min_copy_fraction_large=min(large),
        bit_exact=all(r["bit_exact"] for r in harness_rows + shape_rows),
        harness=harness_rows,
        shapes=shape_rows,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(shape_rows, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k not in ("harness", "shapes")}, indent=2))


if __name__ == "__main__":
    main()
