"""Multi-GPU QLoRA with FSDP2 (issue 10): Llama-3.1 shapes with random weights
(nothing downloaded), LoRA r=16 on all 7 projections, gradient checkpointing,
bf16 autocast with fp32 LoRA masters, qforge's fused linear + cross-entropy.

One configuration per process group:

    python bench/fsdp2.py --name 8b_1gpu --grad-accum 2 --steps 60 --out DIR
    torchrun --nproc-per-node 2 bench/fsdp2.py --name 8b_2gpu --grad-accum 1 --steps 60 --out DIR
    torchrun --nproc-per-node 2 bench/fsdp2.py --name 70b_offload --model 70b --offload --steps 4 --out DIR
    python bench/fsdp2.py --combine DIR --write bench/results/fsdp2.json

Every rank builds the model on the meta device and materialises, quantizes and
shards one decoder layer at a time (each layer's weights drawn from a generator
seeded by the layer's index, so every world size trains the same model); no
rank ever holds the whole model. The same global batch is used on every world
size: step s takes micro-batches s*A*W .. s*A*W + A*W - 1 of a fixed synthetic
corpus (random 64-token phrases repeated to the sequence length, so that the
loss can fall), rank r taking every W-th one.

MFU counts model FLOPs per token as 4 x (frozen matmul parameters, lm_head
included: forward + input gradient) + 6 x (LoRA parameters) + 6 x layers x seq x
hidden (causal attention, forward + backward), without the recomputation of
gradient checkpointing, against 989 TFLOP/s (H200 SXM dense bf16, datasheet).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
from _record import environment  # bench/ is sys.path[0] when a bench runs
from fsdp2_profile import STEP as PROFILED_STEP

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
PEAK_FLOPS = 989e12
PHRASE = 64
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class CollectiveBytes:
    """Bytes this rank receives through all-gathers and reduce-scatters (the
    output of each call), counted by wrapping torch.distributed's functions
    that FSDP2 calls (their names differ between torch versions)."""

    NAMES = {"all_gather_into_tensor": "all_gather", "all_gather_single": "all_gather",
             "_all_gather_base": "all_gather", "reduce_scatter_tensor": "reduce_scatter",
             "reduce_scatter_single": "reduce_scatter", "_reduce_scatter_base": "reduce_scatter"}

    def __init__(self):
        self.bytes = {"all_gather": 0, "reduce_scatter": 0}
        self.calls = {"all_gather": 0, "reduce_scatter": 0}
        self._saved = {}

    def __enter__(self):
        import torch.distributed as dist

        for name, kind in self.NAMES.items():
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._saved[name] = fn

            def counted(*args, _fn=fn, _kind=kind, **kwargs):
                out = kwargs.get("output_tensor", kwargs.get("output", args[0] if args else None))
                if isinstance(out, torch.Tensor):
                    self.bytes[_kind] += out.numel() * out.element_size()
                    self.calls[_kind] += 1
                return _fn(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        return False

    def take(self) -> tuple[dict, dict]:
        out = dict(self.bytes), dict(self.calls)
        self.bytes = dict.fromkeys(self.bytes, 0)
        self.calls = dict.fromkeys(self.calls, 0)
        return out


def meta_llama(shape: str, layers: int | None):
    """A bf16 LlamaForCausalLM of the named shape on the meta device, and its config."""
    import transformers

    cfg = transformers.LlamaConfig(**{**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})},
                                   max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
                                   use_cache=False)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16), cfg


def materialise(module, device, seed: int, index: int) -> None:
    """Allocate a meta module's weights on `device`: norms 1, the rest N(0, 0.02)
    drawn from a generator seeded by (seed, index), the same on every rank."""
    module.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed * 100003 + index)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)


ROOT_INDEX = 10**6  # seeds of the embeddings, final norm and lm_head follow the layers'


def materialise_root(model, cfg, device, seed: int) -> None:
    for index, module in ((0, model.model.embed_tokens), (ROOT_INDEX, model.model.norm),
                          (ROOT_INDEX + 1, model.lm_head)):
        materialise(module, device, seed, index)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg).to(device)  # built on meta: rebuild


def build_model(shape: str, layers: int | None, device, ctx, offload: bool, lora_r: int, seed: int = 0,
                reshard: bool = True, prefetch: int = 1, fused: bool = False):
    from qforge import decoder, distributed, hf
    from qforge.nn import DEFAULT_TARGETS, LoraConfig, NF4Linear, replace_linears

    model, cfg = meta_llama(shape, layers)
    lora_gen = torch.Generator().manual_seed(seed + 1)
    for i, layer in enumerate(model.model.layers):
        materialise(layer, device, seed, i + 1)
        replace_linears(layer)
        for name, m in layer.named_modules():
            if isinstance(m, NF4Linear):
                m.add_lora(lora_r, float(lora_r), generator=lora_gen)
                with torch.no_grad():  # a non-zero B (as after some training), so every layer gets gradients
                    m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=lora_gen) * 1e-3)
        if ctx is not None:  # this rank keeps its shard of the layer, the rest is freed
            distributed.shard_module(layer, ctx, offload, reshard_after_forward=reshard)
    materialise_root(model, cfg, device, seed)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_A." in n or ".lora_B." in n)
    model.qforge_lora = LoraConfig(r=lora_r, lora_alpha=float(lora_r), lora_dropout=0.0,
                                   target_modules=sorted(DEFAULT_TARGETS), use_rslora=False)
    hf.patch_causal_lm(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if fused:  # qforge train's fused layers (--fused-layers, its default activation settings)
        status = decoder.enable(model, offload=False, tile_tokens=None)
        if status.fused < status.layers:
            raise RuntimeError(f"--fused-layers: {status}")
    if ctx is not None:
        distributed.shard_root(model, ctx, offload)
        distributed.set_prefetch(list(model.model.layers), prefetch)
    model.train()
    return model, cfg


def build_bf16_model(shape: str, layers: int | None, device, ctx, lora_r: int, seed: int = 0):
    """The same model with frozen bf16 projections (peft LoRA, fp32 adapter
    masters) under FSDP2 with a bf16 MixedPrecisionPolicy, as accelerate runs a
    16-bit LoRA job: the reference of the all-gather traffic."""
    model, cfg = meta_llama(shape, layers)
    for i, layer in enumerate(model.model.layers):
        materialise(layer, device, seed, i + 1)
    materialise_root(model, cfg, device, seed)
    return peft_fsdp2(model, ctx, lora_r), cfg


def peft_fsdp2(model, ctx, lora_r: int):
    """A peft LoRA adapter on all 7 projections, gradient checkpointing, and FSDP2
    per decoder layer + root with bf16 mixed precision, as accelerate's FSDP2
    plugin applies it (fsdp_version 2, auto_wrap on LlamaDecoderLayer)."""
    import peft

    model = peft.get_peft_model(model, peft.LoraConfig(r=lora_r, lora_alpha=lora_r, task_type="CAUSAL_LM",
                                                       target_modules=list(LORA_TARGETS)))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    if ctx is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=ctx.mesh, mp_policy=mp)
        fully_shard(model, mesh=ctx.mesh, mp_policy=mp)
    model.train()
    return model


def build_peft_bnb_model(shape: str, layers: int | None, device, ctx, lora_r: int, seed: int = 0):
    """The ecosystem's way, for comparison: transformers' Llama with bitsandbytes
    Linear4bit layers (NF4, double quant, quant_storage=bfloat16 so FSDP can
    flatten them), then ``peft_fsdp2`` (peft LoRA, FSDP2 as accelerate applies it)."""
    import bitsandbytes as bnb

    model, cfg = meta_llama(shape, layers)
    for i, layer in enumerate(model.model.layers):
        materialise(layer, device, seed, i + 1)
        for name, m in list(layer.named_modules()):
            if name.rsplit(".", 1)[-1] in LORA_TARGETS:
                q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4", quant_storage=torch.bfloat16,
                                      device="meta")
                q.weight = bnb.nn.Params4bit(m.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", quant_storage=torch.bfloat16).to(device)
                parent, _, leaf = name.rpartition(".")
                setattr(layer.get_submodule(parent), leaf, q)
    materialise_root(model, cfg, device, seed)
    model.is_loaded_in_4bit = True
    return peft_fsdp2(model, ctx, lora_r), cfg


def micro_batch(index: int, batch: int, seq: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + index)
    phrase = torch.randint(0, min(vocab, 32000), (batch, PHRASE), generator=g)
    return phrase.repeat(1, -(-seq // PHRASE))[:, :seq].contiguous()


def flops_per_token(model, cfg, seq: int) -> float:
    from qforge.nn import NF4Linear

    frozen = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    frozen += cfg.vocab_size * cfg.hidden_size  # lm_head
    lora = sum(m.r * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, NF4Linear))
    return 4 * frozen + 6 * lora + 6 * cfg.num_hidden_layers * seq * cfg.hidden_size


def run(a) -> dict:
    from qforge import distributed

    cuda = torch.cuda.is_available()
    ctx = distributed.init_from_env("cuda" if cuda else "cpu", timeout_s=300)
    world, rank = (ctx.world, ctx.rank) if ctx else (1, 0)
    device = ctx.device if ctx else torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    if a.stack == "peft_bnb":
        model, cfg = build_peft_bnb_model(a.model, a.layers, device, ctx, a.lora_r)
        fpt = float("nan")
    elif a.stack == "bf16":
        model, cfg = build_bf16_model(a.model, a.layers, device, ctx, a.lora_r)
        fpt = float("nan")
    else:
        model, cfg = build_model(a.model, a.layers, device, ctx, a.offload, a.lora_r, reshard=not a.keep_gathered,
                                 prefetch=a.prefetch, fused=a.fused_layers)
        fpt = flops_per_token(model, cfg, a.seq)
    sync()
    build_s = time.perf_counter() - t0
    build_peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0
    build_host_peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    accum = a.grad_accum * world
    losses, times, tokens = [], [], 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    peak_gib = (lambda: torch.cuda.max_memory_allocated(device) / 2**30) if cuda else (lambda: 0.0)
    deadline = time.perf_counter() + a.max_seconds
    counter = CollectiveBytes().__enter__() if ctx else None
    step_bytes = []
    profiler = None
    for step in range(a.steps):
        if a.profile and step == a.warmup:
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                          torch.profiler.ProfilerActivity.CUDA])
            profiler.__enter__()
        sync()
        if counter:
            counter.take()  # what the step before sent, and anything in between
        # the annotation fsdp2_profile.summarise finds each profiled step by
        mark = torch.profiler.record_function(PROFILED_STEP) if profiler is not None else contextlib.nullcontext()
        mark.__enter__()
        t = time.perf_counter()
        n_items = accum * a.batch * (a.seq - 1)
        loss_sum = torch.zeros((), device=device)
        for k in range(a.grad_accum):
            ids = micro_batch(step * accum + k * world + rank, a.batch, a.seq, cfg.vocab_size).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                out = model(input_ids=ids, labels=ids, num_items_in_batch=n_items, use_cache=False)
            (out.loss * world).backward()
            loss_sum += out.loss.detach()
        if ctx:
            torch.distributed.all_reduce(loss_sum)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        mark.__exit__(None, None, None)
        times.append(time.perf_counter() - t)
        if counter:
            step_bytes.append(counter.take())
        if profiler is not None:
            profiler.step()
        losses.append(float(loss_sum))
        tokens = accum * a.batch * a.seq
        if rank == 0:
            print(f"[{a.name}] step {step + 1} loss {losses[-1]:.5f} {times[-1]:.3f}s "
                  f"mem {peak_gib():.2f}GiB", flush=True)
        if profiler is not None and step + 1 >= a.warmup + a.profile:
            profiler.__exit__(None, None, None)
            write_profile(profiler, a, rank)
            profiler = None
        if time.perf_counter() > deadline:
            if rank == 0:
                print(f"[{a.name}] stopping after {step + 1} steps: --max-seconds {a.max_seconds}", flush=True)
            break
    if counter:
        counter.__exit__(None, None, None)
    timed = times[a.warmup:] if len(times) > a.warmup else times[-1:]
    step_s = sum(timed) / len(timed)
    peak = peak_gib()
    peaks = ctx.gather(peak) if ctx else [peak]
    tps = tokens / step_s
    result = {"stack": a.stack, "world_size": world, "model": a.model, "layers": cfg.num_hidden_layers, "seq": a.seq,
              "batch_per_gpu": a.batch, "grad_accum": a.grad_accum, "offload": a.offload, "lora_r": a.lora_r,
              "reshard_after_forward": not a.keep_gathered, "fused_layers": a.fused_layers,
              "steps": len(losses), "timed_steps": len(timed), "step_s": round(step_s, 4),
              "tokens_per_s": round(tps, 1), "tokens_per_s_per_gpu": round(tps / world, 1),
              "mfu": round(tps * fpt / (PEAK_FLOPS * world), 4) if fpt == fpt else None,
              "flops_per_token": fpt if fpt == fpt else None,
              "peak_gib_per_rank": [round(p, 3) for p in peaks], "build_s": round(build_s, 1),
              "build_peak_gib_per_rank": [round(p, 3) for p in (ctx.gather(build_peak_gib) if ctx else
                                                                 [build_peak_gib])],
              "build_host_peak_gib_per_rank": [round(p, 3) for p in (ctx.gather(build_host_peak_gib) if ctx else
                                                                      [build_host_peak_gib])],
              "losses": losses}
    if step_bytes:  # the last timed step's traffic (every step moves the same tensors)
        (nbytes, calls) = step_bytes[-1]
        result["collective_bytes_per_step_per_rank"] = nbytes
        result["collective_calls_per_step"] = calls
    if rank == 0:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / f"{a.name}.json").write_text(json.dumps(result, indent=1))
    if ctx:
        ctx.close()
    return result


def write_profile(profiler, a, rank: int) -> None:
    """This rank's summary of the profiled steps (fsdp2_profile.summarise) under
    --out, and rank 0's Chrome trace, gzipped."""
    import gzip
    import tempfile

    from fsdp2_profile import summarise_file

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        profiler.export_chrome_trace(str(trace))
        summary = summarise_file(trace)
        (out / f"{a.name}.profile{rank}.txt").write_text(json.dumps(summary, indent=1))
        if rank == 0:
            with open(trace, "rb") as f, gzip.open(out / f"{a.name}.trace.json.gz", "wb") as g:
                g.write(f.read())
    if rank == 0:
        print(f"[{a.name}] profile: " + json.dumps({k: summary.get(k) for k in (
            "step_ms", "gpu_span_ms", "compute_busy_ms", "comm_busy_ms", "comm_exposed_ms", "gpu_idle_ms",
            "compute_gaps", "nccl_per_step")}), flush=True)


def combine(src: Path, dst: Path) -> None:
    parts = {p.stem: json.loads(p.read_text()) for p in sorted(src.glob("*.json"))
             if p.stem not in ("versions", "profile_2gpu")}
    configs = {k: v for k, v in parts.items() if not k.startswith(("70b", "peft_bnb"))}
    out = {**environment(["transformers", "peft", "accelerate", "bitsandbytes"]), "configs": configs}
    if (src / "profile_2gpu.json").exists():  # where the time of a 2-GPU step went (run_fsdp2_profile.sh)
        out["profile_2gpu"] = json.loads((src / "profile_2gpu.json").read_text())
    if (src / "versions.json").exists():  # what run_fsdp2_gpu.sh recorded on the GPU machine itself
        recorded = json.loads((src / "versions.json").read_text())
        out["device"] = recorded.pop("device", out["device"])
        out["versions"] = recorded or out["versions"]
    one, two = parts.get("8b_1gpu"), parts.get("8b_2gpu")
    if one and two:
        # each 2-GPU configuration against one GPU with the same layers (fused or checkpointed)
        one_gpu = {False: one, True: parts.get("8b_1gpu_fused")}
        qforge_2gpu = {k: v for k, v in configs.items() if k.startswith("8b_2gpu") and v["stack"] == "qforge"
                       and one_gpu[v.get("fused_layers", False)]}
        out["scaling_2gpu_by_config"] = {
            k: round(v["tokens_per_s"] / one_gpu[v.get("fused_layers", False)]["tokens_per_s"], 3)
            for k, v in qforge_2gpu.items()}
        best = max(qforge_2gpu, key=lambda k: qforge_2gpu[k]["tokens_per_s"])
        out["scaling_2gpu"], out["scaling_2gpu_config"] = out["scaling_2gpu_by_config"][best], best
        n = min(len(one["losses"]), len(two["losses"]))
        rel = [abs(x - y) / abs(x) for x, y in zip(one["losses"][:n], two["losses"][:n])]
        out["loss_steps_compared"] = n
        out["loss_max_rel_diff_vs_1gpu"] = max(rel)
        out["loss_mean_rel_diff_vs_1gpu"] = sum(rel) / n
    bf16 = parts.get("8b_2gpu_bf16", {}).get("collective_bytes_per_step_per_rank")
    if bf16:  # same sharding policy as the bf16 run: layers resharded after forward, root kept
        for key, name in (("allgather_bytes_ratio_vs_bf16", "8b_2gpu"),
                          ("allgather_bytes_ratio_vs_bf16_keep_gathered", "8b_2gpu_keep_gathered")):
            mine = parts.get(name, {}).get("collective_bytes_per_step_per_rank")
            if mine:
                out[key] = round(mine["all_gather"] / bf16["all_gather"], 4)
        out["allgather_bytes_per_step_per_rank"] = {
            k: parts[k]["collective_bytes_per_step_per_rank"]["all_gather"]
            for k in ("8b_2gpu", "8b_2gpu_keep_gathered", "8b_2gpu_bf16")
            if "collective_bytes_per_step_per_rank" in parts.get(k, {})}
    out["llama70b"] = {"offload": parts.get("70b_offload", {"error": "not run"}),
                       "no_offload": parts.get("70b_no_offload", {"error": "not run"})}
    err = src / "peft_bitsandbytes_fsdp2.txt"
    out["peft_bitsandbytes_fsdp2"] = parts.get("peft_bnb_2gpu") or {
        "error": err.read_text().strip()[-4000:] if err.exists() else "not run"}
    out["notes"] = ("random weights (std 0.02) and a synthetic corpus: the loss stays near ln(vocab) = 11.76, so "
                    "the 1-vs-2-GPU comparison tests equality of the computation, not learning; tokens_per_s "
                    "excludes the first --warmup steps; mfu counts 4 x frozen matmul params + 6 x LoRA params + "
                    "causal attention per token, without recomputation, against 989 TFLOP/s per GPU; "
                    "peak_gib_per_rank is torch.cuda.max_memory_allocated")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "configs"}, indent=1)[:3000])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="run")
    p.add_argument("--model", choices=sorted(SHAPES), default="8b")
    p.add_argument("--layers", type=int, help="override the number of decoder layers")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2, help="sequences per GPU per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    p.add_argument("--max-seconds", type=float, default=240, help="stop after the step that passes this")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--offload", action="store_true")
    p.add_argument("--keep-gathered", action="store_true",
                   help="reshard_after_forward=False for the decoder layers (no re-gather in backward)")
    p.add_argument("--fused-layers", action="store_true",
                   help="qforge.decoder's fused layers (hand-written backward) instead of checkpointed recompute")
    p.add_argument("--stack", choices=("qforge", "peft_bnb", "bf16"), default="qforge",
                   help="peft_bnb: transformers + peft + bitsandbytes under FSDP2, for comparison; bf16: frozen "
                        "bf16 projections + peft LoRA under FSDP2 (the all-gather traffic reference)")
    p.add_argument("--prefetch", type=int, default=1,
                   help="layers whose all-gathers are issued ahead (distributed.set_prefetch; 0: FSDP2's default)")
    p.add_argument("--profile", type=int, default=0,
                   help="profile this many steps after --warmup; a summary per rank (+ rank 0's trace) in --out")
    p.add_argument("--out", default="bench/results/fsdp2-parts")
    p.add_argument("--combine", help="merge the per-configuration JSON files of this directory")
    p.add_argument("--write", default="bench/results/fsdp2.json")
    a = p.parse_args()
    if a.combine:
        combine(Path(a.combine), Path(a.write))
    elif a.stack == "peft_bnb":  # record exactly why it fails, if it does
        try:
            run(a)
        except Exception as e:  # noqa: BLE001 - the failure is the measurement
            import traceback

            if int(os.environ.get("RANK", "0")) == 0:
                frames = traceback.extract_tb(e.__traceback__)[-3:]
                where = "; ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames)
                Path(a.out).mkdir(parents=True, exist_ok=True)
                (Path(a.out) / "peft_bitsandbytes_fsdp2.txt").write_text(
                    f"{type(e).__name__}: {e} (at {where}); fails in the first forward after fully_shard: FSDP2 "
                    "re-wraps each bitsandbytes Params4bit as a plain DTensor, so the Linear4bit layers lose "
                    "their quant_state")
            raise
    else:
        run(a)


if __name__ == "__main__":
    sys.exit(main())
