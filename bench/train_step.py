"""QLoRA training step at Llama-3.1-8B shapes (random weights, nothing downloaded) on one
GPU: qforge against transformers + peft + bitsandbytes and against Unsloth, with the same
LoRA (r=16, alpha=32, all 7 projections), bf16 autocast, AdamW and batches. qforge and peft
get the same NF4 weights (qforge's quantizer writes bitsandbytes' bytes) and the same LoRA
initialisation; Unsloth loads a random checkpoint of the same shapes written by the Unsloth
anchor's bench (`bench/unsloth/bench_unsloth.py`), so its losses are of other
weights. Reports tokens/s, peak GPU memory (torch.cuda.max_memory_allocated), peak host
memory, per-step losses and model FLOPs utilisation, and writes bench/results/train_step.json.

  python bench/train_step.py [--layers 32] [--seq 2048] [--batch 2] [--steps 5]
      [--impls qforge,qforge_compiled,peft_bitsandbytes,unsloth]
      [--long-context 131072,262144] [--prompt-heavy]

Every (impl, case) runs in a fresh process under the same allocator setting
(PYTORCH_ALLOC_CONF=expandable_segments:True, which `import unsloth` sets for itself).
Cases: the main one (--seq x --batch, labels = inputs), `--long-context` lengths (batch 1,
--long-warmup + --long-steps steps; a length that fails says whether memory or the time limit
stopped it), `--max-seq-probe IMPLS` (the longest batch-1 length that trains one full step, by
doubling then bisection, a fresh process per attempt), and `--prompt-heavy` (--seq x --batch of packed conversations whose prompts,
about 60% of the tokens, are masked out of the loss).
qforge's settings: `--fused-layers` (decoder layers with a hand-written backward, qforge.decoder),
`--offload` (per-layer checkpoints in pinned host memory), `--tile` (MLPs
and RMSNorms in token tiles; see qforge.offload) and `--attention cudnn` (cuDNN's attention
kernel first; see qforge.attention and bench/sdpa_backends.py). Unsloth needs the offline bundle:
`bash bench/unsloth/make_bundle.sh build-anchor` (then `--unsloth-anchor build-anchor`;
bench/unsloth/README.md says what is in it).
On a machine without CUDA, `--device cpu --layers 2 --hidden 64 ...` exercises the same code.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from _record import NOT_INSTALLED, environment

ALLOC_CONF = "expandable_segments:True"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT_FRACTION = 0.6  # prompt-heavy case: share of each conversation that is prompt (masked)


def make_config(a):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
        max_position_embeddings=max(8192, a.seq), rope_theta=500000.0, tie_word_embeddings=False,
        attn_implementation="sdpa", torch_dtype=torch.bfloat16,
    )


def random_model(config, device, seed):
    """The bf16 model with deterministic random weights (norms at 1), built on `device`."""
    from transformers import LlamaForCausalLM

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


def build_qforge(config, a, device, compiled):
    from qforge import hf, offload
    from qforge.nn import add_lora, replace_linears

    model = random_model(config, device, a.seed)
    replace_linears(model, TARGETS)  # C++ quantizer, layer by layer
    add_lora(model, r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, lora_dtype=torch.float32)
    for name, m in model.named_modules():
        if getattr(m, "lora_A", None) is not None:
            m.lora_A.weight.data.copy_(lora_a_init(name, a.rank, m.in_features, a.seed))
    hf.patch_causal_lm(model, mode="fused")  # the loss never builds the tokens x vocab logits
    model._qforge_fused_status = None
    if compiled:  # transformers' checkpointing: the compiled layer traces with fullgraph=True
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for layer in model.model.layers:
            layer.compile(fullgraph=True)
    elif a.fused_layers != "off":  # decoder layers with a hand-written backward (qforge.decoder)
        from qforge import decoder

        model._qforge_fused_status = decoder.enable(model, offload=a.offload, tile_tokens=a.tile or None)
        if a.fused_layers == "on" and model._qforge_fused_status.fused < model._qforge_fused_status.layers:
            raise RuntimeError(f"--fused-layers on: {model._qforge_fused_status}")
    else:
        offload.enable(model, offload=a.offload, tile_tokens=a.tile or None)
    return model


def build_peft_bitsandbytes(config, a, device):
    import bitsandbytes as bnb
    import peft

    model = random_model(config, device, a.seed)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            parent = model.get_submodule(name.rpartition(".")[0])
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False, compute_dtype=torch.bfloat16,
                                  compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8, device="meta")
            q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64)
            q.weight = q.weight._quantize(device) if device.type != "cpu" else q.weight._quantize("cpu")
            setattr(parent, name.rpartition(".")[2], q)
            del module
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules=list(TARGETS),
                          task_type="CAUSAL_LM", bias="none")
    model = peft.get_peft_model(model, cfg)
    for name, m in model.named_modules():
        if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict) and "default" in m.lora_A:
            clean = name.replace("base_model.model.", "", 1)
            m.lora_A["default"].weight.data.copy_(lora_a_init(clean, a.rank, m.in_features, a.seed))
    return model


def build_unsloth(a):
    """Unsloth's FastLanguageModel on the anchor's random checkpoint, its "unsloth" checkpointing."""
    import unsloth  # noqa: F401  (must come before transformers / peft)
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=a.unsloth_model_dir, max_seq_length=a.seq, dtype=torch.bfloat16, load_in_4bit=True,
        use_gradient_checkpointing="unsloth", local_files_only=True)
    model = FastLanguageModel.get_peft_model(
        model, r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0, target_modules=list(TARGETS), bias="none",
        use_gradient_checkpointing="unsloth", random_state=3407, max_seq_length=a.seq)
    FastLanguageModel.for_training(model)
    return model


def batches(a, device):
    """(input_ids, labels) per step. Prompt-heavy: each row packs conversations of 256..1023
    tokens (fewer on tiny test shapes) whose first PROMPT_FRACTION is prompt, labelled -100
    (attention is not split at the conversation boundaries: the same for every impl, and it does
    not change the work)."""
    gen = torch.Generator().manual_seed(a.seed + 1)
    lo = min(256, max(4, a.seq // 8))
    hi = min(1024, max(lo + 1, a.seq // 2))
    for _ in range(a.warmup + a.steps):
        ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=gen)
        labels = ids.clone()
        if a.prompt_heavy:
            for row in labels:
                start = 0
                while start < a.seq:
                    n = int(torch.randint(lo, hi, (1,), generator=gen))
                    row[start:start + int(n * PROMPT_FRACTION)] = -100
                    start += n
        yield ids.to(device), labels.to(device)


def train_loop(name, model, a, device):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0, fused=device.type == "cuda")
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    losses, times, masked = [], [], []
    result = dict(resident_gib=resident, losses=losses, lora_params=sum(p.numel() for p in params))
    for step, (ids, labels) in enumerate(batches(a, device)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
        masked.append(float((labels == -100).float().mean()))
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
        print(f"  {name:18s} seq {a.seq} x {a.batch} step {step}: loss {losses[-1]:.5f}  "
              f"{times[-1] * 1e3:9.1f} ms  peak {result['peak_gib']:.2f} GiB", flush=True)
    timed = times[a.warmup:] or times
    result.update(tokens_per_s=a.batch * a.seq * len(timed) / sum(timed), step_ms=[t * 1e3 for t in timed],
                  first_step_ms=times[0] * 1e3, masked_fraction=sum(masked) / len(masked))
    return result


def child(a) -> dict:
    """One impl on one case, in this (fresh) process."""
    device = torch.device(a.device)
    t0 = time.perf_counter()
    if a.impl == "unsloth":
        model = build_unsloth(a)  # imports unsloth before transformers
    else:
        import qforge  # noqa: F401
        config = make_config(a)
        torch.manual_seed(a.seed)
        if a.impl == "peft_bitsandbytes":
            model = build_peft_bitsandbytes(config, a, device)
        else:
            model = build_qforge(config, a, device, compiled=a.impl == "qforge_compiled")
    build_s = time.perf_counter() - t0
    if a.impl in ("qforge", "qforge_compiled") and a.attention == "cudnn" and device.type == "cuda":
        from qforge.attention import prefer_cudnn_attention

        with prefer_cudnn_attention():
            result = train_loop(a.impl, model, a, device)
    else:
        result = train_loop(a.impl, model, a, device)
    result["build_s"] = build_s
    if a.impl in ("qforge", "qforge_compiled"):
        result["memory"] = ("transformers checkpointing" if a.impl == "qforge_compiled" else
                            dict(offload=a.offload, tile_tokens=a.tile or None,
                                 attention=a.attention if device.type == "cuda" else "default",
                                 fused_layers=str(getattr(model, "_qforge_fused_status", None) or "off")))
    off = getattr(model, "_qforge_offloader", None)
    if off is not None:
        result["host_bytes_moved"] = off.bytes_to_host + off.bytes_to_device
    result["host_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if a.matmul_tflops:
        n_params = sum(p.numel() for p in _meta_params(make_config(a)))
        result["mfu"] = 6 * n_params * result["tokens_per_s"] / (a.matmul_tflops * 1e12)
    return result


def _meta_params(config):
    from transformers import LlamaForCausalLM

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


# ------------------------------------------------------------------ parent: one process per run
def run_child(a, impl, seq, batch, warmup, steps, prompt_heavy, deadline, unsloth_missing=None) -> dict:
    if impl == "unsloth" and unsloth_missing:
        return dict(error=unsloth_missing, limit="time" if "Timeout" in unsloth_missing else "error")
    out = Path(a.workdir) / f"child_{impl}_{seq}x{batch}{'_ph' if prompt_heavy else ''}.json"
    out.unlink(missing_ok=True)
    argv = [sys.executable, os.path.abspath(__file__), "--_child", impl, "--_child-out", str(out),
            "--seq", str(seq), "--batch", str(batch), "--warmup", str(warmup), "--steps", str(steps),
            "--matmul-tflops", str(a.matmul_tflops or 0)]
    for k in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "rank", "lr", "seed", "device",
              "tile", "attention", "fused_layers", "unsloth_model_dir", "workdir"):
        argv += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    argv += ["--offload" if a.offload else "--no-offload"] + (["--prompt-heavy"] if prompt_heavy else [])
    env = dict(os.environ, PYTORCH_ALLOC_CONF=a.alloc_conf, PYTHONUNBUFFERED="1")
    site = str(Path(a.unsloth_anchor, "site").resolve())
    if impl == "unsloth":
        env["PYTHONPATH"] = os.pathsep.join([site, env.get("PYTHONPATH", "")])
    elif impl == "peft_bitsandbytes" and Path(site).is_dir():  # the bundle's bitsandbytes, where the host has none
        env["PYTHONPATH"] = os.pathsep.join([env.get("PYTHONPATH", ""), site])
    timeout = max(10.0, min(a.child_timeout, deadline - time.time()))
    print(f"{impl} {seq} x {batch}{' prompt-heavy' if prompt_heavy else ''} (timeout {timeout:.0f} s):", flush=True)
    t = time.time()
    try:
        proc = subprocess.run(argv, env=env, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        log, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:
        log, rc = (e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""), "timeout"
    sys.stdout.write("\n".join(line for line in log.splitlines() if "step" in line or "Error" in line) + "\n")
    result = json.loads(out.read_text()) if out.exists() else {}
    if rc != 0 or "error" in result or "tokens_per_s" not in result:
        tail = log.strip().splitlines()[-3:]
        err = result.get("error") or (f"stopped by the {timeout:.0f} s time limit" if rc == "timeout"
                                      else f"exit {rc}: {' | '.join(tail)}")
        oom = "out of memory" in err.lower() or "outofmemory" in err.lower()
        result = dict(result, error=err[-600:], limit="time" if rc == "timeout" else ("memory" if oom else "error"))
    result["wall_s"] = time.time() - t
    return result


def unsloth_model_dir(a, deadline: float) -> str:
    """The anchor's random Llama-3.1-8B-shaped checkpoint (written once per host, in a subprocess
    that ends by the bench's deadline)."""
    script = Path(__file__).resolve().parent / "unsloth" / "bench_unsloth.py"
    if not Path(a.unsloth_anchor, "site").is_dir():
        raise FileNotFoundError(f"{a.unsloth_anchor}/site is missing: build the Unsloth bundle (see this file's doc)")
    model_dir = Path(a.workdir, f"llama31_8b_random_L{a.layers}")
    env = dict(os.environ, PYTHONPATH=str(Path(a.unsloth_anchor, "site").resolve()))
    subprocess.run([sys.executable, str(script), "--_build", "--model-dir", str(model_dir), "--layers", str(a.layers),
                    "--workdir", a.workdir], env=env, check=True, timeout=max(10.0, deadline - time.time()))
    return str(model_dir)


def probe_max_seq(attempt, start: int, limit: int, resolution: int, granularity: int = 256) -> dict:
    """The longest batch-1 length that trains one step: doubles from `start` until an attempt
    fails, then bisects to `resolution` tokens. `attempt(seq)` runs one step (a fresh process)
    and returns None on success or why it failed: "memory" or "time" (the command's time limit).
    A time failure ends the search, since every longer length takes longer still. At most
    log2(limit / start) + log2(limit / resolution) + 2 attempts. Returns {tokens, limit,
    attempts}: tokens is the longest success (None if even `start` failed), limit what stopped
    the next longer length (None when `limit` itself trained)."""
    if not 0 < start <= limit or resolution < 1:
        raise ValueError(f"probe_max_seq: need 0 < start <= limit and resolution >= 1, got {start}, {limit}, {resolution}")
    attempts, ok, fail, why = [], None, None, None
    seq = start
    while True:
        failed = attempt(seq)
        attempts.append(dict(seq=seq, ok=failed is None, limit=failed))
        if failed is None:
            ok = seq
        else:
            fail, why = seq, failed
        if failed == "time" or (ok == limit):
            break
        if fail is None:  # doubling
            seq = min(limit, ok * 2)
            continue
        if ok is None or fail - ok <= resolution:
            break
        seq = max(ok + 1, (ok + fail) // 2 // granularity * granularity)
        if seq >= fail:
            break
    return dict(tokens=ok, limit=why, attempts=attempts)


def summarise(results: dict, base: str) -> None:
    ref = results.get(base)
    for name, r in results.items():
        if "error" in r or not ref or "error" in ref or name == base:
            continue
        r[f"speedup_vs_{base}"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r[f"peak_ratio_vs_{base}"] = r["peak_gib"] / ref["peak_gib"] if ref.get("peak_gib") else None


def model_arguments(ap, layers: int = 32, steps: int = 5, warmup: int = 2) -> None:
    """The model shape (Llama-3.1-8B's by default), batch, LoRA rank and step counts."""
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap)
    ap.add_argument("--impls", default="qforge,qforge_compiled,peft_bitsandbytes,unsloth")
    ap.add_argument("--long-context", default="", help="comma list of batch-1 lengths (e.g. 131072,262144)")
    ap.add_argument("--long-impls", default="qforge,unsloth")
    ap.add_argument("--long-warmup", default="1", help="warm-up steps: one for all lengths, or one per length")
    ap.add_argument("--long-steps", type=int, default=1)
    ap.add_argument("--max-seq-probe", default="", help="comma list of impls whose longest batch-1 length to find")
    ap.add_argument("--probe-start", type=int, default=131072)
    ap.add_argument("--probe-max", type=int, default=1 << 20)
    ap.add_argument("--probe-resolution", type=int, default=8192)
    ap.add_argument("--prompt-heavy", action="store_true", help="also run the prompt-heavy SFT case")
    ap.add_argument("--prompt-impls", default="qforge,unsloth")
    ap.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True,
                    help="qforge: per-layer checkpoints in pinned host memory")
    ap.add_argument("--tile", type=int, default=8192, help="qforge: token tile of the MLPs and RMSNorms (0: untiled)")
    ap.add_argument("--attention", choices=("default", "cudnn"), default="cudnn",
                    help="qforge: SDPA kernel preference (cudnn: qforge.attention.prefer_cudnn_attention)")
    ap.add_argument("--fused-layers", choices=("auto", "on", "off"), default="auto",
                    help="qforge: decoder layers with a hand-written backward (qforge.decoder; auto: where supported)")
    ap.add_argument("--unsloth-anchor", default="build-anchor", help="folder holding the bundle's site/ (bench/unsloth/make_bundle.sh)")
    ap.add_argument("--workdir", default=os.path.join("/tmp", "qforge_train_step"))
    ap.add_argument("--unsloth-model-dir", default="")
    ap.add_argument("--alloc-conf", default=ALLOC_CONF, help="PYTORCH_ALLOC_CONF for every run")
    ap.add_argument("--child-timeout", type=float, default=900)
    ap.add_argument("--time-budget", type=float, default=0, help="seconds for the whole bench (0: none)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench/results/train_step.json")
    ap.add_argument("--matmul-tflops", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_child-out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.impl = a._child
    if a._child:
        a.matmul_tflops = a.matmul_tflops or None
        try:
            result = child(a)
        except BaseException as e:  # noqa: BLE001  (the parent reports it beside the others)
            import traceback

            traceback.print_exc()
            result = dict(error=f"{type(e).__name__}: {str(e)[-1500:]}")
        Path(a._child_out).write_text(json.dumps(result))
        sys.stdout.flush()
        os._exit(0)  # skip interpreter teardown (compile workers can hang it)

    t_start = time.time()
    deadline = t_start + a.time_budget if a.time_budget else float("inf")
    os.makedirs(a.workdir, exist_ok=True)
    device = torch.device(a.device)
    a.matmul_tflops = matmul_tflops(device) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    impls = [i for i in a.impls.split(",") if i]
    every = set(impls) | set(a.long_impls.split(",") if a.long_context else []) | \
        set(a.prompt_impls.split(",") if a.prompt_heavy else []) | set(a.max_seq_probe.split(","))
    unsloth_missing = None  # why Unsloth cannot run: its runs are reported as errors, the others still run
    if "unsloth" in every and not a.unsloth_model_dir:
        try:
            a.unsloth_model_dir = unsloth_model_dir(a, deadline)
        except (OSError, subprocess.SubprocessError) as e:
            unsloth_missing = f"the Unsloth checkpoint was not written: {type(e).__name__}: {e}"[-600:]
    results = {}
    for name in impls:
        results[name] = run_child(a, name, a.seq, a.batch, a.warmup, a.steps, False, deadline, unsloth_missing)
    summarise(results, "peft_bitsandbytes")
    summarise(results, "unsloth")
    base = results.get("peft_bitsandbytes")
    for name, r in results.items():
        if base and "error" not in base and "error" not in r and name not in ("peft_bitsandbytes", "unsloth"):
            r["max_loss_diff_vs_peft_bitsandbytes"] = max(abs(x - y) for x, y in zip(r["losses"], base["losses"]))
    long_context = []
    lengths = [int(x) for x in a.long_context.split(",") if x]
    warmups = [int(x) for x in a.long_warmup.split(",")]
    if len(warmups) not in (1, len(lengths)):
        raise SystemExit(f"--long-warmup: give one count or one per length ({len(lengths)}), got {a.long_warmup!r}")
    warmups = warmups * len(lengths) if len(warmups) == 1 else warmups
    for seq, warm in zip(lengths, warmups):
        for name in a.long_impls.split(","):
            r = run_child(a, name, seq, 1, warm, a.long_steps, False, deadline, unsloth_missing)
            long_context.append(dict(impl=name, seq=seq, tokens_per_s=r.get("tokens_per_s"), peak_gib=r.get("peak_gib"),
                                     host_peak_gib=r.get("host_peak_gib"), step_s=[t / 1e3 for t in r.get("step_ms", [])],
                                     first_step_s=(r["first_step_ms"] / 1e3 if "first_step_ms" in r else None),
                                     warmup_steps=warm, timed_steps=a.long_steps,
                                     error=r.get("error"), limit=r.get("limit"), memory=r.get("memory")))
    max_seq = {}
    for name in [i for i in a.max_seq_probe.split(",") if i]:
        def attempt(seq, name=name):
            r = run_child(a, name, seq, 1, 0, 1, False, deadline, unsloth_missing)
            return r.get("limit") if "error" in r else None

        max_seq[name] = probe_max_seq(attempt, a.probe_start, a.probe_max, a.probe_resolution)
    prompt_heavy = {}
    if a.prompt_heavy:
        for name in a.prompt_impls.split(","):
            prompt_heavy[name] = run_child(a, name, a.seq, a.batch, a.warmup, a.steps, True, deadline, unsloth_missing)
        summarise(prompt_heavy, "unsloth")

    record = environment(["transformers", "peft", "bitsandbytes"])
    versions = record["versions"]
    try:  # the bundle's version, without importing unsloth into this process
        from importlib.metadata import distributions

        site = str(Path(a.unsloth_anchor, "site").resolve())
        versions.update({d.metadata["Name"]: d.version for d in distributions(path=[site])
                         if d.metadata["Name"] in ("unsloth", "unsloth_zoo", "unsloth-zoo")
                         or (d.metadata["Name"] == "bitsandbytes" and versions["bitsandbytes"] == NOT_INSTALLED)})
    except Exception:  # noqa: BLE001
        pass
    out = dict(
        **record, matmul_tflops=a.matmul_tflops, allocator=a.alloc_conf,
        config=dict(model="Llama-3.1-8B shapes" if a.layers == 32 and a.hidden == 4096 else "custom",
                    layers=a.layers, hidden=a.hidden, intermediate=a.intermediate, heads=a.heads,
                    kv_heads=a.kv_heads, vocab=a.vocab, seq=a.seq, batch=a.batch,
                    lora=dict(r=a.rank, alpha=2 * a.rank, dropout=0.0, targets=list(TARGETS)),
                    gradient_checkpointing=True, autocast="bf16", optimizer="AdamW", lr=a.lr,
                    warmup_steps=a.warmup, timed_steps=a.steps,
                    qforge_memory=dict(offload=a.offload, tile_tokens=a.tile or None, attention=a.attention,
                                       fused_layers=a.fused_layers),
                    unsloth_gradient_checkpointing="unsloth", process="one fresh process per impl and case"),
        **results,
    )
    if a.long_context:
        out["long_context"] = long_context
        out["long_context_config"] = dict(batch=1, child_timeout_s=a.child_timeout,
                                          step="forward + backward + AdamW step (one full optimizer step)")
    if max_seq:
        out["max_seq"] = max_seq
    if a.prompt_heavy:
        out["prompt_heavy"] = dict(prompt_heavy, config=dict(
            seq=a.seq, batch=a.batch, prompt_fraction=PROMPT_FRACTION, conversation_tokens="256..1023, packed",
            qforge_loss="fused linear + cross-entropy; masked rows compacted out before the lm_head GEMMs "
                        "(qforge.loss compact=True)"))
    out["total_wall_s"] = time.time() - t_start
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    brief = {k: ({kk: v for kk, v in r.items() if kk not in ("losses", "step_ms")} if isinstance(r, dict) else r)
             for k, r in out.items() if k in results or k in ("long_context", "prompt_heavy")}
    print(json.dumps(brief, indent=1, default=str))


if __name__ == "__main__":
    main()
