"""Local Hugging Face directories -> transformers models with qforge NF4 layers."""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from .. import nf4
from .._files import atomic_save_safetensors, atomic_write_text, read_json
from ..nn import DEFAULT_TARGETS, NF4Linear, is_target_module

# Gemma 2 (sliding window on every other layer, attention and final-logit softcaps) and Gemma 3's
# text model ("gemma3_text": local sliding and global layers, q/k norms) train through
# qforge.attention like the rest.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
# vision-language families: model_type -> the prefixes of the frozen 16-bit vision tower
# and projector (everything else is the language model, quantized and adapted as usual)
VISION_MODEL_TYPES = {"idefics3": ("model.vision_model.", "model.connector.")}
_QUANT_KEY = "weight." + nf4.QUANT_STATE_KEY
_LAYER = re.compile(r"(?:.*\.)?layers\.\d+")  # a decoder layer's module name (prefix of its tensors' names)


def default_device() -> torch.device:
    from .._lib import built_with_cuda

    return torch.device("cuda" if torch.cuda.is_available() and built_with_cuda() else "cpu")


def read_config(path: Path) -> dict:
    """config.json of the model directory `path`; ValueError naming what is missing or not supported."""
    if not path.exists():
        raise ValueError(f"{path}: no such model directory")
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory (qforge.load expects a local Hugging Face model directory)")
    cfg_path = path / "config.json"
    raw = read_json(cfg_path, "not a Hugging Face model directory")
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type in VISION_MODEL_TYPES:
        text = raw.get("text_config")
        text_type = text.get("model_type") if isinstance(text, dict) else None
        if text_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{cfg_path}: {model_type} with a {text_type!r} language model is not supported; "
                             f"qforge supports {', '.join(SUPPORTED_MODEL_TYPES)} language models")
        return raw
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = raw.get("architectures")
        arch = ", ".join(map(str, archs)) if isinstance(archs, list) and archs else "no architectures listed"
        raise ValueError(f"{cfg_path}: unsupported architecture model_type={model_type!r} ({arch}); "
                         f"qforge supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    return raw


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of the model directory `path` (its index's shards, or model.safetensors);
    ValueError for a partial checkpoint or one that is not safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        doc = read_json(index, "the safetensors index")
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: not a valid safetensors index ('weight_map' must be a non-empty JSON object "
                             f"of tensor name -> file name, got {type(weight_map).__name__})")
        bad = next((v for v in weight_map.values() if not isinstance(v, str) or not v.endswith(".safetensors")
                    or Path(v).name != v), None) if weight_map else None
        if bad is not None:
            raise ValueError(f"{index}: weight_map value {bad!r} is not a .safetensors file name in the directory")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise ValueError(f"{path}: partial checkpoint: {len(missing)} of {len(files)} shards listed in "
                             f"{index.name} are missing ({', '.join(missing[:3])}{'...' if len(missing) > 3 else ''})")
        return [path / f for f in files]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ValueError(f"{path}: only safetensors checkpoints are read (found .bin/.pt files; "
                         "convert with transformers' save_pretrained(safe_serialization=True))")
    raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json")


def open_safetensors(f: Path):
    """safetensors' reader of `f` (CPU tensors); ValueError naming the file if it cannot be read."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(f), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{f}: not a readable safetensors file ({e})") from None


def bnb_config(raw: dict, where: Path) -> Optional[dict]:
    """The quantization_config of a bitsandbytes 4-bit (nf4) checkpoint's config `raw`, None for a
    16-bit one; ValueError naming `where` for any other quantization."""
    q = raw.get("quantization_config")
    if not q:
        return None
    if not isinstance(q, dict):
        raise ValueError(f"{where}: quantization_config must be a JSON object, got {type(q).__name__}")
    method = q.get("quant_method")
    if method != "bitsandbytes" or not q.get("load_in_4bit", False):
        raise ValueError(f"{where}: quantization_config {method!r} "
                         f"{'(8-bit) ' if q.get('load_in_8bit') else ''}is not supported; "
                         "qforge reads bitsandbytes 4-bit (nf4) checkpoints or 16-bit ones")
    if q.get("bnb_4bit_quant_type", "nf4") != "nf4":
        raise ValueError(f"{where}: bnb_4bit_quant_type {q.get('bnb_4bit_quant_type')!r} is not supported (only nf4)")
    return q


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> bool:
    mod_name, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        return False
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        return True
    if leaf in module._buffers:
        module._buffers[leaf] = value
        return True
    return False


# Checkpoint tensors transformers itself drops without a word: rotary caches that
# older versions saved (each model class may list more in _keys_to_ignore_on_load_unexpected).
_IGNORED_UNUSED = (r"(^|\.)rotary_emb\.inv_freq$",)


def _report_unused(unused: list[str], key_file: dict, model: nn.Module, raw: dict) -> None:
    """Tensors of the checkpoint that no module of the model takes: an error naming
    them and their files (a config.json that disagrees with the weights, e.g. fewer
    layers, would otherwise drop them silently); a warning for those transformers
    also ignores."""
    import re
    import warnings

    patterns = list(_IGNORED_UNUSED) + list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    ignorable = [k for k in unused if any(re.search(p, k) for p in patterns)]
    if ignorable:
        warnings.warn(f"{key_file[ignorable[0]].parent}: ignoring {len(ignorable)} checkpoint tensors the model does "
                      f"not use ({', '.join(ignorable[:4])}{', ...' if len(ignorable) > 4 else ''})", stacklevel=3)
    errors = [k for k in unused if k not in ignorable]
    if errors:
        files = sorted({key_file[k].name for k in errors})
        raise ValueError(
            f"{key_file[errors[0]].parent}: {len(errors)} tensors in {', '.join(files)} are not used by the model "
            f"that config.json describes ({raw.get('model_type')}, num_hidden_layers="
            f"{raw.get('num_hidden_layers')}): {', '.join(errors[:4])}{', ...' if len(errors) > 4 else ''}; "
            "config.json and the weights disagree")


def _is_quant_target(name: str, module: nn.Module, targets, frozen: tuple = ()) -> bool:
    return (isinstance(module, nn.Linear) and ".layers." in f".{name}" and is_target_module(name, targets)
            and not f"{name}.".startswith(frozen))


def _meta_model(path: Path, raw: dict, dtype: torch.dtype, attn_implementation: Optional[str] = None):
    """(the model config.json describes, on the meta device; its config; the
    prefixes of its frozen vision tower, () for a text model)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    frozen = VISION_MODEL_TYPES.get(raw["model_type"], ())
    auto = AutoModelForImageTextToText if frozen else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model, config, frozen


def load(path, load_in_4bit: bool = True, dtype: torch.dtype = torch.bfloat16, max_seq_length: Optional[int] = None,
         device=None, blocksize: int = 64, compress_statistics: bool = True,
         target_modules: Iterable[str] = DEFAULT_TARGETS, attn_implementation: Optional[str] = None,
         prepare_layer: Optional[Callable[[nn.Module], None]] = None):
    """A transformers ``*ForCausalLM`` from a local directory, its decoder-layer
    projections (``target_modules``) as frozen ``NF4Linear`` layers (or plain
    frozen 16-bit linears with ``load_in_4bit=False``). Embeddings, norms and the
    LM head stay in ``dtype``. Every parameter is frozen; add adapters with
    ``qforge.add_lora``. A vision-language model (VISION_MODEL_TYPES: Idefics3 /
    SmolVLM) loads as transformers' ``*ForConditionalGeneration``: its language
    model as above, its vision tower and projector frozen in ``dtype``
    (``model.qforge_frozen_prefixes``, which add_lora leaves alone).
    ``attn_implementation``: transformers' name ("qforge" once
    ``qforge.attention.register_with_transformers`` ran); None takes transformers' default for the
    family (sdpa, or eager for Gemma 2). Errors (missing/partial checkpoint, unsupported
    architecture, truncated file) raise ValueError naming the file.

    The model is built on the meta device and filled one decoder layer at a
    time, then the rest (embeddings, final norm, ``lm_head``, a vision tower);
    the files are mapped only while a layer is read. ``prepare_layer(layer)``
    runs on each decoder layer as soon as it is loaded, before the next is read:
    with FSDP2's ``fully_shard`` there (``qforge.distributed.shard_module``),
    each rank frees the rows it does not own at once, so no rank ever holds more
    than its shards plus one whole layer."""
    from safetensors import SafetensorError

    path = Path(path)
    raw = read_config(path)
    bnb = bnb_config(raw, path / "config.json")
    if bnb is not None and not load_in_4bit:
        raise ValueError(f"{path}: a bitsandbytes 4-bit checkpoint needs load_in_4bit=True")
    files = weight_files(path)
    device = torch.device(device) if device is not None else default_device()
    targets = tuple(target_modules)

    model, config, frozen = _meta_model(path, raw, dtype, attn_implementation)
    modules = dict(model.named_modules())
    quant_names = {n for n, m in modules.items() if load_in_4bit and _is_quant_target(n, m, targets, frozen)}

    key_file: dict[str, Path] = {}
    for f in files:
        with open_safetensors(f) as handle:
            key_file.update((k, f) for k in handle.keys())
    handles: dict[Path, object] = {}

    def get(key: str) -> torch.Tensor:
        f = key_file[key]
        try:
            if f not in handles:
                handles[f] = open_safetensors(f)
            return handles[f].get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{f}: cannot read tensor '{key}' ({e})") from None

    loaded = set()
    unused: list[str] = []
    prepared: set[str] = set()  # layers handed to prepare_layer (which may add trainable weights)

    def load_quantized(name: str, unit_keys: list[str]) -> None:
        """`name` as an NF4Linear; `unit_keys`: the keys of its decoder layer (or of the rest)."""
        wkey, bkey = f"{name}.weight", f"{name}.bias"
        lin = modules[name]
        if wkey not in key_file:
            return  # reported as missing below
        bias = get(bkey).to(device, dtype) if bkey in key_file else None
        if bias is None and lin.bias is not None:
            return
        if f"{name}.{_QUANT_KEY}" in key_file:
            tensors = {k: get(k) for k in unit_keys if k == wkey or k.startswith(wkey + ".")}
            packed, state = nf4.from_state_dict(tensors, f"{name}.", device=device, where=str(key_file[wkey]))
            if tuple(state.shape) != (lin.out_features, lin.in_features):
                raise ValueError(f"{key_file[wkey]}: '{wkey}' has shape {tuple(state.shape)}, the model "
                                 f"expects {(lin.out_features, lin.in_features)}")
            state.dtype = dtype
            q = NF4Linear.from_quantized(packed, state, bias)
        else:
            if bnb is not None:
                raise ValueError(f"{key_file[wkey]}: '{wkey}' is not quantized in a bnb-4bit checkpoint")
            w = get(wkey)
            if tuple(w.shape) != (lin.out_features, lin.in_features):
                raise ValueError(f"{key_file[wkey]}: '{wkey}' has shape {tuple(w.shape)}, the model expects "
                                 f"{(lin.out_features, lin.in_features)}")
            q = NF4Linear.from_weight(w, bias, blocksize, compress_statistics, device=device, dtype=dtype)
            del w
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, q)
        loaded.update(k for k in unit_keys if k == wkey or k.startswith(wkey + ".") or k == bkey)

    def load_plain(key: str) -> None:
        if key.endswith(_QUANT_KEY) or ".weight." in key:
            owner = key.split(".weight.")[0]
            if owner not in quant_names:
                raise ValueError(f"{key_file[key]}: '{owner}' is 4-bit in the checkpoint but not a quantizable "
                                 f"projection of this model (targets {list(targets)})")
            return
        mod_name, _, leaf = key.rpartition(".")
        target = modules.get(mod_name)
        if target is None or (leaf not in target._parameters and leaf not in target._buffers):
            unused.append(key)
            return
        t = get(key)  # a view of the mapped file: copied, so that the mapping goes with the layer
        t = t.to(device, dtype, copy=True) if t.is_floating_point() else t.to(device, copy=True)
        if leaf in target._parameters and target._parameters[leaf] is not None \
                and tuple(target._parameters[leaf].shape) != tuple(t.shape):
            raise ValueError(f"{key_file[key]}: '{key}' has shape {tuple(t.shape)}, the model expects "
                             f"{tuple(target._parameters[leaf].shape)}")
        _set_tensor(model, key, t)

    # one unit per decoder layer of the language model (in order), then the rest of the model
    layer_names = {n for n in modules if _LAYER.fullmatch(n) and not f"{n}.".startswith(frozen)}

    def unit_of(name: str) -> Optional[str]:
        """The decoder layer a name belongs to, or None (a vision tower's layers, and layers
        that config.json does not have, go with the rest: the latter are reported as unused)."""
        m = _LAYER.match(name)
        return m[0] if m and m[0] in layer_names else None

    keys_of, quant_of = defaultdict(list), defaultdict(list)
    for k in key_file:
        keys_of[unit_of(k)].append(k)
    for n in sorted(quant_names):
        quant_of[unit_of(n)].append(n)
    for unit in sorted(layer_names, key=lambda n: int(n.rsplit(".", 1)[1])) + [None]:
        try:
            for name in quant_of[unit]:
                load_quantized(name, keys_of[unit])
            for key in [k for k in keys_of[unit] if k not in loaded]:
                load_plain(key)
        finally:
            handles.clear()  # unmap the files: host memory holds one layer's tensors at most
        layer = model.get_submodule(unit) if unit is not None else None
        if prepare_layer is not None and layer is not None and not any(p.is_meta for p in layer.parameters()):
            for p in layer.parameters():
                p.requires_grad_(False)
            prepare_layer(layer)  # (a layer left partial is named as missing below)
            prepared.add(unit)
    _report_unused(unused, key_file, model, raw)

    if getattr(config, "tie_word_embeddings", False):
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out_emb is not None and out_emb.weight.is_meta and not in_emb.weight.is_meta:
            out_emb.weight = in_emb.weight
    for name, module in list(model.named_modules()):
        if any(b is not None and b.is_meta for b in module._buffers.values()) and "Rotary" in type(module).__name__:
            parent, _, leaf = name.rpartition(".")
            fresh = type(module)(config=getattr(module, "config", None) or model.config).to(device)
            setattr(model.get_submodule(parent) if parent else model, leaf, fresh)
        elif getattr(module, "embed_scale", None) is not None and module.embed_scale.is_meta:
            # Gemma's scaled embedding: a non-persistent buffer holding sqrt(hidden_size)
            module.embed_scale = torch.tensor(module.scalar_embed_scale, device=device)
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:
        raise ValueError(f"{path}: partial checkpoint: {len(missing)} tensors missing "
                         f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
    for name, p in model.named_parameters():
        if unit_of(name) not in prepared:
            p.requires_grad_(False)
    model.config.dtype = dtype
    model.qforge_max_seq_length = max_seq_length or getattr(config.get_text_config(), "max_position_embeddings", None)
    model.qforge_source = str(path)
    model.qforge_frozen_prefixes = frozen
    model.eval()
    return model


def frozen_bytes(path, dtype: torch.dtype = torch.bfloat16, target_modules: Iterable[str] = DEFAULT_TARGETS,
                 blocksize: int = 64) -> int:
    """Bytes the frozen model of a local directory takes once ``load`` has
    quantized it (4-bit codes + one absmax byte per block for the target
    projections, ``dtype`` for the rest), computed from config.json alone: what
    a sharded start weighs before anything is read."""
    path = Path(path)
    model, _, frozen = _meta_model(path, read_config(path), dtype)
    targets = tuple(target_modules)
    quantized = {f"{n}.weight" for n, m in model.named_modules() if _is_quant_target(n, m, targets, frozen)}
    total = 0
    for name, t in model.named_parameters():  # tied weights once
        n = t.numel()
        total += (n + 1) // 2 + -(-n // blocksize) if name in quantized else n * dtype.itemsize
    return total


def load_tokenizer(path):
    """transformers' tokenizer of a local model directory (no network)."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot load a tokenizer ({e})") from None


def save_4bit(model: nn.Module, path, max_shard_bytes: int = 2 << 30) -> None:
    """Write the model as a bitsandbytes "bnb-4bit" checkpoint (config.json with a
    quantization_config, safetensors in bnb's key layout); LoRA weights excluded."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    def nf4_layer(name: str, m: NF4Linear) -> dict:
        entries = nf4.state_dict_entries(f"{name}.", m.packed_codes(), m.quant_state())
        if m.bias is not None:
            entries[f"{name}.bias"] = m.bias
        return entries

    tensors = checkpoint_tensors(model, nf4_layer, lambda t: t)
    write_sharded(path, {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, max_shard_bytes)
    cfg = model.config.to_dict()
    first = next((m for m in model.modules() if isinstance(m, NF4Linear)), None)
    compute = str(model.config.dtype).removeprefix("torch.") if model.config.dtype else "bfloat16"
    cfg["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": bool(first is not None and not first.float_absmax),
        "bnb_4bit_compute_dtype": compute, "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": ["lm_head"],
    }
    atomic_write_text(path / "config.json", json.dumps(cfg, indent=2, default=str))


def checkpoint_tensors(model: nn.Module, nf4_layer, other) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint of `model`: each NF4Linear's from nf4_layer(name, module)
    (its own state, LoRA included, is not copied), every other state-dict tensor through
    other(tensor), and no lm_head.weight when the embeddings are tied."""
    tensors: dict[str, torch.Tensor] = {}
    skip = set()
    for name, m in model.named_modules():
        if isinstance(m, NF4Linear):
            tensors.update(nf4_layer(name, m))
            skip.update(f"{name}.{k}" for k in m.state_dict())
    for name, t in model.state_dict().items():
        if name not in skip and ".lora_" not in name and name not in tensors:
            tensors[name] = other(t)
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    return tensors


def write_sharded(path: Path, tensors: dict, max_shard_bytes: int) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index when larger
    than max_shard_bytes; each file complete or absent (_files)."""
    shards, cur, size = [], {}, 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += nbytes
    shards.append(cur)
    if len(shards) == 1:
        atomic_save_safetensors(path / "model.safetensors", shards[0], metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        atomic_save_safetensors(path / name, shard, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    atomic_write_text(path / "model.safetensors.index.json",
                       json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
