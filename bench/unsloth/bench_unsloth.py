#!/usr/bin/env python3
"""Time Unsloth QLoRA training of a Llama-3.1-8B-shaped model with random weights, fully offline.

Needs the offline bundle on PYTHONPATH (unsloth, unsloth_zoo, trl, bitsandbytes, cut_cross_entropy
and small deps; torch/transformers/peft/accelerate come from the host), built with
`bash bench/unsloth/make_bundle.sh build-anchor`. From the repo root:

    PYTHONPATH=build-anchor/site python3 bench/unsloth/bench_unsloth.py --out $OUT/unsloth.json
    PYTHONPATH=build-anchor/site python3 bench/unsloth/bench_unsloth.py --max-seq-probe \
        --out $OUT/unsloth_probe.json --time-budget 540

What it does
  1. Writes (once; reused while the host keeps /tmp) a local checkpoint: a Meta-style Llama-3.1
     config.json (hidden 4096, 14336 MLP, 32 heads / 8 KV heads, vocab 128256, rope_theta 500000,
     llama3 RoPE scaling), random bf16 weights N(0, 0.02) (norms = 1) as sharded safetensors, and a
     synthetic Llama-3-style tokenizer (byte-level BPE, 128000 base ids + the 256 Llama-3.1 special
     tokens at 128000..128255, pad = <|finetune_right_pad_id|>). Nothing is downloaded.
  2. For each gradient-checkpointing variant (default "unsloth" then True), in a fresh subprocess:
     FastLanguageModel.from_pretrained(dir, load_in_4bit=True, dtype=bf16) ->
     get_peft_model(r=16, alpha=32, dropout=0, q/k/v/o/gate/up/down) -> plain loop:
     AdamW(lr 2e-4, wd 0) on the LoRA params, torch.autocast(cuda, bf16), random tokens,
     labels = input_ids, `--warmup` + `--steps` steps, torch.cuda.synchronize() around each.
  3. --max-seq-probe: batch 1, one full step (fwd+bwd+AdamW) per attempt, each attempt in a fresh
     subprocess; doubles from --probe-start until a failure, then bisects to --probe-resolution.
     One step's attention cost grows ~quadratically (minutes per attempt past ~200K tokens), so an
     attempt whose estimated time exceeds 0.9*min(--child-timeout, --time-budget) is replaced by
     the longest length that fits, or the probe stops and reports max_ok_seq as a lower bound.
     Progress is kept in the work dir, so a run stopped by --time-budget resumes when re-run
     with the same arguments (while the host keeps /tmp). The JSON also has a linear fit of
     peak reserved memory vs length ("extrapolation") as a hint.
  The checkpoint is written by a subprocess too, so the parent never holds a CUDA context.

The JSON at --out is rewritten after every subprocess, so a killed run still leaves results.
Each subprocess's log goes next to it (<out stem>.<name>.log).
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))

LLAMA31_8B = dict(
    vocab_size = 128256,
    hidden_size = 4096,
    intermediate_size = 14336,
    num_hidden_layers = 32,
    num_attention_heads = 32,
    num_key_value_heads = 8,
    max_position_embeddings = 131072,
    rope_theta = 500000.0,
    rms_norm_eps = 1e-5,
)
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
MODEL_FORMAT_VERSION = 1  # bump when the on-disk model layout below changes


# --------------------------------------------------------------------------------------------
# Environment: offline, no telemetry, bundle on sys.path. Runs before unsloth/transformers import.
# --------------------------------------------------------------------------------------------
def find_site_dir():
    """The bundle dir: a PYTHONPATH entry holding unsloth/, else <repo>/build-anchor/site (this file
    is <repo>/bench/unsloth/bench_unsloth.py), else ./build-anchor/site."""
    for p in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if p and os.path.isdir(os.path.join(p, "unsloth")) and os.path.isdir(os.path.join(p, "_fallback")):
            return os.path.abspath(p)
    for cand in (
        os.path.join(HERE, "site"),
        os.path.join(HERE, "build-anchor", "site"),
        os.path.join(HERE, os.pardir, os.pardir, "build-anchor", "site"),
        os.path.join(os.getcwd(), "build-anchor", "site"),
    ):
        if os.path.isdir(os.path.join(cand, "unsloth")):
            return os.path.abspath(cand)
    return None


def setup_environment(workdir):
    site = find_site_dir()
    if site is not None:
        if site not in sys.path:
            sys.path.insert(0, site)
        fallback = os.path.join(site, "_fallback")
        if os.path.isdir(fallback) and fallback not in sys.path:
            sys.path.append(fallback)  # after site-packages: host packages win
        pp = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if not any(os.path.abspath(p) == site for p in pp):
            os.environ["PYTHONPATH"] = os.pathsep.join([site] + pp)  # children inherit it
    env = {
        # No network on the GPU host: never try the Hub, never hang on it.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
        "HF_HUB_ETAG_TIMEOUT": "2",
        "HF_HUB_DOWNLOAD_TIMEOUT": "5",
        "DO_NOT_TRACK": "1",
        # Unsloth: skip the usage-statistics download (also skipped when offline) and keep its
        # generated modules out of the repo tree.
        "UNSLOTH_DISABLE_STATISTICS": "1",
        # A host torchvision built for another torch would make `import unsloth` raise; text-only run.
        "UNSLOTH_SKIP_TORCHVISION_CHECK": "1",
        "UNSLOTH_COMPILE_LOCATION": os.path.join(workdir, "unsloth_compiled_cache"),
        "WANDB_DISABLED": "true",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "HF_HOME": os.path.join(workdir, "hf_home"),
    }
    for k, v in env.items():
        os.environ.setdefault(k, v)
    os.makedirs(os.environ["HF_HOME"], exist_ok = True)
    if site is not None:
        ensure_python_headers(site)
    return site


def python_include_dir():
    import sysconfig

    scheme = sysconfig.get_default_scheme()
    if scheme == "posix_local":  # Debian/Ubuntu, as triton.runtime.build does
        scheme = "posix_prefix"
    return sysconfig.get_paths(scheme = scheme)["include"]


def ensure_python_headers(site):
    """Triton JIT-compiles a small C launcher with gcc and Python.h. Ubuntu's system python3 has no
    Python.h unless python3.12-dev is installed; then point Triton at the bundled 3.12 headers
    (TRITON_CUDACRT_PATH is appended to its -I list, after the system include dir)."""
    inc = python_include_dir()
    bundled = os.path.join(site, "_fallback", "_python312_include", "python3.12")
    if not os.path.isfile(os.path.join(inc, "Python.h")) and os.path.isfile(os.path.join(bundled, "Python.h")):
        if sys.version_info[:2] == (3, 12):
            os.environ.setdefault("TRITON_CUDACRT_PATH", bundled)


def toolchain_info():
    inc = python_include_dir()
    return {
        "cc": os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang"),
        "python_h": os.path.join(inc, "Python.h") if os.path.isfile(os.path.join(inc, "Python.h")) else None,
        "triton_extra_include": os.environ.get("TRITON_CUDACRT_PATH"),
        "nvcc": shutil.which("nvcc"),
        "python": sys.version.split()[0],
    }


# --------------------------------------------------------------------------------------------
# Local checkpoint + tokenizer (parent process; imports torch/transformers but never unsloth)
# --------------------------------------------------------------------------------------------
def model_config_dict(layers, rope_scaling = True):
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "pad_token_id": 128004,
        "hidden_act": "silu",
        "hidden_size": LLAMA31_8B["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": LLAMA31_8B["intermediate_size"],
        "max_position_embeddings": LLAMA31_8B["max_position_embeddings"],
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": LLAMA31_8B["num_attention_heads"],
        "num_hidden_layers": layers,
        "num_key_value_heads": LLAMA31_8B["num_key_value_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": LLAMA31_8B["rms_norm_eps"],
        "rope_scaling": None,
        "rope_theta": LLAMA31_8B["rope_theta"],
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0",
        "use_cache": True,
        "vocab_size": LLAMA31_8B["vocab_size"],
    }
    if rope_scaling:
        cfg["rope_scaling"] = {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        }
    return cfg


def weight_specs(cfg):
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = H // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    specs = [("model.embed_tokens.weight", (V, H))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (H,)),
            (p + "self_attn.q_proj.weight", (H, H)),
            (p + "self_attn.k_proj.weight", (kv, H)),
            (p + "self_attn.v_proj.weight", (kv, H)),
            (p + "self_attn.o_proj.weight", (H, H)),
            (p + "post_attention_layernorm.weight", (H,)),
            (p + "mlp.gate_proj.weight", (I, H)),
            (p + "mlp.up_proj.weight", (I, H)),
            (p + "mlp.down_proj.weight", (H, I)),
        ]
    specs += [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]
    return specs


def llama31_special_tokens():
    names = [
        BOS, EOS, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>", PAD,
        "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
        "<|eot_id|>", "<|python_tag|>",
    ]
    names += [f"<|reserved_special_token_{k}|>" for k in range(3, 3 + 256 - len(names))]
    assert len(names) == 256
    return names


def write_tokenizer(model_dir, vocab_size):
    """Synthetic Llama-3-style fast tokenizer: byte-level BPE over 128000 ids (256 byte symbols,
    a few merges trained on a couple of lines, unreachable filler entries up to 128000) plus the
    256 Llama-3.1 special tokens at ids 128000..128255, so len(tokenizer) == vocab_size and no
    embedding resize can happen. The benchmark feeds random ids and never tokenizes text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    n_base = vocab_size - 256
    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Unsloth QLoRA benchmark with a random Llama-3.1-8B shaped model.",
        "def main():\n    return 0\n",
    ] * 20
    small = Tokenizer(models.BPE())
    small.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space = False)
    small.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size = 600, show_progress = False,
            initial_alphabet = pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    small_json = json.loads(small.to_str())
    vocab = dict(small_json["model"]["vocab"])
    merges = small_json["model"]["merges"]
    i = len(vocab)
    while len(vocab) < n_base:
        vocab[f"\u0120unused{i}"] = len(vocab)
        i += 1
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    tok = Tokenizer(models.BPE(vocab = vocab, merges = merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space = False, use_regex = True)
    tok.decoder = decoders.ByteLevel()
    specials = llama31_special_tokens()
    tok.add_special_tokens([AddedToken(t, special = True, normalized = False) for t in specials])
    assert tok.token_to_id(BOS) == n_base and tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    tok.post_processor = processors.TemplateProcessing(
        single = f"{BOS} $A",
        pair = f"{BOS} $A {BOS} $B",
        special_tokens = [(BOS, n_base)],
    )
    tok.save(os.path.join(model_dir, "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "added_tokens_decoder": {
            str(n_base + j): {
                "content": t, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True,
            }
            for j, t in enumerate(specials)
        },
    }
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent = 2)
    with open(os.path.join(model_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, f, indent = 2)


def build_model_dir(model_dir, layers, rope_scaling, log):
    """Write config + random weights + tokenizer unless a matching copy is already there."""
    cfg = model_config_dict(layers, rope_scaling)
    signature = {"format": MODEL_FORMAT_VERSION, "config": cfg}
    marker = os.path.join(model_dir, "bench_model_ready.json")
    if os.path.isfile(marker):
        try:
            with open(marker) as f:
                if json.load(f) == signature:
                    log(f"reusing model dir {model_dir}")
                    return 0.0
        except Exception:
            pass
    import torch
    from safetensors.torch import save_file

    t0 = time.time()
    if os.path.isdir(model_dir):
        shutil.rmtree(model_dir)
    os.makedirs(model_dir)
    specs = weight_specs(cfg)
    total = sum(2 * _numel(s) for _, s in specs)
    free = shutil.disk_usage(model_dir).free
    if free < total * 1.05 + (1 << 30):
        raise RuntimeError(
            f"need {total / 2**30:.1f} GiB free in {model_dir}, have {free / 2**30:.1f} GiB; "
            "use --workdir on a bigger disk or fewer --layers"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device = device)
    gen.manual_seed(1234)
    shard_limit = 4 << 30
    shards, cur, cur_bytes = [], [], 0
    for name, shape in specs:
        nbytes = 2 * _numel(shape)
        if cur and cur_bytes + nbytes > shard_limit:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += nbytes
    shards.append(cur)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype = torch.bfloat16)
            else:
                t = torch.empty(shape, dtype = torch.bfloat16, device = device)
                t.normal_(0.0, 0.02, generator = gen)
                t = t.cpu()
            tensors[name] = t
            weight_map[name] = fname
        save_file(tensors, os.path.join(model_dir, fname), metadata = {"format": "pt"})
        del tensors
        log(f"  wrote {fname} ({k + 1}/{len(shards)})")
    with open(os.path.join(model_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent = 2)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent = 2)
    with open(os.path.join(model_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 128000, "eos_token_id": 128001, "do_sample": False}, f, indent = 2)
    write_tokenizer(model_dir, cfg["vocab_size"])
    with open(marker, "w") as f:
        json.dump(signature, f)
    if device == "cuda":
        torch.cuda.empty_cache()
    dt = time.time() - t0
    log(f"model dir ready in {dt:.1f}s: {model_dir} ({total / 2**30:.1f} GiB)")
    return dt


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


# --------------------------------------------------------------------------------------------
# Child: one training run (imports unsloth first, as Unsloth requires)
# --------------------------------------------------------------------------------------------
def parse_gc(value):
    v = str(value).strip().lower()
    if v == "unsloth":
        return "unsloth"
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no", "none"):
        return False
    raise ValueError(f"bad --gc value {value!r}")


def gib(x):
    return round(x / 2**30, 3)


def child_main(args):
    result = {"ok": False, "gc": args.gc, "seq": args.seq, "batch": args.batch}

    def dump():
        tmp = args.child_out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent = 2)
        os.replace(tmp, args.child_out)

    t_start = time.time()
    import socket

    socket.setdefaulttimeout(10)  # an unexpected network call must fail fast, not hang
    try:
        import unsloth  # noqa: F401  (must come before transformers / peft / trl)
        from unsloth import FastLanguageModel
        import torch

        result["import_s"] = round(time.time() - t_start, 2)
        result["versions"] = _versions()
        socket.setdefaulttimeout(None)
        gc = parse_gc(args.gc)
        dev = torch.cuda.current_device()
        result["gpu"] = torch.cuda.get_device_name(dev)
        result["gpu_total_gib"] = gib(torch.cuda.get_device_properties(dev).total_memory)
        torch.cuda.reset_peak_memory_stats()

        t0 = time.time()
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name = args.model_dir,
            max_seq_length = args.seq,
            dtype = torch.bfloat16,
            load_in_4bit = True,
            use_gradient_checkpointing = gc,
            local_files_only = True,
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r = 16,
            lora_alpha = 32,
            lora_dropout = 0,
            target_modules = TARGET_MODULES,
            bias = "none",
            use_gradient_checkpointing = gc,
            random_state = 3407,
            max_seq_length = args.seq,
        )
        FastLanguageModel.for_training(model)
        torch.cuda.synchronize()
        result["load_s"] = round(time.time() - t0, 2)
        result["len_tokenizer"] = len(tokenizer)
        try:  # Unsloth may auto-offload embed_tokens to host RAM when VRAM is tight
            result["embed_tokens_device"] = str(model.get_input_embeddings().weight.device)
        except Exception:
            pass

        params = [p for p in model.parameters() if p.requires_grad]
        result["trainable_params"] = sum(p.numel() for p in params)
        result["trainable_dtypes"] = sorted({str(p.dtype) for p in params})
        result["mem_after_load_gib"] = gib(torch.cuda.memory_allocated())
        result["peak_load_gib"] = gib(torch.cuda.max_memory_allocated())
        vocab = model.config.vocab_size
        try:
            optimizer = torch.optim.AdamW(params, lr = 2e-4, weight_decay = 0.0, fused = True)
            result["optimizer"] = "torch.optim.AdamW(lr=2e-4, weight_decay=0, fused=True)"
        except Exception:
            optimizer = torch.optim.AdamW(params, lr = 2e-4, weight_decay = 0.0)
            result["optimizer"] = "torch.optim.AdamW(lr=2e-4, weight_decay=0)"
        model.train()
        gen = torch.Generator(device = "cuda")
        gen.manual_seed(0)
        torch.cuda.reset_peak_memory_stats()
        n_total = args.warmup + args.steps
        step_s, losses = [], []
        result.update(step_s = step_s, losses = losses)
        for step in range(n_total):
            ids = torch.randint(0, vocab, (args.batch, args.seq), device = "cuda", generator = gen)
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast("cuda", dtype = torch.bfloat16):
                out = model(input_ids = ids, labels = ids)
            loss = out.loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none = True)
            torch.cuda.synchronize()
            step_s.append(round(time.perf_counter() - t, 4))
            losses.append(round(float(loss.detach()), 5))
            del out, loss, ids
            print(f"[bench] step {step + 1}/{n_total} ({'warmup' if step < args.warmup else 'timed'}) "
                  f"{step_s[-1]:.3f}s loss {losses[-1]:.4f}", flush = True)
            result["peak_train_gib"] = gib(torch.cuda.max_memory_allocated())
            dump()
        timed = step_s[args.warmup:]
        tokens = args.batch * args.seq
        if timed:
            result["timed_steps"] = len(timed)
            result["mean_step_s"] = round(sum(timed) / len(timed), 4)
            result["median_step_s"] = round(sorted(timed)[len(timed) // 2], 4)
            result["tokens_per_s"] = round(tokens * len(timed) / sum(timed), 1)
        result["peak_train_gib"] = gib(torch.cuda.max_memory_allocated())
        result["peak_train_reserved_gib"] = gib(torch.cuda.max_memory_reserved())
        result["ok"] = True
    except BaseException as e:  # noqa: BLE001  (report OOM and everything else to the parent)
        is_oom = type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()
        result["error_type"] = type(e).__name__
        result["error"] = str(e)[-2000:]
        result["oom"] = bool(is_oom)
        traceback.print_exc()
    result["child_wall_s"] = round(time.time() - t_start, 2)
    dump()
    sys.stdout.flush()
    # Skip interpreter teardown (atexit hooks of compile workers etc. can hang or crash late).
    os._exit(0)


def _versions():
    from importlib.metadata import version

    out = {}
    for pkg in ("unsloth", "unsloth_zoo", "torch", "triton", "transformers", "peft", "trl",
                "accelerate", "bitsandbytes", "cut_cross_entropy", "xformers", "flash_attn", "datasets"):
        try:
            out[pkg] = version(pkg)
        except Exception:
            out[pkg] = None
    try:
        import torch

        out["torch_cuda"] = torch.version.cuda
    except Exception:
        pass
    try:
        import datasets

        if getattr(datasets, "__unsloth_bundle_stub__", False):
            out["datasets"] = "bundle-stub"
    except Exception:
        pass
    return out


# --------------------------------------------------------------------------------------------
# Parent: orchestration
# --------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, args):
        self.args = args
        self.t0 = time.time()
        stem = args.out[:-5] if args.out.endswith(".json") else args.out
        self.log_stem = stem
        self.attempt_durations = []

    def log(self, msg):
        print(f"[bench_unsloth {time.time() - self.t0:7.1f}s] {msg}", flush = True)

    def time_left(self):
        if not self.args.time_budget:
            return float("inf")
        return self.args.time_budget - (time.time() - self.t0)

    def expected_child_s(self):
        return max(self.attempt_durations) if self.attempt_durations else self.args.first_child_estimate

    def run_child(self, name, gc, seq, batch, warmup, steps):
        out_json = os.path.join(self.args.workdir, f"child_{os.getpid()}_{name}.json")
        if os.path.exists(out_json):
            os.remove(out_json)
        cmd = [
            sys.executable, os.path.abspath(__file__), "--_child",
            "--child-out", out_json, "--model-dir", self.args.model_dir,
            "--gc", str(gc), "--seq", str(seq), "--batch", str(batch),
            "--warmup", str(warmup), "--steps", str(steps), "--workdir", self.args.workdir,
        ]
        log_path = f"{self.log_stem}.{name}.log"
        timeout = self.args.child_timeout
        if self.args.time_budget:
            timeout = max(30, min(timeout, self.time_left() - 5))
        self.log(f"child {name}: gc={gc} seq={seq} batch={batch} (timeout {timeout:.0f}s, log {log_path})")
        t = time.time()
        rc = None
        with open(log_path, "w") as logf:
            proc = subprocess.Popen(cmd, stdout = logf, stderr = subprocess.STDOUT, env = os.environ.copy(),
                                    start_new_session = True)
            try:
                rc = proc.wait(timeout = timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                rc = "timeout"
        dt = time.time() - t
        self.attempt_durations.append(dt)
        res = {}
        if os.path.exists(out_json):
            try:
                with open(out_json) as f:
                    res = json.load(f)
            except Exception as e:
                res = {"ok": False, "error": f"unreadable child json: {e}"}
            os.remove(out_json)
        if rc != 0 or not res:
            res["ok"] = False
            res.setdefault("error", f"child exited with {rc} (negative = killed by signal; "
                                    f"-9 is often the host OOM killer)")
            if rc == "timeout":
                res["timeout"] = True
        res["returncode"] = rc
        res["wall_s"] = round(dt, 1)
        res["log"] = log_path
        self.log(f"child {name}: ok={res.get('ok')} tokens/s={res.get('tokens_per_s')} "
                 f"peak_train={res.get('peak_train_gib')}GiB err={str(res.get('error', ''))[:200]!r}")
        return res


def _kill_group(proc):
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except Exception:
        proc.kill()
    try:
        proc.wait(timeout = 30)
    except Exception:
        pass


def write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent = 2)
    os.replace(tmp, path)


def common_header(args, site):
    return {
        "tool": "unsloth",
        "script": os.path.abspath(__file__),
        "bundle": site,
        "model": {
            "shape": "Llama-3.1-8B",
            **{k: v for k, v in model_config_dict(args.layers, not args.no_rope_scaling).items()
               if k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "vocab_size", "rope_theta", "rope_scaling")},
            "weights": "random N(0,0.02) bf16, quantized by Unsloth/bitsandbytes at load (nf4)",
            "dir": args.model_dir,
        },
        "lora": {"r": 16, "alpha": 32, "dropout": 0, "target_modules": TARGET_MODULES, "bias": "none"},
        "train": {"lr": 2e-4, "optimizer": "AdamW (weight_decay 0; fused when available)",
                  "autocast": "bf16", "data": "random token ids, labels = input_ids"},
        "toolchain": toolchain_info(),
    }


def build_in_subprocess(args, r):
    """Create the checkpoint in a child process: the parent must not keep a CUDA context (~0.5 GiB)
    alive on the GPU while the measured children run."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_build", "--model-dir", args.model_dir,
           "--layers", str(args.layers), "--workdir", args.workdir]
    if args.no_rope_scaling:
        cmd.append("--no-rope-scaling")
    log_path = f"{r.log_stem}.build.log"
    r.log(f"preparing model dir {args.model_dir} (log {log_path})")
    t = time.time()
    with open(log_path, "w") as logf:
        rc = subprocess.run(cmd, stdout = logf, stderr = subprocess.STDOUT, env = os.environ.copy()).returncode
    if rc != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"building the model dir failed (rc={rc}); log {log_path}:\n{tail}")
    return time.time() - t


def bench_main(args, site):
    r = Runner(args)
    data = common_header(args, site)
    data.update(mode = "bench", seq = args.seq, batch = args.batch, warmup = args.warmup, steps = args.steps,
                tokens_per_step = args.seq * args.batch, variants = {}, complete = False)
    write_json(args.out, data)
    data["model_build_s"] = round(build_in_subprocess(args, r), 1)
    write_json(args.out, data)
    for gc in args.gc_list:
        name = f"gc_{str(gc).lower()}"
        if r.time_left() < r.expected_child_s():
            data["variants"][name] = {"ok": False, "skipped": "time budget"}
            r.log(f"skipping {name}: not enough time budget left")
            continue
        data["variants"][name] = r.run_child(name, gc, args.seq, args.batch, args.warmup, args.steps)
        write_json(args.out, data)
    data["complete"] = all(v.get("ok") for v in data["variants"].values())
    data["total_wall_s"] = round(time.time() - r.t0, 1)
    write_json(args.out, data)
    r.log(f"wrote {args.out}")


def estimate_attempt_s(seq, attempts, first_estimate):
    """Seconds a probe attempt at `seq` should take: the cheapest attempt's wall time is taken as the
    fixed cost (import + 4-bit load), the rest scaled quadratically (attention) from the longest
    successful attempt not longer than `seq`."""
    timed = [(a["seq"], a["wall_s"]) for a in attempts if a.get("ok") and a.get("wall_s")]
    if not timed:
        return first_estimate
    fixed = min(w for _, w in timed)
    below = [t for t in timed if t[0] <= seq]
    q, w = max(below) if below else min(timed)
    return fixed + max(0.0, w - fixed) * (seq / q) ** 2


def extrapolate(attempts):
    """Linear fit of peak reserved GPU memory vs length over the longest successful attempts, and the
    length where it would reach the GPU's memory. A hint only: it ignores the host-RAM limit of
    Unsloth's offloaded checkpointing (~256 KiB of pinned host memory per token for 32 layers)."""
    pts = sorted((a["seq"], a["peak_train_reserved_gib"]) for a in attempts
                 if a.get("ok") and a.get("peak_train_reserved_gib"))[-3:]
    total = next((a["gpu_total_gib"] for a in attempts if a.get("gpu_total_gib")), None)
    if len(pts) < 2 or not total:
        return None
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx <= 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in pts) / sxx
    a = my - b * mx
    if b <= 0:
        return None
    return {
        "points_seq_gib": pts,
        "gib_per_1k_tokens": round(b * 1024, 4),
        "intercept_gib": round(a, 3),
        "gpu_total_gib": total,
        "predicted_max_seq_gpu_only": int((total - a) / b),
    }


def probe_main(args, site):
    r = Runner(args)
    key = hashlib.sha1(json.dumps(
        [MODEL_FORMAT_VERSION, args.layers, args.no_rope_scaling, str(args.gc_list[0]), args.probe_start,
         args.probe_max, args.probe_resolution]).encode()).hexdigest()[:12]
    state_path = os.path.join(args.workdir, f"probe_state_{key}.json")
    state = {"attempts": []}
    if os.path.isfile(state_path) and not args.probe_restart:
        with open(state_path) as f:
            state = json.load(f)
        r.log(f"resuming probe from {state_path} ({len(state['attempts'])} attempts done)")
    gc = args.gc_list[0]
    data = common_header(args, site)
    data.update(mode = "max_seq_probe", gc = str(gc), batch = 1, probe_start = args.probe_start,
                probe_max = args.probe_max, probe_resolution = args.probe_resolution, state_file = state_path)

    def done_attempts():
        return {a["seq"]: a for a in state["attempts"]}

    def bounds():
        lo, hi = None, None
        for a in state["attempts"]:
            if a["ok"]:
                lo = a["seq"] if lo is None else max(lo, a["seq"])
            else:
                hi = a["seq"] if hi is None else min(hi, a["seq"])
        return lo, hi

    def save(complete, note = None):
        lo, hi = bounds()
        data.update(
            attempts = sorted(state["attempts"], key = lambda a: a["seq"]),
            max_ok_seq = lo, min_fail_seq = hi, complete = complete,
            total_wall_s = round(time.time() - r.t0, 1),
            extrapolation = extrapolate(state["attempts"]),
        )
        if note:
            data["note"] = note
        with open(state_path, "w") as f:
            json.dump(state, f, indent = 2)
        write_json(args.out, data)

    save(False)
    data["model_build_s"] = round(build_in_subprocess(args, r), 1)
    gran = 256  # candidate lengths are multiples of this
    # One attempt must fit in one subprocess timeout and in one invocation's time budget.
    attempt_limit = args.child_timeout * 0.9
    if args.time_budget:
        attempt_limit = min(attempt_limit, (args.time_budget - 15) * 0.9)

    def time_cap(lo_, s_):
        """Longest multiple of `gran` in (lo_, s_] whose estimated attempt fits attempt_limit."""
        lo_q = (lo_ or 0) // gran + 1
        hi_q = s_ // gran
        best = None
        while lo_q <= hi_q:
            m = (lo_q + hi_q) // 2
            if estimate_attempt_s(m * gran, state["attempts"], args.first_child_estimate) <= attempt_limit:
                best, lo_q = m * gran, m + 1
            else:
                hi_q = m - 1
        return best

    while True:
        lo, hi = bounds()
        if lo is not None and hi is not None and lo > hi:
            note = "non-monotonic results (a longer length passed than one that failed); see attempts"
            save(True, note)
            break
        if hi is None:  # doubling phase
            s = args.probe_start if lo is None else lo * 2
            if s > args.probe_max:
                if lo is not None and lo >= args.probe_max:
                    save(True, f"reached --probe-max {args.probe_max} without a failure")
                    break
                s = args.probe_max
        elif lo is None:
            save(True, f"even --probe-start {args.probe_start} failed; try a smaller --probe-start")
            break
        else:  # bisect phase
            if hi - lo <= args.probe_resolution:
                save(True)
                break
            s = ((lo + hi) // 2) // gran * gran
            if s <= lo:
                save(True)
                break
        est = estimate_attempt_s(s, state["attempts"], args.first_child_estimate)
        if est > attempt_limit:
            cap = time_cap(lo, s)
            if cap is None or (lo is not None and cap - lo < args.probe_resolution):
                save(False, f"time-bound: an attempt at {s} tokens is estimated at {est:.0f}s, over the "
                            f"per-attempt limit {attempt_limit:.0f}s (min of 0.9*--child-timeout and "
                            "0.9*--time-budget; one step's attention cost grows ~quadratically), and no "
                            "shorter untested length is worth trying. max_ok_seq is a lower bound; raise "
                            "--child-timeout and --time-budget to go further")
                r.log(f"attempt at {s} estimated {est:.0f}s > {attempt_limit:.0f}s; stopping (time-bound)")
                break
            r.log(f"attempt at {s} estimated {est:.0f}s > {attempt_limit:.0f}s; trying {cap} instead")
            s = cap
            est = estimate_attempt_s(s, state["attempts"], args.first_child_estimate)
        if s in done_attempts():
            save(False, f"internal: length {s} would be attempted twice; stopping")
            break
        if r.time_left() < est:
            save(False, f"stopped by --time-budget before the attempt at {s} tokens (estimated "
                        f"{est:.0f}s); re-run the same command to resume (state is kept in "
                        "the work dir while the host keeps it)")
            r.log("time budget exhausted; partial result written")
            break
        res = r.run_child(f"probe_{s}", gc, s, 1, 0, 1)
        att = {"seq": s, "ok": bool(res.get("ok")), "wall_s": res.get("wall_s"), "log": res.get("log")}
        for k in ("peak_train_gib", "peak_train_reserved_gib", "mem_after_load_gib", "gpu_total_gib", "step_s",
                  "losses", "load_s", "oom", "error_type", "returncode", "timeout"):
            if k in res:
                att[k] = res[k]
        if not att["ok"]:
            att["error"] = str(res.get("error", ""))[-500:]
            if res.get("timeout"):
                # A timeout says nothing about memory: keep it out of the search state.
                state.setdefault("timeouts", []).append(att)
                data["timeouts"] = state["timeouts"]
                save(False, f"attempt at {s} timed out after {att['wall_s']}s (not counted as a "
                            "failure); raise --child-timeout / --time-budget and re-run")
                break
        state["attempts"].append(att)
        save(False)
    r.log(f"probe: max_ok_seq={data.get('max_ok_seq')} min_fail_seq={data.get('min_fail_seq')} "
          f"complete={data.get('complete')} -> {args.out}")


def main():
    ap = argparse.ArgumentParser(description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default = "unsloth_bench.json", help = "result JSON path")
    ap.add_argument("--seq", type = int, default = 2048)
    ap.add_argument("--batch", type = int, default = 2)
    ap.add_argument("--layers", type = int, default = 32, help = "decoder layers (32 = full 8B shape)")
    ap.add_argument("--warmup", type = int, default = 2)
    ap.add_argument("--steps", type = int, default = 5)
    ap.add_argument("--gc", default = "unsloth,true",
                    help = "comma list of use_gradient_checkpointing variants: unsloth,true,false "
                           "(probe uses the first)")
    ap.add_argument("--max-seq-probe", action = "store_true",
                    help = "find the longest batch-1 sequence that trains one step")
    ap.add_argument("--probe-start", type = int, default = 4096)
    ap.add_argument("--probe-max", type = int, default = 1 << 20)
    ap.add_argument("--probe-resolution", type = int, default = 4096,
                    help = "stop bisecting when max_ok and min_fail are this close")
    ap.add_argument("--probe-restart", action = "store_true", help = "ignore saved probe progress")
    ap.add_argument("--time-budget", type = float, default = 0,
                    help = "seconds; stop starting subprocesses that would not finish in time (0 = none)")
    ap.add_argument("--child-timeout", type = float, default = 900)
    ap.add_argument("--first-child-estimate", type = float, default = 150,
                    help = "assumed seconds per subprocess before one has been timed")
    ap.add_argument("--workdir", default = os.environ.get(
        "UNSLOTH_BENCH_WORKDIR", os.path.join("/tmp", "unsloth_bench")),
                    help = "model checkpoint, compile cache, probe state (needs ~17 GiB for 32 layers)")
    ap.add_argument("--model-dir", default = None, help = "default: <workdir>/llama31_8b_random_L<layers>")
    ap.add_argument("--no-rope-scaling", action = "store_true", help = "omit Llama-3.1 llama3 rope_scaling")
    ap.add_argument("--_child", action = "store_true", help = argparse.SUPPRESS)
    ap.add_argument("--_build", action = "store_true", help = argparse.SUPPRESS)
    ap.add_argument("--child-out", default = None, help = argparse.SUPPRESS)
    args = ap.parse_args()

    args.workdir = os.path.abspath(args.workdir)
    os.makedirs(args.workdir, exist_ok = True)
    if args.model_dir is None:
        suffix = "" if not args.no_rope_scaling else "_norope"
        args.model_dir = os.path.join(args.workdir, f"llama31_8b_random_L{args.layers}{suffix}")
    args.model_dir = os.path.abspath(args.model_dir)
    site = setup_environment(args.workdir)
    if args._child:
        child_main(args)
        return
    if args._build:
        build_model_dir(args.model_dir, args.layers, not args.no_rope_scaling,
                        lambda m: print(f"[build] {m}", flush = True))
        return
    args.out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(args.out), exist_ok = True)
    args.gc_list = [parse_gc(x) for x in args.gc.split(",") if x.strip()]
    if site is None:
        print("WARNING: bundle not found (set PYTHONPATH=build-anchor/site)", file = sys.stderr)
    if args.max_seq_probe:
        probe_main(args, site)
    else:
        bench_main(args, site)


if __name__ == "__main__":
    main()
