"""The embedded default model: a tiny Llama-architecture causal LM with random
weights and a byte-level BPE tokenizer trained on the given texts, both built by
code (no download), with the Llama 3.1 chat template (tool calling included)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer (GPT-2/Llama 3 style pre-tokenisation) trained
    on ``texts``, with Llama 3's special tokens and the Llama 3.1 chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..chat import llama3_template

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|finetune_right_pad_id|>")
    fast.chat_template = llama3_template("3.1")
    return fast


def tiny_llama_config(vocab_size: int, hidden: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                      intermediate: int = 352, max_positions: int = 2048, init_std: float = 0.08, tokenizer=None):
    from transformers import LlamaConfig

    kw = {}
    if tokenizer is not None:
        kw = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       rope_theta=500000.0, initializer_range=init_std, **kw)


def build_tiny_model(config, seed: int = 0):
    """transformers' LlamaForCausalLM with its own random initialisation, seeded.
    The default init_std (0.08, not Llama's 0.02) gives the frozen random LM head
    a logit range wide enough for LoRA training to lower the loss visibly."""
    from transformers import AutoModelForCausalLM

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(state)
    return model


def write_default_model(path, texts: Iterable[str], seed: int = 0, **shape) -> Path:
    """Build the tokenizer and random model and save both as a Hugging Face
    directory (16-bit safetensors + tokenizer files) at ``path``."""
    path = Path(path)
    tok = build_tokenizer(texts)
    config = tiny_llama_config(len(tok), tokenizer=tok, **shape)
    model = build_tiny_model(config, seed)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.to(torch.bfloat16).save_pretrained(str(tmp))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tok.save_pretrained(str(tmp))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.replace(path)
    return path
