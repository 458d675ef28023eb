"""QLoRA training step at Llama-3.1-8B shapes (random weights, nothing downloaded),
side by side in one process on one GPU: qforge against transformers + peft +
bitsandbytes, with the same gradient checkpointing, the same NF4 weights (qforge's
quantizer writes bitsandbytes' bytes), the same LoRA initialisation and the same
batches. Reports tokens/s, peak memory, per-step losses and model FLOPs
utilisation, and writes bench/results/train_step.json.

  python bench/train_step.py [--layers 32] [--seq 2048] [--batch 2] [--rank 16] [--steps 5]

`--impls qforge,qforge_compiled,peft_bitsandbytes` picks what runs; on a machine
without CUDA, `--device cpu --layers 2 --hidden 64 ...` exercises the same code.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import qforge
from qforge import hf
from qforge.nn import DEFAULT_TARGETS, add_lora, lora_parameters, replace_linears


def make_config(a) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
        max_position_embeddings=max(8192, a.seq), rope_theta=500000.0, tie_word_embeddings=False,
        attn_implementation="sdpa", torch_dtype=torch.bfloat16,
    )


def random_model(config, device, seed) -> LlamaForCausalLM:
    """The bf16 model with deterministic random weights (norms at 1), built on `device`."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    with torch.device(device):  # to_empty left the rotary inv_freq buffer uninitialised
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.to(torch.bfloat16)


def lora_a_init(name: str, r: int, in_features: int, seed: int) -> torch.Tensor:
    """PEFT's kaiming-uniform(a=sqrt(5)) draw for lora_A of module `name`, reproducible."""
    gen = torch.Generator().manual_seed(seed + sum(map(ord, name)) * 7919)
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(r, in_features, generator=gen) * 2 - 1) * bound


def build_qforge(config, a, device):
    model = random_model(config, device, a.seed)
    replace_linears(model, DEFAULT_TARGETS)  # C++ quantizer, layer by layer
    add_lora(model, r=a.rank, alpha=2 * a.rank, dropout=0.0, lora_dtype=torch.float32)
    for name, m in model.named_modules():
        if getattr(m, "lora_A", None) is not None:
            m.lora_A.weight.data.copy_(lora_a_init(name, a.rank, m.in_features, a.seed))
    hf.patch_causal_lm(model, mode="fused")  # the loss never builds the tokens x vocab logits
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_peft_bitsandbytes(config, a, device):
    import bitsandbytes as bnb
    import peft

    model = random_model(config, device, a.seed)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in DEFAULT_TARGETS:
            parent = model.get_submodule(name.rpartition(".")[0])
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False, compute_dtype=torch.bfloat16,
                                  compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8, device="meta")
            q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64)
            q.weight = q.weight._quantize(device) if device.type != "cpu" else q.weight._quantize("cpu")
            setattr(parent, name.rpartition(".")[2], q)
            del module
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules=list(DEFAULT_TARGETS),
                          task_type="CAUSAL_LM", bias="none")
    model = peft.get_peft_model(model, cfg)
    for name, m in model.named_modules():
        if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict) and "default" in m.lora_A:
            clean = name.replace("base_model.model.", "", 1)
            m.lora_A["default"].weight.data.copy_(lora_a_init(clean, a.rank, m.in_features, a.seed))
    return model


def batches(a, device):
    gen = torch.Generator().manual_seed(a.seed + 1)
    for _ in range(a.warmup + a.steps):
        ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=gen)
        yield ids.to(device)


def run(name, build, config, a, device):
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    model = build(config, a, device)
    if name == "qforge_compiled":
        for layer in model.model.layers:
            layer.compile(fullgraph=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, fused=device.type == "cuda")
    build_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    losses, times = [], []
    for step, ids in enumerate(batches(a, device)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
        print(f"  {name:18s} step {step}: loss {losses[-1]:.5f}  {times[-1] * 1e3:8.1f} ms", flush=True)
    timed = times[a.warmup:]
    tokens_per_s = a.batch * a.seq * len(timed) / sum(timed)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    n_params = sum(p.numel() for p in random_model_params(config))
    result = dict(tokens_per_s=tokens_per_s, peak_gib=peak, resident_gib=resident, losses=losses,
                  step_ms=[t * 1e3 for t in timed], build_s=build_s,
                  mfu=6 * n_params * tokens_per_s / (a.matmul_tflops * 1e12) if a.matmul_tflops else None,
                  lora_params=sum(p.numel() for p in params))
    del model, opt, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def random_model_params(config):
    with torch.device("meta"):
        return list(LlamaForCausalLM(config).parameters())


def matmul_tflops(device) -> float:
    """bf16 8192^3 matmul rate measured now (the denominator of MFU)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - t) / 1e12


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--impls", default="qforge,qforge_compiled,peft_bitsandbytes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench/results/train_step.json")
    a = ap.parse_args()
    device = torch.device(a.device)
    a.matmul_tflops = matmul_tflops(device) if device.type == "cuda" else None
    config = make_config(a)
    builders = {"qforge": build_qforge, "qforge_compiled": build_qforge, "peft_bitsandbytes": build_peft_bitsandbytes}
    results = {}
    for name in a.impls.split(","):
        print(f"{name}:", flush=True)
        try:
            results[name] = run(name, builders[name], config, a, device)
        except Exception as e:  # keep the others' figures; say what failed
            print(f"  {name} failed: {type(e).__name__}: {e}", flush=True)
            results[name] = dict(error=f"{type(e).__name__}: {e}")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    versions = dict(qforge=qforge.__version__, torch=torch.__version__, cuda=torch.version.cuda,
                    transformers=transformers.__version__, python=platform.python_version())
    for pkg in ("peft", "bitsandbytes"):
        try:
            versions[pkg] = __import__(pkg).__version__
        except ImportError:
            pass
    base = results.get("peft_bitsandbytes")
    summary = {}
    for name, r in results.items():
        if "error" in r:
            summary[name] = r
            continue
        if base and "error" not in base and name != "peft_bitsandbytes":
            r["speedup_vs_peft_bitsandbytes"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["peak_ratio_vs_peft_bitsandbytes"] = r["peak_gib"] / base["peak_gib"] if base["peak_gib"] else None
            r["max_loss_diff_vs_peft_bitsandbytes"] = max(abs(x - y) for x, y in zip(r["losses"], base["losses"]))
        summary[name] = {k: r[k] for k in r if k not in ("losses", "step_ms")}
    out = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        versions=versions, matmul_tflops=a.matmul_tflops,
        config=dict(model="Llama-3.1-8B shapes" if a.layers == 32 and a.hidden == 4096 else "custom",
                    layers=a.layers, hidden=a.hidden, intermediate=a.intermediate, heads=a.heads,
                    kv_heads=a.kv_heads, vocab=a.vocab, seq=a.seq, batch=a.batch,
                    lora=dict(r=a.rank, alpha=2 * a.rank, dropout=0.0, targets=list(DEFAULT_TARGETS)),
                    gradient_checkpointing=True, autocast="bf16", optimizer="AdamW", lr=a.lr,
                    warmup_steps=a.warmup, timed_steps=a.steps),
        **results,
    )
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
