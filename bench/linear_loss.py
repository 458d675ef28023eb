"""Linear + cross-entropy forward+backward, side by side in one process.

impls: qforge (fused C++/CUDA), qforge_generic (chunked_linear + F.cross_entropy),
torch_eager, torch_compile, liger (Liger-Kernel fused linear CE), cce (Apple
Cut Cross-Entropy); plus qforge_chunk2g (the fused path with a 2 GiB chunk
budget instead of the default 512 MiB workspace), and a chunk-size sweep.

Per (N, D, V, impl): median fwd+bwd time over `--reps` runs (CUDA events),
peak memory beyond inputs and the two gradient buffers, and the loss /
grad_hidden / grad_weight relative errors against an fp32 reference (fp32
inputs upcast from the same bf16 values, fp32 matmuls with TF32 off).
floor_ms = 6*N*D*V at the bf16 matmul rate measured here (8192^3);
gemm3_ms = the three GEMMs of the shape (h@W^T, dL@W, dL^T@h) through torch.

    python bench/linear_loss.py --out bench/results/linear_loss.json
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from _record import environment

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

SHAPES = [(8192, 4096, 128256), (16384, 4096, 128256), (8192, 2304, 256000)]
GIB = 1 << 30


def eager_ce(h, w, y):
    return F.cross_entropy((h @ w.T).float(), y)


def make_impls(names):
    impls = {}
    import qforge.loss as ql
    if "qforge" in names:
        impls["qforge"] = lambda h, w, y: ql.linear_cross_entropy(h, w, y)
    if "qforge_chunk2g" in names:
        def big(h, w, y):
            c = ql.auto_chunk_size(h.shape[0], h.shape[1], w.shape[0], h.dtype, h.device, budget_bytes=2 * GIB)
            return ql.linear_cross_entropy(h, w, y, chunk_size=c)
        impls["qforge_chunk2g"] = big
    if "qforge_generic" in names:
        impls["qforge_generic"] = lambda h, w, y: ql.chunked_linear(h, w, y, eager_ce)
    if "torch_eager" in names:
        impls["torch_eager"] = eager_ce
    if "torch_compile" in names:
        impls["torch_compile"] = torch.compile(eager_ce)
    if "liger" in names:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            liger = LigerFusedLinearCrossEntropyLoss()
            impls["liger"] = lambda h, w, y: liger(w, h, y)
        except Exception as e:  # noqa: BLE001
            impls["liger"] = e
    if "cce" in names:
        try:
            from cut_cross_entropy import linear_cross_entropy as cce
            impls["cce"] = lambda h, w, y: cce(h, w, y)
        except Exception as e:  # noqa: BLE001
            impls["cce"] = e
    return impls


def timed(fn, reps):
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts), ts


def matmul_tflops(reps=20):
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    ms, _ = timed(lambda: a @ b, reps)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def gemm3_ms(n, d, v, reps=5):
    h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(v, d, device="cuda", dtype=torch.bfloat16)
    dl = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(n, v, device="cuda", dtype=torch.bfloat16)

    def run():
        torch.mm(h, w.T, out=out)
        dl @ w
        dl.T @ h

    run()
    torch.cuda.synchronize()
    ms, _ = timed(run, reps)
    del h, w, dl, out
    return ms


def reference(h, w, y, chunk=2048):
    """fp32 loss and gradients (TF32 off), chunked over tokens to bound memory."""
    h32 = h.float()
    w32 = w.float().requires_grad_()
    gh = torch.empty_like(h32)
    nvalid = (y != -100).sum()
    total = torch.zeros((), device=h.device, dtype=torch.float64)
    for s in range(0, h.shape[0], chunk):
        hc = h32[s:s + chunk].clone().requires_grad_()
        loss = F.cross_entropy(hc @ w32.T, y[s:s + chunk], reduction="sum") / nvalid
        loss.backward()
        gh[s:s + chunk] = hc.grad
        total += loss.detach().double()
    return total.float(), gh, w32.grad


def rel(a, r):
    return ((a.float() - r.float()).norm() / r.float().norm()).item()


def run_case(name, fn, n, d, v, ref, reps, h0, w0, y):
    h = h0.clone().requires_grad_()
    w = w0.clone().requires_grad_()
    grad_bytes = (h.numel() + w.numel()) * h.element_size()

    def step():
        h.grad = None
        w.grad = None
        loss = fn(h, w, y)
        loss.backward()
        return loss

    step()  # warm-up (compilation, autotuning, handles)
    step()
    torch.cuda.synchronize()
    ms, all_ms = timed(step, reps)
    h.grad = None
    w.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = step()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base - grad_bytes) / GIB
    out = dict(ms=ms, all_ms=all_ms, extra_peak_gib=extra,
               loss=float(loss.item()), loss_rel_err=abs(loss.item() - ref[0].item()) / abs(ref[0].item()),
               grad_rel_err=rel(h.grad, ref[1]), grad_weight_rel_err=rel(w.grad, ref[2]))
    del h, w, loss
    return out


def profile_qforge(fn, h0, w0, y):
    from torch.profiler import ProfilerActivity, profile
    h = h0.clone().requires_grad_()
    w = w0.clone().requires_grad_()
    fn(h, w, y).backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        h.grad = w.grad = None
        fn(h, w, y).backward()
        torch.cuda.synchronize()
    # GPU idle time inside the step: the union of kernel intervals vs their span
    ivs = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                 if str(getattr(e, "device_type", "")).endswith("CUDA") and e.time_range.end > e.time_range.start)
    gaps = []
    if ivs:
        busy, (cs, ce, cn) = 0.0, ivs[0]
        for st, en, nm in ivs[1:]:
            if st > ce:
                gaps.append((st - ce, cn[:40], nm[:40]))
                busy += ce - cs
                cs, ce, cn = st, en, nm
            elif en > ce:
                ce, cn = en, nm
        busy += ce - cs
        span = ivs[-1][1] - ivs[0][0]
        gaps.sort(reverse=True)
        print(f"    GPU busy {busy / 1e3:.2f} ms of a {span / 1e3:.2f} ms span; largest gaps (us): "
              + "; ".join(f"{g:.0f} after {a} before {b}" for g, a, b in gaps[:4]), flush=True)
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            rows.append((t / 1e3, e.count, e.key[:90]))
    rows.sort(reverse=True)
    return rows[:12]


def save(result, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/linear_loss.json")
    ap.add_argument("--impls", default="qforge,qforge_chunk2g,qforge_generic,torch_eager,torch_compile,liger,cce")
    ap.add_argument("--sweep", default="1024,1664,2048,4096", help="qforge chunk sizes at N=16384")
    ap.add_argument("--shapes", default=None, help="N,D,V;N,D,V")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    shapes = SHAPES if not args.shapes else [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    names = args.impls.split(",")
    result = dict(**environment(["triton", "transformers", "liger_kernel", "cut_cross_entropy"]), dtype="bfloat16", labels="uniform random, none ignored",
                  timing=f"median of {args.reps} fwd+bwd runs after 2 warm-ups, CUDA events",
                  memory="peak allocated during one fwd+bwd minus (inputs + grad_hidden + grad_weight in input dtype)",
                  errors="relative L2 error vs fp32 reference (fp32 upcast of the same bf16 inputs, TF32 off)",
                  cases=[], gemm3=[], profile_qforge=None)
    tf = matmul_tflops()
    result["gemm_tflops"] = tf
    print(f"bf16 matmul 8192^3: {tf:.0f} TFLOP/s", flush=True)
    impls = make_impls(names)
    for (n, d, v) in shapes:
        g = torch.Generator(device="cuda").manual_seed(n + d + v)
        h0 = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, generator=g)
        w0 = (torch.randn(v, d, device="cuda", dtype=torch.bfloat16, generator=g) / math.sqrt(d)).to(torch.bfloat16)
        y = torch.randint(0, v, (n,), device="cuda", generator=g)
        floor = 6 * n * d * v / (tf * 1e12) * 1e3
        g3 = gemm3_ms(n, d, v)
        result["gemm3"].append(dict(N=n, D=d, V=v, gemm3_ms=g3, floor_ms=floor))
        print(f"\n(N, D, V) = ({n}, {d}, {v}): floor {floor:.1f} ms, three torch GEMMs {g3:.1f} ms", flush=True)
        ref = reference(h0, w0, y)
        bf16_floor = rel(ref[1].bfloat16(), ref[1])
        print(f"  bf16 rounding of the fp32 grad_hidden alone: rel err {bf16_floor:.2e}", flush=True)
        for name in names:
            fn = impls.get(name)
            case = dict(N=n, D=d, V=v, impl=name, floor_ms=floor, gemm3_ms=g3, grad_bf16_rounding_floor=bf16_floor)
            if isinstance(fn, Exception) or fn is None:
                case["error"] = f"unavailable: {fn!r}"
            else:
                try:
                    case.update(run_case(name, fn, n, d, v, ref, args.reps, h0, w0, y))
                    case["ratio_to_floor"] = case["ms"] / floor
                    case["ratio_to_gemm3"] = case["ms"] / g3
                except Exception as e:  # noqa: BLE001
                    case["error"] = f"{type(e).__name__}: {e}"[:500]
                    traceback.print_exc()
            result["cases"].append(case)
            save(result, args.out)  # incremental: a run cut short keeps what it measured
            if "ms" in case:
                print(f"  {name:15s} {case['ms']:8.1f} ms  x{case['ratio_to_floor']:.3f} floor  "
                      f"x{case['ratio_to_gemm3']:.3f} gemm3  extra {case['extra_peak_gib']:6.2f} GiB  "
                      f"loss err {case['loss_rel_err']:.1e}  gh err {case['grad_rel_err']:.2e}  "
                      f"gw err {case['grad_weight_rel_err']:.2e}", flush=True)
            else:
                print(f"  {name:15s} {case['error'][:150]}", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
        if (n, d, v) == (16384, 4096, 128256) and args.sweep:
            import qforge.loss as ql
            result["chunk_sweep"] = []
            for c in [int(x) for x in args.sweep.split(",")]:
                try:
                    r = run_case(f"qforge_chunk{c}", lambda h, w, y, c=c: ql.linear_cross_entropy(h, w, y, chunk_size=c),
                                 n, d, v, ref, args.reps, h0, w0, y)
                    r.update(chunk=c, ratio_to_floor=r["ms"] / floor)
                    result["chunk_sweep"].append(r)
                    print(f"  chunk {c:5d}: {r['ms']:7.1f} ms x{r['ratio_to_floor']:.3f} floor, extra {r['extra_peak_gib']:.2f} GiB", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"  chunk {c}: {e}")
                gc.collect()
                torch.cuda.empty_cache()
            save(result, args.out)
        if (n, d, v) == (16384, 4096, 128256) and "qforge" in impls:
            try:
                rows = profile_qforge(impls["qforge"], h0, w0, y)
                result["profile_qforge"] = [dict(ms=r[0], calls=r[1], kernel=r[2]) for r in rows]
                for r in rows:
                    print(f"    {r[0]:8.2f} ms  {r[1]:4d}x  {r[2]}")
            except Exception as e:  # noqa: BLE001
                result["profile_qforge"] = f"{type(e).__name__}: {e}"
        del h0, w0, y, ref
        gc.collect()
        torch.cuda.empty_cache()
    save(result, args.out)
    print("\nsummary (ms, x floor, extra GiB, grad_hidden rel err)")
    for c in result["cases"]:
        if "ms" in c:
            print(f"{c['N']:6d} {c['D']:5d} {c['V']:6d} {c['impl']:15s} {c['ms']:7.1f} "
                  f"x{c['ratio_to_floor']:.2f} {c['extra_peak_gib']:6.2f} {c['grad_rel_err']:.1e}")
        else:
            print(f"{c['N']:6d} {c['D']:5d} {c['V']:6d} {c['impl']:15s} ERROR {c['error'][:60]}")


if __name__ == "__main__":
    main()
