"""GGUF export: a LoRA adapter merged into its base model, written as one GGUF
file that llama.cpp, Ollama and LM Studio load (see docs/gguf.md).

``export_gguf(adapter, base, out, type="q4_k_m")`` streams the base checkpoint
one tensor at a time: each adapted projection is merged in fp32
(``W + scaling * B @ A``, rounded once, into the output type), renamed and
permuted as llama.cpp's ``convert_hf_to_gguf.py`` does, and handed to the C++
writer (src/gguf), which quantizes it with ggml's reference quantizers and
appends it to a temporary file that becomes ``out`` only when complete.
Metadata and tokenizer keys are collected with gguf-py's own helpers
(``gguf.Metadata``, ``gguf.SpecialVocab``), so they equal the converter's.
"""
from __future__ import annotations

import ctypes
import json
import re
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from . import _lib
from ._files import read_json
from ._torch import FLOAT_DTYPES, qf_dtype
from .peft_io import adapter_dir as find_adapter_dir, read_lora_weights

__all__ = ["export_gguf", "check_export", "EXPORT_TYPES", "add_cli"]

# --type -> (qf_gguf_mix_types mix id, llama.cpp's LlamaFileType for general.file_type)
EXPORT_TYPES = {"f16": (1, 1), "bf16": (2, 32), "q8_0": (3, 7), "q4_0": (4, 2), "q4_k_m": (5, 15),
                "q5_k_m": (6, 17), "q6_k": (7, 18)}
# model_type -> (GGUF architecture, undo HF's rotary q/k permutation as LlamaModel.permute does)
_ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
          "qwen3": ("qwen3", False)}
_LAYER_TENSORS = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_GLOBAL_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# tokenizer.json pre-tokenizer regexes -> llama.cpp's tokenizer.ggml.pre
_LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_GGUF_STRING, _GGUF_ARRAY = 8, 9
# the token ids llama.cpp stops generation at (and the Modelfile's stop parameters)
_STOP_TOKEN_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
_GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")

_writer_open = _lib.declare("qf_gguf_writer_open", ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p))
_writer_free = _lib.declare("qf_gguf_writer_free", ctypes.c_void_p, restype=None)
_add_scalar = _lib.declare("qf_gguf_add_scalar", ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_void_p)
_add_string = _lib.declare("qf_gguf_add_string", ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t)
_add_array = _lib.declare("qf_gguf_add_array", ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_void_p,
                          ctypes.c_int64)
_add_string_array = _lib.declare("qf_gguf_add_string_array", ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
                                 ctypes.POINTER(ctypes.c_int64), ctypes.c_int64)
_add_tensor = _lib.declare("qf_gguf_add_tensor", ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int64),
                           ctypes.c_int32, ctypes.c_uint32)
_write_tensor = _lib.declare("qf_gguf_write_tensor", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                             ctypes.c_int)
_finish = _lib.declare("qf_gguf_finish", ctypes.c_void_p)
_mix_types = _lib.declare("qf_gguf_mix_types", ctypes.c_uint32, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int64),
                          ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_int64), ctypes.c_int64,
                          ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_uint32))


def pack_strings(strings: list[bytes]):
    """(data, offsets): `strings` concatenated, and the C array of their n + 1 start offsets (the C ABI's
    string lists)."""
    offsets = (ctypes.c_int64 * (len(strings) + 1))()
    pos = 0
    for i, s in enumerate(strings):
        offsets[i] = pos
        pos += len(s)
    offsets[len(strings)] = pos
    return b"".join(strings), offsets


class GGUFWriter:
    """The C++ GGUF writer (qf_gguf_*); discards its temporary file unless finished."""

    def __init__(self, path: Path, overwrite: bool):
        self._h = ctypes.c_void_p()
        _lib.check(_writer_open(str(path).encode(), int(overwrite), ctypes.byref(self._h)))

    def close(self) -> None:
        if self._h:
            _writer_free(self._h)
            self._h = ctypes.c_void_p()

    def add(self, key: str, value, vtype: int, sub_type: Optional[int]) -> None:
        import numpy as np

        k = key.encode()
        if vtype == _GGUF_STRING:
            b = value.encode() if isinstance(value, str) else bytes(value)
            _lib.check(_add_string(self._h, k, b, len(b)))
        elif vtype == _GGUF_ARRAY:
            if sub_type == _GGUF_STRING:
                data, offsets = pack_strings([v.encode() if isinstance(v, str) else bytes(v) for v in value])
                _lib.check(_add_string_array(self._h, k, data, offsets, len(value)))
            else:
                arr = np.ascontiguousarray(np.asarray(value, dtype=_NUMPY_OF[sub_type]))
                _lib.check(_add_array(self._h, k, sub_type, arr.ctypes.data, arr.size))
        else:
            arr = np.asarray([value], dtype=_NUMPY_OF[vtype])
            _lib.check(_add_scalar(self._h, k, vtype, arr.ctypes.data))

    def add_tensor(self, name: str, shape: tuple, ggml_type: int) -> None:
        ne = (ctypes.c_int64 * len(shape))(*reversed(shape))  # ggml order: innermost first
        _lib.check(_add_tensor(self._h, name.encode(), ne, len(shape), ggml_type))

    def write(self, t: torch.Tensor, threads: int) -> None:
        """The next tensor's data (a dtype other than fp32, fp16 and bf16 is written from fp32)."""
        t = t.detach().contiguous().cpu()
        if t.dtype not in FLOAT_DTYPES:
            t = t.float()
        _lib.check(_write_tensor(self._h, t.data_ptr(), qf_dtype(t.dtype, "GGUF tensor"), t.numel(), threads))

    def finish(self) -> None:
        _lib.check(_finish(self._h))


_NUMPY_OF = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
             12: "<f8"}


class CheckpointReader:
    """A local Hugging Face checkpoint read one tensor at a time: 16-bit, or
    bitsandbytes 4-bit (NF4 weights dequantized by qforge's NF4 core)."""

    def __init__(self, path: Path):
        from .models.loader import VISION_MODEL_TYPES, bnb_config, open_safetensors, read_config, weight_files

        self.path = path
        self.raw_config = read_config(path)
        # a vision-language model: the language model's hyperparameters at the top level, as
        # convert_hf_to_gguf reads them; its vision tensors go to the mmproj file (gguf_vision)
        self.vision_prefixes = VISION_MODEL_TYPES.get(self.raw_config["model_type"], ())
        self.config = ({**self.raw_config, **self.raw_config["text_config"]} if self.vision_prefixes
                       else self.raw_config)
        self.bnb = bnb_config(self.raw_config, path / "config.json") is not None
        self._handles, self._file = {}, {}
        for f in weight_files(path):
            self._handles[f] = open_safetensors(f)
            for k in self._handles[f].keys():
                self._file[k] = f

    def names(self) -> list[str]:
        """Weight names in file order (convert_hf_to_gguf's order), 4-bit state keys folded."""
        return [k for k in self._file if ".weight." not in k]

    def is_vision(self, name: str) -> bool:
        """A tensor of the vision tower or projector (written to the mmproj file, never merged)."""
        return bool(self.vision_prefixes) and name.startswith(self.vision_prefixes)

    def is_4bit(self, name: str) -> bool:
        from . import nf4

        return f"{name}.{nf4.QUANT_STATE_KEY}" in self._file

    def shape(self, name: str) -> tuple:
        if self.is_4bit(name):
            return tuple(self._nf4(name)[1].shape)
        return tuple(self._handles[self._file[name]].get_slice(name).get_shape())

    def _nf4(self, name: str):
        from . import nf4

        keys = [k for k in self._file if k == name or k.startswith(name + ".")]
        return nf4.from_state_dict({k: self.get_raw(k) for k in keys}, name[: -len("weight")],
                                   where=str(self._file[name]))

    def get_raw(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError

        try:
            return self._handles[self._file[name]].get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{self._file[name]}: cannot read tensor '{name}' ({e})") from None

    def get(self, name: str) -> torch.Tensor:
        """The tensor as stored (16-bit), or a 4-bit weight dequantized to fp32."""
        if self.is_4bit(name):
            from . import nf4

            packed, state = self._nf4(name)
            return nf4.dequantize(packed, state, dtype=torch.float32)
        return self.get_raw(name)


def _nf4_roundtrip(w: torch.Tensor, blocksize: int, compress_statistics: bool) -> torch.Tensor:
    """The weight the adapter was trained on: w quantized to NF4 as qforge.load(dtype=torch.bfloat16)
    does (the caller passes it in bf16), dequantized to fp32."""
    from . import nf4

    packed, state = nf4.quantize(w.contiguous(), blocksize=blocksize, compress_statistics=compress_statistics)
    return nf4.dequantize(packed, state, dtype=torch.float32)


def _gguf_name(hf_name: str) -> Optional[str]:
    """The GGUF tensor name of a HF weight (None: not exported, e.g. rotary caches). A vision-language
    model's language model (model.text_model.*) is named as convert_hf_to_gguf does: without text_model."""
    hf_name = hf_name.replace("text_model.", "", 1)
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    if m:
        short = _LAYER_TENSORS.get(m.group(2))
        return None if short is None else f"blk.{m.group(1)}.{short}.{m.group(3)}"
    base, _, leaf = hf_name.rpartition(".")
    short = _GLOBAL_TENSORS.get(base)
    return None if short is None or leaf not in ("weight", "bias") else f"{short}.{leaf}"


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's LlamaModel.permute: HF's rotary half-split layout -> llama.cpp's interleaved."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _llama3_rope_factors(cfg: dict) -> Optional[torch.Tensor]:
    """LlamaModel.generate_extra_tensors: the rope_freqs tensor of Llama 3.x rope scaling."""
    import math

    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if str(rope.get("rope_type", rope.get("type", ""))).lower() != "llama3":
        return None
    base = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _tokenizer_dir(adapter_dir: Path, base: Path) -> Path:
    """The directory whose tokenizer is exported: the adapter's (the tokenizer trained with) or the base's."""
    for d in (adapter_dir, base):
        if (d / "tokenizer.json").exists() or (d / "tokenizer.model").exists():
            return d
    raise ValueError(f"missing tokenizer files: neither {adapter_dir} nor {base} has a tokenizer.json or a "
                     "SentencePiece tokenizer.model")


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf's does_token_look_special: added tokens some models fail to mark special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _sentencepiece_vocab(tok_dir: Path, vocab_size: int):
    """tokens, scores and token types of a SentencePiece tokenizer.model (Llama 2, Mistral v0.1-v0.3),
    as convert_hf_to_gguf's _create_vocab_sentencepiece: pieces and scores from the model, control /
    unknown / unused / byte pieces typed, added_tokens.json and tokenizer_config.json's
    added_tokens_decoder on top, ids up to the model's vocab_size padded as [PADi]."""
    import gguf

    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise ValueError(f"{tok_dir / 'tokenizer.model'}: exporting a SentencePiece tokenizer needs the "
                         "sentencepiece package (pip install sentencepiece)") from None
    path = tok_dir / "tokenizer.model"
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable SentencePiece model ({e})") from None
    if sp.vocab_size() > vocab_size:
        raise ValueError(f"{path}: the tokenizer has {sp.vocab_size()} pieces, the model only {vocab_size} "
                         "embeddings (adapter/base mismatch?)")
    t = gguf.TokenType
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(t.UNUSED)] * vocab_size
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
        types[i] = int(t.UNKNOWN if sp.IsUnknown(i) else t.CONTROL if sp.IsControl(i) else
                       t.UNUSED if sp.IsUnused(i) else t.BYTE if sp.IsByte(i) else t.NORMAL)

    def put(i: int, token: str, ttype: int, where: Path) -> None:
        if not 0 <= i < vocab_size:
            raise ValueError(f"{where}: added token {token!r} has id {i}, outside the model's {vocab_size} "
                             "embeddings")
        tokens[i], scores[i], types[i] = token, -1000.0, ttype

    if (tok_dir / "added_tokens.json").is_file():
        for token, i in read_json(tok_dir / "added_tokens.json", "added tokens").items():
            put(int(i), token, int(t.USER_DEFINED), tok_dir / "added_tokens.json")
    added, where = {}, tok_dir / "tokenizer_config.json"
    if where.is_file():
        added = read_json(where, "the tokenizer configuration").get("added_tokens_decoder") or {}
    if not added and (tok_dir / "tokenizer.json").is_file():
        # transformers 5 keeps added tokens in tokenizer.json only, where the converter does not look
        # (its file then lacks them): read them there, as transformers 4 wrote them to the config
        where = tok_dir / "tokenizer.json"
        added = {t["id"]: t for t in read_json(where, "the tokenizer").get("added_tokens") or []}
    for i, data in added.items():
        token = data["content"]
        if data.get("special") or _looks_special(token):
            put(int(i), token, int(t.CONTROL), where)
        else:  # user-defined tokens' spaces pre-normalized
            put(int(i), token.replace("\u2581", " "), int(t.USER_DEFINED), where)
    return tokens, scores, types


def _tokenizer_pre(tok_json: dict, where: Path) -> str:
    """llama.cpp's name for the BPE pre-tokenizer (convert_hf_to_gguf hashes test-string tokens; the
    regexes below are what those published tokenizers use)."""
    def walk(p):
        if not p:
            return []
        if p.get("type") == "Sequence":
            return [x for q in p.get("pretokenizers", []) for x in walk(q)]
        return [p]

    parts = walk(tok_json.get("pre_tokenizer"))
    splits = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if splits == [_LLAMA3_REGEX]:
        return "llama-bpe"
    if splits == [_QWEN2_REGEX]:
        return "qwen2"
    if not splits and len(byte_level) == 1 and byte_level[0].get("use_regex", True):
        return "gpt-2"
    raise ValueError(f"{where}: the tokenizer's pre-tokenizer is not one qforge recognizes "
                     "(Llama 3 'llama-bpe', Qwen2 'qwen2' or GPT-2 byte-level)")


def _vocab(tok_dir: Path, vocab_size: int):
    """tokens, token types and tokenizer.ggml.pre, as convert_hf_to_gguf's get_vocab_base."""
    import gguf
    from transformers import AutoTokenizer

    tok_json = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if tok_json.get("model", {}).get("type") != "BPE":
        raise ValueError(f"{tok_dir / 'tokenizer.json'}: tokenizer model {tok_json.get('model', {}).get('type')!r} "
                         "is not supported (only BPE)")
    pre = _tokenizer_pre(tok_json, tok_dir / "tokenizer.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{tok_dir}: cannot load the tokenizer ({e})") from None
    vocab = tokenizer.vocab
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"{tok_dir}: the tokenizer has id {max(vocab.values())}, the model only {vocab_size} "
                         "embeddings (adapter/base mismatch?)")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(int(gguf.TokenType.CONTROL))
            else:
                token = token.replace("\u2581", " ")
                types.append(int(gguf.TokenType.USER_DEFINED))
        else:
            types.append(int(gguf.TokenType.NORMAL))
        tokens.append(token)
    return tokens, types, pre


def _metadata(arch: str, cfg: dict, base: Path, tok_dir: Path, file_type: int, total_params: int) -> list:
    """(key, value, type, sub_type) in convert_hf_to_gguf's order, collected with gguf-py's
    own GGUFWriter (as a key/value recorder: it writes no file) and helpers."""
    import gguf

    rec = gguf.GGUFWriter(None, arch)
    meta = gguf.Metadata.load(None, base, None, total_params)
    if meta.name is None:
        meta.name = base.name
    if meta.size_label is None and total_params > 0:
        meta.size_label = gguf.size_label(total_params, 0, 0, 0)
    rec.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(rec)
    rec.add_block_count(cfg["num_hidden_layers"])
    if (n_ctx := cfg.get("max_position_embeddings")) is not None:
        rec.add_context_length(n_ctx)
    rec.add_embedding_length(cfg["hidden_size"])
    rec.add_feed_forward_length(cfg["intermediate_size"])
    rec.add_head_count(cfg["num_attention_heads"])
    if (kv := cfg.get("num_key_value_heads")) is not None:
        rec.add_head_count_kv(kv)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type == "linear" and rope.get("factor") is not None:
        rec.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        rec.add_rope_scaling_factor(rope["factor"])
    elif rope_type == "yarn" and rope.get("factor") is not None:
        rec.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        rec.add_rope_scaling_factor(rope["factor"])
        rec.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif rope_type not in (None, "default", "llama3"):
        raise ValueError(f"{base / 'config.json'}: rope type {rope_type!r} is not supported by the GGUF export")
    if (theta := rope.get("rope_theta", cfg.get("rope_theta"))) is not None:
        rec.add_rope_freq_base(theta)
    if (eps := cfg.get("rms_norm_eps")) is not None:
        rec.add_layer_norm_rms_eps(eps)
    if (head_dim := cfg.get("head_dim")) is not None:
        rec.add_key_length(head_dim)
        rec.add_value_length(head_dim)
    rec.add_file_type(file_type)
    if arch == "llama":
        rec.add_vocab_size(cfg["vocab_size"])
        rec.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    rec.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tok_cfg = tok_dir / "tokenizer_config.json"
    tok_cfg = read_json(tok_cfg, "the tokenizer configuration") if tok_cfg.is_file() else {}
    if arch == "llama" and isinstance(tok_cfg, dict) and tok_cfg.get("add_prefix_space") is not None:
        rec.add_add_space_prefix(tok_cfg["add_prefix_space"])  # LlamaModel.set_vocab, before the vocabulary
    if (tok_dir / "tokenizer.model").exists():  # the converter's set_vocab tries SentencePiece first
        tokens, scores, types = _sentencepiece_vocab(tok_dir, cfg["vocab_size"])
        rec.add_tokenizer_model("llama")
        rec.add_tokenizer_pre("default")
        rec.add_token_list(tokens)
        rec.add_token_scores(scores)
        rec.add_token_types(types)
        special = gguf.SpecialVocab(tok_dir, n_vocab=len(tokens))
    else:
        tokens, types, pre = _vocab(tok_dir, cfg["vocab_size"])
        rec.add_tokenizer_model("gpt2")
        rec.add_tokenizer_pre(pre)
        rec.add_token_list(tokens)
        rec.add_token_types(types)
        special = gguf.SpecialVocab(tok_dir, load_merges=True)
        if not special.merges:
            raise ValueError(f"{tok_dir / 'tokenizer.json'}: the BPE tokenizer has no merges")
    if isinstance(special.chat_template, str):  # llama.cpp's template loaders reject {% generation %}
        special.chat_template = _GENERATION_TAG.sub("", special.chat_template)
    special.add_to_gguf(rec, quiet=True)
    _check_end_of_turn(rec, tokens, tok_dir)
    return recorded_metadata(rec)


def recorded_metadata(rec) -> list:
    """(key, value, type, sub_type) of what a gguf.GGUFWriter recorded, in order."""
    import gguf

    out = []
    for k, v in rec.kv_data[0].items():
        sub = v.sub_type
        if v.type == gguf.GGUFValueType.ARRAY and sub is None:  # GGUFWriter infers it from the first element
            sub = gguf.GGUFValueType.get_type(v.value[0])
        out.append((k, v.value, int(v.type), None if sub is None else int(sub)))
    return out


def _check_end_of_turn(rec, tokens: list[str], tok_dir: Path) -> None:
    """llama.cpp stops generation at eos/eot/eom: an end-of-turn token the chat template emits
    must be one of them, or the exported model never stops."""
    kv = rec.kv_data[0]
    template = kv.get("tokenizer.chat_template")
    if template is None or "tokenizer.ggml.eos_token_id" not in kv:
        return
    stops = {kv[k].value for k in _STOP_TOKEN_KEYS if k in kv}
    for marker in ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>"):
        if marker in str(template.value) and marker in tokens and tokens.index(marker) not in stops:
            rec.add_eot_token_id(tokens.index(marker))
            return


def _plan(ckpt: CheckpointReader, cfg: dict, arch_name: str) -> list[tuple[str, Optional[str], tuple]]:
    """(gguf name, hf name or None for generated tensors, HF shape) in convert_hf_to_gguf's order."""
    plan = []
    rope = _llama3_rope_factors(cfg) if arch_name == "llama" else None
    if rope is not None:
        plan.append(("rope_freqs.weight", None, tuple(rope.shape)))
    tied = cfg.get("tie_word_embeddings", False)
    for hf in ckpt.names():
        name = None if ckpt.is_vision(hf) else _gguf_name(hf)
        if name is None:
            continue
        if name == "output.weight" and tied:
            continue  # convert_hf_to_gguf drops a tied lm_head too
        plan.append((name, hf, ckpt.shape(hf)))
    return plan


def export_gguf(adapter, base, out, type: str = "q4_k_m", merge_into: str = "original", overwrite: bool = False,
                threads: int = 0, progress: bool = True, blocksize: int = 64,
                compress_statistics: bool = True, check: bool = False, max_kl: Optional[float] = None,
                ollama: bool = False, mmproj=None) -> Path:
    """Merge a LoRA adapter (a PEFT directory or a `qforge train` run directory)
    into the base model at ``base`` and write one GGUF file at ``out``.

    type: f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m or q6_k (per-tensor types as
    llama-quantize chooses them). merge_into: "original" merges into the 16-bit
    base weights (what the ecosystem does; the 4-bit rounding the adapter was
    trained against is gone), "dequantized" into the NF4-dequantized weights
    the adapter was trained on (blocksize/compress_statistics as at training).
    ``out`` is written complete or not at all; an existing file is refused
    unless overwrite. check: run the quality gate (check_export) on the file.
    ollama: also write an Ollama ``Modelfile`` beside it (write_modelfile).
    mmproj: for a vision-language base (Idefics3 / SmolVLM), also write the
    vision encoder + projector as llama.cpp's mmproj GGUF at this path
    (qforge.gguf_vision; f16 unless type is bf16 or q8_0).
    Raises ValueError naming the problem."""
    if type not in EXPORT_TYPES:
        raise ValueError(f"unknown GGUF type {type!r}; choose one of {', '.join(EXPORT_TYPES)}")
    if merge_into not in ("original", "dequantized"):
        raise ValueError(f"merge_into must be 'original' or 'dequantized', got {merge_into!r}")
    out, base = Path(out), Path(base)
    if out.exists() and not overwrite:
        raise ValueError(f"{out}: the output file already exists (pass overwrite=True / --overwrite to replace it)")
    if ollama and (out.parent / "Modelfile").exists() and not overwrite:
        raise ValueError(f"{out.parent / 'Modelfile'}: already exists (pass overwrite=True / --overwrite)")
    if mmproj is not None and Path(mmproj).exists() and not overwrite:
        raise ValueError(f"{mmproj}: the mmproj output file already exists (pass overwrite=True / --overwrite)")
    adapter_dir = find_adapter_dir(adapter)
    lora = read_lora_weights(adapter_dir)
    ckpt = CheckpointReader(base)
    mmproj_plan = None
    if mmproj is not None:
        from .gguf_vision import plan_mmproj

        mmproj_plan = plan_mmproj(ckpt, type)  # every check before the first file is written
    cfg = ckpt.config
    arch_name, permute = _ARCHS[cfg["model_type"]]
    if ckpt.bnb and merge_into == "original":
        raise ValueError(f"{base}: a bitsandbytes 4-bit checkpoint has no original 16-bit weights; "
                         "use merge_into='dequantized' (or point base at the 16-bit model)")
    tok_dir = _tokenizer_dir(adapter_dir, base)
    plan = _plan(ckpt, cfg, arch_name)
    hf_shapes = {hf: shape for _, hf, shape in plan if hf is not None}
    for module, (a, b) in lora.tensors.items():
        weight = module + ".weight"
        if ckpt.is_vision(weight):
            raise ValueError(f"adapter/base mismatch: {lora.path} adapts '{module}' of the vision tower, which "
                             "qforge keeps frozen (the mmproj file is written from the base weights)")
        if weight not in hf_shapes:
            raise ValueError(f"adapter/base mismatch: {lora.path} adapts '{module}', which {base} does not have")
        out_f, in_f = hf_shapes[weight]  # _plan read it (a 4-bit weight's shape costs reading the weight)
        if tuple(a.shape) != (a.shape[0], in_f) or tuple(b.shape) != (out_f, b.shape[1]):
            raise ValueError(f"adapter/base mismatch: '{module}' has LoRA A {tuple(a.shape)}, B {tuple(b.shape)}; "
                             f"the base weight is {(out_f, in_f)}")

    mix, file_type = EXPORT_TYPES[type]
    names = [n for n, _, _ in plan]
    data, offsets = pack_strings([n.encode() for n in names])
    n_dims = (ctypes.c_int32 * len(plan))(*[len(s) for _, _, s in plan])
    ne0 = (ctypes.c_int64 * len(plan))(*[s[-1] for _, _, s in plan])
    ggml_types = (ctypes.c_uint32 * len(plan))()
    n_layer = cfg["num_hidden_layers"]
    is_70b = arch_name == "llama" and n_layer == 80 and cfg["num_attention_heads"] != cfg.get("num_key_value_heads")
    _lib.check(_mix_types(mix, data, offsets, n_dims, ne0, len(plan), n_layer, int(is_70b), ggml_types))
    total_params = sum(int(torch.Size(s).numel()) for n, _, s in plan if n != "rope_freqs.weight")
    metadata = _metadata(arch_name, cfg, base, tok_dir, file_type, total_params)

    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    bar = progress_bar(len(plan), f"export {out.name} ({type})", progress)
    writer = GGUFWriter(out, overwrite)
    try:
        for key, value, vtype, sub in metadata:
            writer.add(key, value, vtype, sub)
        for (name, _, shape), t in zip(plan, ggml_types):
            writer.add_tensor(name, shape, int(t))
        for name, hf, shape in plan:
            if hf is None:
                tensor = _llama3_rope_factors(cfg)
            else:
                tensor = ckpt.get(hf)
                module = hf[: -len(".weight")] if hf.endswith(".weight") else None
                if module in lora.tensors:
                    w = tensor.float()
                    if merge_into == "dequantized" and not ckpt.is_4bit(hf):
                        w = _nf4_roundtrip(tensor.to(torch.bfloat16), blocksize, compress_statistics)
                    a, b = lora.tensors[module]
                    tensor = w + (b.float() @ a.float()) * lora.scaling
                elif merge_into == "dequantized" and not ckpt.is_4bit(hf) and _is_quantized_projection(hf):
                    tensor = _nf4_roundtrip(tensor.to(torch.bfloat16), blocksize, compress_statistics)
                if permute and name.startswith("blk.") and ".attn_q." in name:
                    tensor = _permute(tensor, n_head)
                elif permute and name.startswith("blk.") and ".attn_k." in name:
                    tensor = _permute(tensor, n_kv)
            writer.write(tensor, threads)
            bar(name)
        writer.finish()
    finally:
        writer.close()
        bar(None)
    if mmproj_plan is not None:
        from .gguf_vision import write_mmproj

        write_mmproj(mmproj_plan, Path(mmproj), overwrite=overwrite, threads=threads, progress=progress)
    if check:
        check_export(out, adapter_dir, base, type, max_kl=max_kl, tok_dir=tok_dir, threads=threads)
    if ollama:
        write_modelfile(out, metadata)
    return out


def write_modelfile(gguf_path: Path, metadata: list) -> Path:
    """An Ollama Modelfile beside the GGUF: FROM the file, and a stop parameter for each of its
    end-of-generation tokens (eos, eot, eom), so `ollama run` stops at the end of a turn. The chat
    template travels inside the GGUF (tokenizer.chat_template), where Ollama reads it."""
    from ._files import atomic_write_text

    kv = {k: v for k, v, _, _ in metadata}
    tokens = kv.get("tokenizer.ggml.tokens", [])
    stops = []
    for key in _STOP_TOKEN_KEYS:
        tid = kv.get(key)
        if tid is not None and 0 <= tid < len(tokens) and tokens[tid] not in stops:
            stops.append(tokens[tid])
    lines = [f"FROM ./{gguf_path.name}"] + [f"PARAMETER stop {json.dumps(t)}" for t in stops]
    path = gguf_path.parent / "Modelfile"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def check_export(out, adapter, base, type: str, max_kl: Optional[float] = None, tok_dir: Optional[Path] = None,
                 threads: int = 0) -> float:
    """The quality gate: mean per-token KL divergence (nats) between the adapter model and the
    exported file in llama.cpp (qforge.gguf_check). Above max_kl (default: gguf_check.MAX_KL of
    the type; no bound for the 4-6 bit types unless given) the file is deleted and ValueError
    raised, so a broken export is never shipped. Returns the KL."""
    from .gguf_check import MAX_KL, mean_kl

    adapter_dir = find_adapter_dir(adapter)
    tok_dir = tok_dir or _tokenizer_dir(adapter_dir, Path(base))
    kl = mean_kl(out, adapter_dir, base, tok_dir=tok_dir, threads=threads)
    bound = max_kl if max_kl is not None else MAX_KL.get(type)
    if bound is not None and not kl <= bound:
        Path(out).unlink(missing_ok=True)
        raise ValueError(f"{out}: quality check failed: mean per-token KL divergence {kl:.5f} from the adapter "
                         f"model exceeds {bound} for {type}; the file was deleted")
    return kl


def _is_quantized_projection(hf_name: str) -> bool:
    """The projections qforge.load quantizes to NF4 (its default target modules)."""
    from .nn import DEFAULT_TARGETS

    return ".layers." in hf_name and hf_name.rsplit(".", 2)[-2] in DEFAULT_TARGETS


def progress_bar(total: int, desc: str, enabled: bool) -> Callable[[Optional[str]], None]:
    """A tqdm bar on stderr (a no-op when disabled or tqdm is missing); call with None to close."""
    bar = None
    if enabled:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, leave=False)
        except ImportError:
            bar = None

    def step(name: Optional[str]) -> None:
        if bar is None:
            return
        if name is None:
            bar.close()
        else:
            bar.set_postfix_str(name, refresh=False)
            bar.update(1)

    return step


# ------------------------------------------------------------------ CLI
def _cli(args) -> int:
    out = export_gguf(args.adapter, args.base, args.out, type=args.type, merge_into=args.merge_into,
                      overwrite=args.overwrite, threads=args.threads, progress=not args.quiet, ollama=args.ollama,
                      mmproj=args.mmproj)
    print(f"wrote {out}")
    if args.mmproj:
        print(f"wrote {args.mmproj}")
    if args.check:
        kl = check_export(out, args.adapter, args.base, args.type, max_kl=args.max_kl, threads=args.threads)
        print(f"quality check: mean per-token KL divergence from the adapter model {kl:.6f} nats")
    return 0


def add_cli(sub) -> None:
    """`qforge export gguf RUN_DIR_OR_ADAPTER --base MODEL_DIR --out model.gguf --type ...`"""
    export = sub.add_parser("export", help="export a fine-tuned model (GGUF for llama.cpp / Ollama)")
    kinds = export.add_subparsers(dest="export_format", required=True)
    p = kinds.add_parser("gguf", help="merge the LoRA adapter and write one GGUF file")
    p.add_argument("adapter", help="a PEFT adapter directory or a `qforge train` run directory")
    p.add_argument("--base", required=True, help="the base model's Hugging Face directory")
    p.add_argument("--out", required=True, help="the GGUF file to write")
    p.add_argument("--type", choices=tuple(EXPORT_TYPES), default="q4_k_m")
    p.add_argument("--merge-into", choices=("original", "dequantized"), default="original",
                   help="merge into the base's 16-bit weights (default) or the NF4-dequantized ones trained on")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--threads", type=int, default=0, help="quantization threads (0: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--ollama", action="store_true", help="also write an Ollama Modelfile beside the GGUF")
    p.add_argument("--mmproj", default=None, metavar="PATH",
                   help="vision-language base (Idefics3/SmolVLM): also write the vision encoder + projector "
                        "as llama.cpp's mmproj GGUF here")
    p.add_argument("--check", action="store_true",
                   help="run the file in llama.cpp (llama-cpp-python) and compare with the adapter model (KL)")
    p.add_argument("--max-kl", type=float, default=None,
                   help="the check's bound in nats per token (default 0.01 for f16/bf16/q8_0, none otherwise)")
    p.set_defaults(func=_cli)
