"""The export's quality gate: mean per-token KL divergence between the adapter
model (transformers, fp32, base + LoRA) and the exported GGUF file run in
llama.cpp (the `llama_cpp` package: ``pip install llama-cpp-python``), over a
fixed prompt set. ``qforge export gguf --check`` / ``export_gguf(check=True)``
fails an export whose KL exceeds the type's bound."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

__all__ = ["mean_kl", "MAX_KL", "PROMPTS"]

# Bounds the gate enforces by default (nats per token); other types report only.
MAX_KL = {"f16": 0.01, "bf16": 0.01, "q8_0": 0.01}
PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Question: what is 12 + 30?\nAnswer: 42",
    "Paris is the capital of France, and Berlin is the capital of",
)
_MAX_PROMPT_TOKENS = 256


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise ValueError("the GGUF quality check runs the file in llama.cpp: install llama-cpp-python "
                         "(pip install llama-cpp-python) or export without --check") from None
    return llama_cpp


def _adapter_model(adapter_dir: Path, base: Path):
    """transformers' model of `base` in fp32 with every adapted weight merged in fp32 (a
    vision-language base: its *ForConditionalGeneration model, run on text)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from .models.loader import VISION_MODEL_TYPES, read_config
    from .peft_io import read_lora_weights

    lora = read_lora_weights(adapter_dir)
    auto = AutoModelForImageTextToText if read_config(base)["model_type"] in VISION_MODEL_TYPES else \
        AutoModelForCausalLM
    model = auto.from_pretrained(str(base), dtype=torch.float32, local_files_only=True).eval()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (a, b) in lora.tensors.items():
            w = modules[name].weight
            w.copy_(w.float() + (b.float() @ a.float()) * lora.scaling)
    return model


def _token_ids(tok_dir: Path, prompts) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    ids = []
    for p in prompts:
        t = tok(p, add_special_tokens=True)["input_ids"][:_MAX_PROMPT_TOKENS]
        if len(t) >= 2:
            ids.append(t)
    if not ids:
        raise ValueError(f"{tok_dir}: the tokenizer makes no prompt of 2 or more tokens")
    return ids


def mean_kl(gguf_path, adapter_dir, base, tok_dir: Optional[Path] = None, prompts=PROMPTS, threads: int = 0) -> float:
    """Mean over all prompt tokens of KL(adapter model || GGUF file), in nats."""
    import os

    llama_cpp = _llama_cpp()
    base, adapter_dir = Path(base), Path(adapter_dir)
    model = _adapter_model(adapter_dir, base)
    ids = _token_ids(tok_dir or base, prompts)
    n_ctx = max(len(t) for t in ids)
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                          n_threads=threads or os.cpu_count() or 1)
    total, count = 0.0, 0
    try:
        for t in ids:
            llm.reset()
            llm.eval(t)
            q = torch.log_softmax(torch.tensor(llm.scores[: len(t)], dtype=torch.float64), -1)
            with torch.no_grad():
                p = torch.log_softmax(model(torch.tensor([t])).logits[0].double(), -1)
            total += float((p.exp() * (p - q)).sum(-1).sum())
            count += len(t)
    finally:
        llm.close()
    return total / count
