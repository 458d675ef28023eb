"""NF4 weights in bitsandbytes' layout: quantize, dequantize, and the state-dict /
safetensors keys of a bitsandbytes "bnb-4bit" checkpoint, with no bitsandbytes needed.

`QuantState` carries the same fields as `bitsandbytes.functional.QuantState`
(absmax, shape, code, blocksize, quant_type, dtype, offset, state2), so either
class's objects can be passed where the other's are expected.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .ops import nf4 as nf4_ops

QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
_TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


@dataclass
class NestedState:
    """The 8-bit quantization of the absmax (bitsandbytes' state2)."""

    absmax: Tensor  # fp32, one per `blocksize` absmax codes
    code: Tensor  # fp32[256], the dynamic map
    blocksize: int = 256
    dtype: torch.dtype = torch.float32


@dataclass
class QuantState:
    absmax: Tensor  # fp32 per block, or uint8 codes when nested
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    code: Optional[Tensor] = None  # the 16-entry quant_map
    quant_type: str = "nf4"
    offset: Optional[Tensor] = None  # 0-dim fp32, nested only
    state2: Optional[NestedState] = None

    def __post_init__(self):
        if self.code is None:
            self.code = nf4_ops.nf4_code(self.absmax.device)
        self.shape = torch.Size(self.shape)

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to(self, device) -> "QuantState":
        self.absmax, self.code = self.absmax.to(device), self.code.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.absmax, self.state2.code = self.state2.absmax.to(device), self.state2.code.to(device)
        return self

    def as_dict(self, packed: bool = False) -> dict:
        """bitsandbytes' QuantState.as_dict: with packed=True, every value a tensor
        (the non-tensor fields JSON-encoded under 'quant_state.bitsandbytes__nf4')."""
        d = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape),
        }
        if self.nested:
            d.update(
                nested_absmax=self.state2.absmax,
                nested_blocksize=self.state2.blocksize,
                nested_quant_map=self.state2.code.clone(),
                nested_dtype=_dtype_name(self.state2.dtype),
                nested_offset=self.offset.item(),
            )
        if not packed:
            return d
        tensors = {k: v for k, v in d.items() if isinstance(v, Tensor)}
        others = {k: v for k, v in d.items() if not isinstance(v, Tensor)}
        tensors[QUANT_STATE_KEY] = torch.tensor(list(json.dumps(others).encode("utf-8")), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_dict(cls, qs: dict, device="cpu", where: str = "quant state") -> "QuantState":
        """Inverse of as_dict (packed or not); keys may carry a 'weight.' prefix.
        Raises ValueError naming `where` when a key is missing or malformed."""
        qs = {k.split(".")[-1] if not k.endswith(QUANT_STATE_KEY) else QUANT_STATE_KEY: v for k, v in qs.items()}
        if QUANT_STATE_KEY in qs:
            raw = qs.pop(QUANT_STATE_KEY)
            if not isinstance(raw, Tensor):
                raise ValueError(f"{where}: {QUANT_STATE_KEY} must be a uint8 tensor of JSON bytes, "
                                 f"got {type(raw).__name__}")
            try:
                packed = json.loads(bytes(raw.to("cpu", torch.uint8).reshape(-1).tolist()).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise ValueError(f"{where}: {QUANT_STATE_KEY} is not valid JSON ({e})") from None
            if not isinstance(packed, dict):
                raise ValueError(f"{where}: {QUANT_STATE_KEY} must hold a JSON object, got {type(packed).__name__}")
            qs.update(packed)
        for key in ("absmax", "quant_map", "blocksize", "dtype", "shape"):
            if key not in qs:
                raise ValueError(f"{where}: missing '{key}'")
        if qs.get("quant_type", "nf4") != "nf4":
            raise ValueError(f"{where}: quant_type {qs['quant_type']!r} is not supported (only nf4)")
        state2 = offset = None
        if "nested_absmax" in qs:
            for key in ("nested_quant_map", "nested_offset", "nested_blocksize"):
                if key not in qs:
                    raise ValueError(f"{where}: double-quantized state is missing '{key}'")
            nested_offset = qs["nested_offset"]
            if isinstance(nested_offset, Tensor) and nested_offset.numel() == 1:
                nested_offset = nested_offset.item()
            if isinstance(nested_offset, bool) or not isinstance(nested_offset, (int, float)) \
                    or not math.isfinite(nested_offset):
                raise ValueError(f"{where}: nested_offset must be a finite number, got {nested_offset!r}")
            offset = torch.tensor(float(nested_offset), dtype=torch.float32, device=device)
            state2 = NestedState(
                absmax=_tensor(qs, "nested_absmax", where).to(device),
                code=_tensor(qs, "nested_quant_map", where).to(device),
                blocksize=_positive_int(qs, "nested_blocksize", where),
                dtype=_dtype(qs.get("nested_dtype", "float32"), where),
            )
        return cls(
            absmax=_tensor(qs, "absmax", where).to(device), shape=_shape(qs["shape"], where),
            dtype=_dtype(qs["dtype"], where), blocksize=_positive_int(qs, "blocksize", where),
            code=_tensor(qs, "quant_map", where).to(device), quant_type="nf4", offset=offset, state2=state2,
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensor(qs: dict, key: str, where: str) -> Tensor:
    value = qs[key]
    if not isinstance(value, Tensor):
        raise ValueError(f"{where}: '{key}' must be a tensor, got {type(value).__name__}")
    return value


def _positive_int(qs: dict, key: str, where: str) -> int:
    """A blocksize: a positive integer (an integral float from JSON too; a string,
    a bool, 0 or a negative number is an error naming `where`)."""
    value = qs[key]
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where}: '{key}' must be a positive integer, got {value!r}")
    return value


def _shape(value, where: str) -> torch.Size:
    if isinstance(value, Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                       for d in value):
        raise ValueError(f"{where}: 'shape' must be a list of non-negative integers, got {value!r}")
    return torch.Size(value)


def _dtype(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{where}: unknown dtype {name!r}")
    return dtype


def quantize(weight: Tensor, blocksize: int = 64, compress_statistics: bool = True) -> tuple[Tensor, QuantState]:
    """bitsandbytes.functional.quantize_4bit(weight, blocksize, compress_statistics, quant_type='nf4'):
    returns (packed uint8 of shape (ceil(n/2), 1), QuantState)."""
    weight = weight.contiguous()
    packed, absmax = torch.ops.qforge.quantize_nf4(weight, blocksize)
    state = QuantState(absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize,
                       code=nf4_ops.nf4_code(weight.device))
    if compress_statistics:
        # torch's mean, as bitsandbytes takes it, so files match bit for bit
        offset = absmax.mean()
        code8 = nf4_ops.dynamic_map(weight.device)
        qabsmax, absmax2 = torch.ops.qforge.quantize_blockwise_8bit(absmax, code8, 256, offset.reshape(1))
        state.absmax, state.offset = qabsmax, offset
        state.state2 = NestedState(absmax=absmax2, code=code8, blocksize=256)
    return packed, state


def codes_as_uint8(packed: Tensor) -> Tensor:
    """The packed 4-bit codes as uint8: bitsandbytes may store them in another dtype
    (quant_storage), whose bytes are the same."""
    return packed if packed.dtype == torch.uint8 else packed.contiguous().view(-1).view(torch.uint8)


def dequantize(packed: Tensor, state, out: Optional[Tensor] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
    """bitsandbytes.functional.dequantize_4bit(packed, state): one fused kernel on CUDA.
    `state` is a qforge or bitsandbytes QuantState. With `out`, writes into it."""
    packed = codes_as_uint8(packed)
    nested = state.state2 is not None
    args = (
        packed, state.absmax, state.code, state.blocksize,
        state.state2.absmax if nested else None,
        state.state2.code if nested else None,
        state.offset.reshape(1) if nested else None,
        state.state2.blocksize if nested else 256,
    )
    return nf4_ops.dequantize(*args, state.shape, dtype or state.dtype, out=out)


# ------------------------------------------------------------- state dicts / files
def state_dict_entries(prefix: str, packed: Tensor, state: QuantState) -> dict[str, Tensor]:
    """The keys bitsandbytes' Linear4bit writes: {prefix}weight, {prefix}weight.absmax, ..."""
    entries = {f"{prefix}weight": packed}
    entries.update({f"{prefix}weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    return entries


def from_state_dict(tensors: dict[str, Tensor], prefix: str, device="cpu", where: str = "state dict") -> tuple[Tensor, QuantState]:
    """Read one NF4 weight ({prefix}weight + its quant-state keys); checks every size."""
    key = f"{prefix}weight"
    if key not in tensors:
        raise ValueError(f"{where}: missing tensor '{key}'")
    qs = {k[len(key) + 1:]: v for k, v in tensors.items() if k.startswith(key + ".")}
    state = QuantState.from_dict(qs, device=device, where=f"{where}: '{key}'")
    packed = codes_as_uint8(tensors[key]).to(device)
    check_consistent(packed, state, where=f"{where}: '{key}'")
    return packed, state


def check_consistent(packed: Tensor, state, where: str = "NF4 weight") -> None:
    """ValueError naming `where` unless packed and state describe one weight: the
    core's checks of every dequantize (qf_nf4_validate), run without reading data."""
    if state.nested and state.absmax.dtype != torch.uint8:
        raise ValueError(f"{where}: double-quantized absmax must be uint8, got {state.absmax.dtype}")
    nested = state.state2
    try:
        nf4_ops.validate(packed, state.absmax, state.code, state.blocksize,
                         nested.absmax if nested else None, nested.code if nested else None,
                         state.offset.reshape(1) if nested else None, nested.blocksize if nested else 256,
                         math.prod(state.shape))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def save_safetensors(path, weights: dict[str, tuple[Tensor, QuantState]], others: Optional[dict[str, Tensor]] = None,
                     metadata: Optional[dict[str, str]] = None) -> None:
    """Write NF4 weights (name prefix -> (packed, state)) and plain tensors to a safetensors
    file in bitsandbytes' key layout, complete or absent (_files.write_complete_or_absent):
    an interrupted save never leaves a half-written file behind."""
    from ._files import atomic_save_safetensors

    tensors = dict(others or {})
    for prefix, (packed, state) in weights.items():
        tensors.update(state_dict_entries(prefix, packed, state))
    atomic_save_safetensors(Path(path), {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata)


def load_safetensors(path, device="cpu") -> tuple[dict[str, tuple[Tensor, QuantState]], dict[str, Tensor]]:
    """Read a bitsandbytes-layout safetensors file: (NF4 weights by prefix, other tensors).
    Truncated or inconsistent files raise ValueError naming the file and key."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    prefixes = [k[: -len("weight." + QUANT_STATE_KEY)] for k in tensors if k.endswith("weight." + QUANT_STATE_KEY)]
    weights = {p: from_state_dict(tensors, p, device=device, where=str(path)) for p in prefixes}
    claimed = {k for p in prefixes for k in tensors if k == f"{p}weight" or k.startswith(f"{p}weight.")}
    others = {k: v.to(device) for k, v in tensors.items() if k not in claimed}
    return weights, others
