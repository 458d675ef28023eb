"""LoRA adapters in PEFT's file format, and merging them into a 16-bit checkpoint.

``save_adapter(model, dir)`` writes ``adapter_config.json`` and
``adapter_model.safetensors`` exactly as ``peft.PeftModel.save_pretrained`` does
(keys ``base_model.model.<module>.lora_A.weight``), so
``PeftModel.from_pretrained(original_hf_model, dir)`` loads it; ``load_adapter``
reads PEFT's files back into a qforge model; ``merge_and_save`` writes
``W + scaling * B @ A`` for every adapted layer (dequantized base) as an ordinary
transformers checkpoint.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ._files import atomic_save_safetensors, atomic_write_text, read_json
from .nn import NF4Linear, add_lora, lora_state_dict

__all__ = ["save_adapter", "load_adapter", "merge_and_save", "adapter_config", "adapter_dir",
           "read_adapter_config", "read_lora_weights", "LoraWeights"]

_PREFIX = "base_model.model."


def adapter_config(model: nn.Module, base_model_name_or_path: Optional[str] = None) -> dict:
    cfg = getattr(model, "qforge_lora", None)
    if cfg is None:
        raise ValueError("model has no LoRA adapter (call qforge.add_lora first)")
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path or getattr(model, "qforge_source", None),
        "revision": None, "inference_mode": True,
        "r": int(cfg["r"]), "lora_alpha": cfg["lora_alpha"], "lora_dropout": float(cfg["lora_dropout"]),
        "target_modules": sorted(cfg["target_modules"]), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": bool(cfg["use_rslora"]), "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }


def save_adapter(model: nn.Module, path, base_model_name_or_path: Optional[str] = None,
                 tensors: Optional[dict] = None) -> Path:
    """Write the adapter in PEFT's format into directory ``path`` (each file
    complete or absent: _files.write_complete_or_absent). ``tensors``: the LoRA
    weights by module name when not the model's own (a sharded model's, gathered)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = adapter_config(model, base_model_name_or_path)
    tensors = {_PREFIX + k: v.detach().contiguous().cpu()
               for k, v in (lora_state_dict(model) if tensors is None else tensors).items()}
    atomic_save_safetensors(path / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    atomic_write_text(path / "adapter_config.json", json.dumps(cfg, indent=2))
    return path


def adapter_dir(path) -> Path:
    """The adapter directory `path` names: itself when it holds adapter_config.json,
    else a `qforge train` run directory's adapter/."""
    path = Path(path)
    if (path / "adapter_config.json").exists():
        return path
    if (path / "adapter" / "adapter_config.json").exists():
        return path / "adapter"
    raise ValueError(f"{path}: neither a PEFT adapter directory nor a qforge run directory (no "
                     f"adapter_config.json in it or in {path / 'adapter'})")


def read_adapter_config(path) -> dict:
    """adapter_config.json of the PEFT adapter directory `path`, checked for what qforge
    reads: a LoRA adapter (no DoRA, no per-module rank or alpha patterns) with a
    positive integer r, numeric lora_alpha and lora_dropout, beside its
    adapter_model.safetensors. Raises ValueError naming the file and the problem."""
    path = Path(path)
    cfg_path = path / "adapter_config.json"
    cfg = read_json(cfg_path, "not a PEFT adapter directory")
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    if cfg.get("use_dora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{cfg_path}: DoRA and per-module rank/alpha patterns are not supported")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{cfg_path}: r must be a positive integer, got {r!r}")
    for name, value in (("lora_alpha", cfg.get("lora_alpha")), ("lora_dropout", cfg.get("lora_dropout", 0.0))):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{cfg_path}: {name} must be a number, got {value!r}")
    if not (path / "adapter_model.safetensors").exists():
        raise ValueError(f"{path / 'adapter_model.safetensors'}: missing (not a PEFT adapter directory)")
    return cfg


def _adapter_tensors(path: Path) -> dict:
    """The tensors of `path`/adapter_model.safetensors; ValueError naming the file when unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    w_path = path / "adapter_model.safetensors"
    try:
        return load_file(str(w_path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{w_path}: not a readable safetensors file ({e})") from None


@dataclass
class LoraWeights:
    """A PEFT adapter's LoRA pairs, read without a model (read_lora_weights)."""
    path: Path
    scaling: float  # lora_alpha / r (/ sqrt(r) with use_rslora)
    tensors: dict  # HF module name ("model.layers.0.self_attn.q_proj") -> (A, B)


def read_lora_weights(path) -> LoraWeights:
    """The LoRA A/B pairs of the PEFT adapter directory `path` by module name, and their scaling:
    for merging into a base checkpoint without building a model. Raises ValueError naming the
    file for a config read_adapter_config refuses, a tensor that is not a LoRA weight, an
    unpaired A or B, or a rank other than the config's."""
    path = Path(path)
    cfg = read_adapter_config(path)
    r, alpha = cfg["r"], float(cfg["lora_alpha"])
    scaling = alpha / r ** 0.5 if cfg.get("use_rslora") else alpha / r
    w_path = path / "adapter_model.safetensors"
    pairs: dict[str, dict] = {}
    for key, value in _adapter_tensors(path).items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if m is None:
            raise ValueError(f"{w_path}: tensor '{key}' is not a LoRA A/B weight")
        pairs.setdefault(m.group(1), {})[m.group(2)] = value
    tensors = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{w_path}: '{module}' has lora_{''.join(ab)} but not both A and B")
        if ab["A"].shape[0] != r or ab["B"].shape[1] != r:
            raise ValueError(f"{w_path}: '{module}' has rank {ab['A'].shape[0]}, the config says r={r}")
        tensors[module] = (ab["A"], ab["B"])
    return LoraWeights(path, scaling, tensors)


def load_adapter(model: nn.Module, path, strict: bool = True) -> nn.Module:
    """Load a PEFT LoRA adapter directory into a qforge model (adding the LoRA
    layers when the model has none). Raises ValueError for files that are missing,
    not LoRA, or whose tensors do not fit the model."""
    path = Path(path)
    cfg_path, w_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    cfg = read_adapter_config(path)
    tensors = _adapter_tensors(path)
    if getattr(model, "qforge_lora", None) is None:
        targets = cfg.get("target_modules")
        if isinstance(targets, str):
            raise ValueError(f"{cfg_path}: regex target_modules are not supported")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"{cfg_path}: target_modules must be a non-empty list of module names, got {targets!r}")
        add_lora(model, r=cfg["r"], lora_alpha=cfg["lora_alpha"], lora_dropout=float(cfg.get("lora_dropout", 0.0)),
                 target_modules=targets, use_rslora=bool(cfg.get("use_rslora", False)))
    own = lora_state_dict(model)
    seen = set()
    for key, value in tensors.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        if name not in own:
            if strict:
                raise ValueError(f"{w_path}: tensor '{key}' does not match a LoRA layer of the model")
            continue
        if tuple(value.shape) != tuple(own[name].shape):
            raise ValueError(f"{w_path}: '{key}' has shape {tuple(value.shape)}, the model's is {tuple(own[name].shape)}")
        with torch.no_grad():
            own[name].copy_(value.to(own[name].device, own[name].dtype))
        seen.add(name)
    missing = sorted(set(own) - seen)
    if strict and missing:
        raise ValueError(f"{w_path}: {len(missing)} LoRA tensors of the model are not in the file (e.g. '{missing[0]}')")
    return model


def merge_and_save(model: nn.Module, path, dtype: torch.dtype = torch.bfloat16, tokenizer=None,
                   max_shard_bytes: int = 2 << 30) -> Path:
    """Write a plain transformers checkpoint: every NF4 layer dequantized, plus
    ``scaling * B @ A`` where it has an adapter, in ``dtype``; other tensors
    converted to ``dtype``. Loads with ``AutoModelForCausalLM.from_pretrained``."""
    from .models.loader import checkpoint_tensors, write_sharded

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    def merged(name: str, m: NF4Linear) -> dict:
        w = m.dequantize(torch.float32)
        if m.lora_A is not None:
            w = w + m.lora_delta(torch.float32).to(w.device)
        entries = {f"{name}.weight": w.to(dtype).cpu()}
        if m.bias is not None:
            entries[f"{name}.bias"] = m.bias.detach().to(dtype).cpu()
        return entries

    tensors = checkpoint_tensors(model, merged,
                                 lambda t: (t.to(dtype) if t.is_floating_point() else t).detach().cpu().contiguous())
    write_sharded(path, tensors, max_shard_bytes)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg["torch_dtype"] = cfg["dtype"]
    atomic_write_text(path / "config.json", json.dumps(cfg, indent=2, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path
