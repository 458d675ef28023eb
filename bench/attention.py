"""Packed attention on one GPU: qforge.attention's backends against transformers' SDPA with its
[1, 1, T, T] document mask and against dense causal flash SDPA on the same number of tokens
(which does more work than packing needs), at Llama-3.1-8B attention shapes (32 query heads,
8 KV heads, head dim 128, bf16). Rows are packed from documents whose lengths follow an SFT-like
log-normal (mean ~600 tokens, at most 8192). Times forward + backward and the peak memory above
the inputs, and each packed backend's largest difference from the masked SDPA. Then a QLoRA train
step (NF4 + LoRA r=16, fused loss, checkpointed layers: what qforge train runs) at 8B layer shapes
(random weights, --train-layers layers) on packed rows of varied lengths through
attn_implementation "qforge": tokens/s eager, per-layer compile and whole-model compile (qforge
train --compile), and how many graphs torch.compile built; the whole-model run goes on over
--count-steps rows of varied lengths to count its compilations.

  python bench/attention.py [--tokens 16384,65536] [--reps 3] [--train-steps 10] [--count-steps 200]
      [--out bench/results/attention.json]

On a machine without CUDA, `--device cpu --tokens 512 --heads 4 --kv-heads 2 --dim 16
--train-layers 1 --hidden 64 --intermediate 128 --vocab 256 --train-tokens 256` exercises the
same code (the CPU has no flash kernels; it times what it has).
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from _record import environment  # bench/ is sys.path[0] when a bench runs

from qforge import attention as qattention

MEAN_DOC, MAX_DOC, DOC_SIGMA = 600, 8192, 1.0


def packed_lengths(tokens: int, gen: torch.Generator) -> list[int]:
    """Document lengths filling `tokens`: log-normal with mean MEAN_DOC, clipped to [1, MAX_DOC]."""
    mu = math.log(MEAN_DOC) - DOC_SIGMA ** 2 / 2
    lengths = []
    while sum(lengths) < tokens:  # each pass adds >= 1 token
        n = int(torch.empty(1).log_normal_(mu, DOC_SIGMA, generator=gen).clamp(1, MAX_DOC))
        lengths.append(min(n, tokens - sum(lengths)))
    return lengths


def cu_seqlens_of(lengths, device):
    return torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)


def document_mask(lengths, device):
    """The mask transformers' SDPA path builds for packed position_ids: same document and causal."""
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    i = torch.arange(doc.numel(), device=device)
    return ((doc[:, None] == doc[None, :]) & (i[:, None] >= i[None, :]))[None, None]


def implementations(device):
    """name -> prepare(lengths, device) -> run(q, k, v), one attention forward. What prepare builds
    (cu_seqlens, transformers' mask) is built once per case and kept, as a training forward builds
    it once for all its layers: a new cu_seqlens every call would miss qforge's block-mask cache and
    time (and hold) flex's block-mask construction in every call."""
    impls = {}
    for backend in qattention.available_backends(device):
        if backend == "sdpa":
            continue  # dense only: it is the dense_causal_sdpa row

        def prepare(lengths, device, b=backend):
            cu = cu_seqlens_of(lengths, device)
            return lambda q, k, v: qattention.attention(q, k, v, cu_seqlens=cu, backend=b)
        impls[f"qforge_{backend}"] = prepare

    def masked(lengths, device):
        mask = document_mask(lengths, device)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    impls["transformers_sdpa_mask"] = masked
    impls["dense_causal_sdpa"] = lambda lengths, device: lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True)
    return impls


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_case(prepare, tokens, lengths, a, device):
    """The median forward + backward time and the peak memory above the inputs, of the timed calls
    and of the first one (which also builds what the backend caches per batch, flex's block mask,
    and compiles flex); and the output."""
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(1, a.heads, tokens, a.dim, device=device, dtype=dtype, generator=gen).requires_grad_()
    k = torch.randn(1, a.kv_heads, tokens, a.dim, device=device, dtype=dtype, generator=gen).requires_grad_()
    v = torch.randn(1, a.kv_heads, tokens, a.dim, device=device, dtype=dtype, generator=gen).requires_grad_()
    go = torch.randn_like(q)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    run = prepare(lengths, device)
    times, first_peak = [], None
    for i in range(a.reps + 1):  # the first run warms up (builds flex's block mask, compiles flex)
        synchronize(device)
        t0 = time.perf_counter()
        out = run(q, k, v)
        out.backward(go)
        synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
        q.grad = k.grad = v.grad = None
        if i == 0 and cuda:
            first_peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
            torch.cuda.reset_peak_memory_stats()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30 if cuda else None
    return dict(ms=sorted(times)[len(times) // 2] * 1e3, peak_gib=peak, first_call_peak_gib=first_peak), out.detach()


def attention_cases(a, device, tokens):
    """Every implementation on one packed row of `tokens`; each packed one's largest difference
    from transformers' masked SDPA (the same documents, the same inputs)."""
    rows, outs = [], {}
    lengths = packed_lengths(tokens, torch.Generator().manual_seed(tokens))
    for name, prepare in implementations(device).items():
        row = dict(impl=name, tokens=tokens, docs=len(lengths), longest_doc=max(lengths))
        try:
            timing, outs[name] = time_case(prepare, tokens, lengths, a, device)
            row.update(timing)
        except Exception as e:  # noqa: BLE001 - out of memory, a backend refusing the inputs: recorded
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        print(row, flush=True)
        rows.append(row)
    reference = outs.get("transformers_sdpa_mask")
    for row in rows:
        if reference is not None and row["impl"].startswith("qforge_") and row["impl"] in outs:
            row["max_abs_diff_vs_mask"] = float((outs[row["impl"]].float() - reference.float()).abs().max())
    return rows


def train_model(a, device):
    """A QLoRA model as qforge train builds it: NF4 projections, LoRA r=16 on all 7, the fused
    loss, checkpointed layers, packed rows through qforge.attention (--attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qforge import hf
    from qforge.nn import add_lora, replace_linears

    config = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.train_layers,
                         num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, head_dim=a.dim,
                         vocab_size=a.vocab, max_position_embeddings=max(MAX_DOC, a.train_tokens),
                         use_cache=False, attention_dropout=0.0)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    replace_linears(model)
    add_lora(model, r=16, lora_alpha=16, seed=0)
    hf.patch_causal_lm(model)
    qattention.use_for_training(model, a.attention, device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def train(a, device, mode, steps):
    """Tokens/s of forward + backward over `steps` packed rows of varied lengths (after one warm-up
    row), with how many graphs torch.compile built and the time it took."""
    from qforge.compile import CompileWatch, compile_for_training

    torch._dynamo.reset()
    model = train_model(a, device)
    if mode == "model_compile":  # what qforge train --compile runs
        watch = compile_for_training(model)
    else:
        watch = CompileWatch()
        if mode == "layer_compile":
            for layer in model.model.layers:
                layer.compile(fullgraph=True, dynamic=True)
    gen = torch.Generator().manual_seed(2)
    seen, lengths_seen = 0, set()
    t0 = None
    with watch:
        for step in range(steps + 1):  # step 0 warms up (and compiles)
            tokens = int(torch.randint(a.train_tokens // 2, a.train_tokens + 1, (1,), generator=gen))
            lengths = packed_lengths(tokens, gen)
            ids = torch.randint(0, a.vocab, (1, tokens), generator=gen).to(device)
            position_ids = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
            model(input_ids=ids, position_ids=position_ids, labels=ids, use_cache=False,
                  **qattention.packed_inputs(cu_seqlens_of(lengths, "cpu"), device)).loss.backward()
            model.zero_grad(set_to_none=True)
            synchronize(device)
            if step == 0:
                t0 = time.perf_counter()
            else:
                seen += tokens
            lengths_seen.add(tokens)
    elapsed = time.perf_counter() - t0
    row = dict(mode=mode, tokens_per_s=seen / elapsed, steps=steps, distinct_lengths=len(lengths_seen),
               **watch.summary())
    print({k: v for k, v in row.items() if k != "recompile_reasons"}, flush=True)
    return row


def write(result, path):
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", default="16384,65536", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--attention", default="auto", choices=qattention.ATTENTION_CHOICES,
                    help="--attention of the train runs")
    ap.add_argument("--train-modes", default="eager,layer_compile,model_compile")
    ap.add_argument("--train-layers", type=int, default=2)
    ap.add_argument("--train-tokens", type=int, default=4096, help="rows of between half this and this many tokens")
    ap.add_argument("--train-steps", type=int, default=10, help="rows timed per mode")
    ap.add_argument("--count-steps", type=int, default=200,
                    help="rows of varied lengths the whole-model compile runs over (its compilations counted)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    device = torch.device(a.device)
    result = dict(**environment(["transformers", "flash_attn"]),
                  shape=dict(heads=a.heads, kv_heads=a.kv_heads, dim=a.dim, causal=True,
                             doc_lengths=f"log-normal mean {MEAN_DOC}, sigma {DOC_SIGMA}, max {MAX_DOC}",
                             train=dict(layers=a.train_layers, hidden=a.hidden, intermediate=a.intermediate,
                                        vocab=a.vocab, tokens=f"{a.train_tokens // 2}-{a.train_tokens}",
                                        lora="r=16 on q,k,v,o,gate,up,down; NF4 base; checkpointed layers",
                                        attention=a.attention)),
                  cases=[], train=[])
    for tokens in a.tokens:  # each stage is written as it ends: a run cut short keeps what it measured
        result["cases"] += attention_cases(a, device, tokens)
        write(result, a.out)
    for mode in a.train_modes.split(","):
        steps = a.count_steps if mode == "model_compile" else a.train_steps
        try:
            result["train"].append(train(a, device, mode, steps))
        except Exception as e:  # noqa: BLE001 - a mode that fails is recorded, the others still run
            result["train"].append(dict(mode=mode, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))
            print(result["train"][-1], flush=True)
            continue
        result["compile_count_varied_lengths"] = {row["mode"]: dict(compilations=row["compilations"],
                                                                    batches=row["steps"] + 1,
                                                                    distinct_lengths=row["distinct_lengths"])
                                                  for row in result["train"] if row["mode"] != "eager"
                                                  and "error" not in row}
        write(result, a.out)


if __name__ == "__main__":
    main()
