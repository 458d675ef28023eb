"""NF4 bindings: the ctypes declarations of qforge.h's NF4 entries and the torch ops
`torch.ops.qforge.{quantize_nf4, dequantize_nf4, dequantize_nf4_into,
quantize_blockwise_8bit}`, registered with torch.library and fake kernels so that
torch.compile and FSDP2 see ordinary ops. Each op only checks tensors and calls the C ABI;
the public API is qforge.nf4.
"""
from __future__ import annotations

import ctypes
import math
from typing import Optional

import torch
from torch import Tensor

from .. import _torch as T
from .._lib import QF_FLOAT32, QF_UINT8, check, declare


class NF4Weights(ctypes.Structure):
    """qf_nf4_weights of qforge.h."""

    _fields_ = [
        ("packed", ctypes.c_void_p),
        ("packed_bytes", ctypes.c_int64),
        ("numel", ctypes.c_int64),
        ("blocksize", ctypes.c_int32),
        ("code", ctypes.c_void_p),
        ("absmax", ctypes.c_void_p),
        ("absmax_dtype", ctypes.c_int),
        ("absmax_len", ctypes.c_int64),
        ("nested_absmax", ctypes.c_void_p),
        ("nested_absmax_len", ctypes.c_int64),
        ("nested_code", ctypes.c_void_p),
        ("nested_offset", ctypes.c_void_p),
        ("nested_blocksize", ctypes.c_int32),
    ]


_c_int64, _c_int32, _vp = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
_dequantize = declare("qf_nf4_dequantize", ctypes.c_int, ctypes.POINTER(NF4Weights), _vp, ctypes.c_int, _c_int64, _vp)
_quantize = declare("qf_nf4_quantize", ctypes.c_int, _vp, ctypes.c_int, _c_int64, _c_int32, _vp, _c_int64, _vp, _c_int64, _vp)
_quantize_8bit = declare(
    "qf_quantize_blockwise_8bit", ctypes.c_int, _vp, _c_int64, _vp, _vp, _c_int32, _vp, _vp, _c_int64, _vp
)
_validate = declare("qf_nf4_validate", ctypes.POINTER(NF4Weights))
_code16 = declare("qf_nf4_code", _vp)
_dynamic_map = declare("qf_dynamic_map_8bit", _vp)


def nf4_code(device: torch.device | str = "cpu") -> Tensor:
    """bitsandbytes' 16 NF4 levels (get_4bit_type('nf4')), float32."""
    out = torch.empty(16, dtype=torch.float32)
    check(_code16(T.ptr(out)))
    return out.to(device)


def dynamic_map(device: torch.device | str = "cpu") -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map()), float32[256]."""
    out = torch.empty(256, dtype=torch.float32)
    check(_dynamic_map(T.ptr(out)))
    return out.to(device)


def _check_pointers(packed, absmax, code, nested_absmax, nested_code, nested_offset, out) -> bool:
    """What taking the tensors' pointers needs: one device, contiguous, the dtypes
    qf_nf4_weights declares, and the fixed-length tables (16 and 256 levels, one
    offset) complete. Sizes are the core's to check. Returns whether double-quantized."""
    device = packed.device
    named = (("packed", packed), ("absmax", absmax), ("quant_map", code), ("nested_absmax", nested_absmax),
             ("nested_quant_map", nested_code), ("nested_offset", nested_offset), ("out", out))
    for name, t in named:
        if t is not None:
            if t.device != device:
                raise ValueError(f"all tensors must be on one device: packed on {device}, {name} on {t.device}")
            if not t.is_contiguous():
                T.require_contiguous(t, name)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed NF4 weight must be uint8, got {packed.dtype}")
    if code.dtype != torch.float32 or code.numel() != 16:
        raise ValueError(f"quant_map must be 16 float32 values, got {code.numel()} {code.dtype}")
    nested = absmax.dtype == torch.uint8
    if not nested and absmax.dtype != torch.float32:
        raise ValueError(f"absmax must be float32, or uint8 when double-quantized; got {absmax.dtype}")
    if nested:
        if nested_absmax is None or nested_code is None or nested_offset is None:
            raise ValueError("uint8 (double-quantized) absmax needs nested_absmax, nested_quant_map and nested_offset")
        for name, t, n in (("nested_absmax", nested_absmax, None), ("nested_quant_map", nested_code, 256), ("nested_offset", nested_offset, 1)):
            if t.dtype != torch.float32 or (n is not None and t.numel() != n):
                raise ValueError(f"{name} must be float32{'' if n is None else f' with {n} values'}, got {t.numel()} {t.dtype}")
    return nested


_INT32_MAX = 2**31 - 1


def _int32(value: int, what: str) -> int:
    """`value` for a C int32 argument; ctypes would silently wrap a larger one."""
    if not -_INT32_MAX - 1 <= value <= _INT32_MAX:
        raise ValueError(f"{what} {value} does not fit in 32 bits")
    return value


def _check_blocksize(blocksize: int, what: str) -> int:
    """A positive 32-bit blocksize (the C++ core checks the rest: a power of two in
    range); what sizing the outputs by it needs, fake kernels included."""
    if _int32(blocksize, what) <= 0:
        raise ValueError(f"{what} must be a positive power of two, got {blocksize}")
    return blocksize


def _check_shape(shape: list[int]) -> None:
    """dequantize_nf4's output shape, before it is allocated (the core checks that
    the packed bytes hold it)."""
    if any(s < 0 for s in shape):
        raise ValueError(f"dequantize_nf4: shape {list(shape)} has a negative size")


def _describe(packed, absmax, code, blocksize, nested_absmax, nested_code, nested_offset, nested_blocksize,
              numel: int, out=None) -> NF4Weights:
    """The qf_nf4_weights of a weight of `numel` elements, after _check_pointers."""
    nested = _check_pointers(packed, absmax, code, nested_absmax, nested_code, nested_offset, out)
    return NF4Weights(
        packed.data_ptr(), packed.numel(), numel, _int32(blocksize, "blocksize"), code.data_ptr(), absmax.data_ptr(),
        QF_UINT8 if nested else QF_FLOAT32, absmax.numel(),
        nested_absmax.data_ptr() if nested else None, nested_absmax.numel() if nested else 0,
        nested_code.data_ptr() if nested else None, nested_offset.data_ptr() if nested else None,
        _int32(nested_blocksize, "nested_blocksize"),
    )


def validate(packed, absmax, code, blocksize, nested_absmax, nested_code, nested_offset, nested_blocksize,
             numel: int) -> None:
    """qf_nf4_validate: ValueError unless the tensors hold a consistent weight of
    `numel` elements (sizes, blocksizes); no data is read."""
    check(_validate(ctypes.byref(_describe(packed, absmax, code, blocksize, nested_absmax, nested_code,
                                           nested_offset, nested_blocksize, numel))))


def dequantize_into(packed, absmax, code, blocksize, nested_absmax, nested_code, nested_offset, nested_blocksize, out,
                    numel: Optional[int] = None):
    """The implementation behind both dequantize ops; eager callers use it directly
    to skip the custom-op dispatch (tens of microseconds per call). `numel`: the
    weight's elements, when the caller knows them apart from `out` (the core checks
    that they agree)."""
    w = _describe(packed, absmax, code, blocksize, nested_absmax, nested_code, nested_offset, nested_blocksize,
                  out.numel() if numel is None else numel, out)
    out_dtype = T.qf_dtype(out.dtype, "dequantize_nf4 output dtype")
    with T.on_device(packed.device):
        check(_dequantize(T.qf_device(out), ctypes.byref(w), T.ptr(out), out_dtype, out.numel(),
                          T.stream_of(packed.device)))


def dequantize(packed, absmax, code, blocksize, nested_absmax, nested_code, nested_offset, nested_blocksize,
               shape, dtype: torch.dtype, out: Optional[Tensor] = None, workspace=None) -> Tensor:
    """The dequantized weight of `shape` and `dtype`, the one choice between traced and
    eager calls. Under torch.compile through the registered ops (into `out`, else a
    tensor the compiler plans); eagerly straight through the C ABI into `out`, else a
    buffer of `workspace` (an object with get(shape, dtype, device)), else a new tensor."""
    args = (packed, absmax, code, blocksize, nested_absmax, nested_code, nested_offset, nested_blocksize)
    if torch.compiler.is_compiling():
        if out is not None:
            torch.ops.qforge.dequantize_nf4_into(*args, out)
            return out
        return torch.ops.qforge.dequantize_nf4(*args[:4], list(shape), dtype, *args[4:])
    if out is None:
        out = (workspace.get(shape, dtype, packed.device) if workspace is not None
               else torch.empty(shape, dtype=dtype, device=packed.device))
    dequantize_into(*args, out, numel=math.prod(shape))
    return out


@torch.library.custom_op("qforge::dequantize_nf4_into", mutates_args=("out",))
def dequantize_nf4_into(
    packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int,
    nested_absmax: Optional[Tensor], nested_code: Optional[Tensor], nested_offset: Optional[Tensor],
    nested_blocksize: int, out: Tensor,
) -> None:
    """Dequantize into `out` (a reused workspace); one CUDA kernel, on the current stream."""
    dequantize_into(packed, absmax, code, blocksize, nested_absmax, nested_code, nested_offset, nested_blocksize, out)


def _fake_same_device(**tensors) -> None:
    """A meta tensor among real ones dispatches to the fake kernel: the checks of the
    real one never run, so the fake kernels check the devices themselves."""
    T.require_same_device(tensors)


@dequantize_nf4_into.register_fake
def _(packed, absmax, code, blocksize, nested_absmax, nested_code, nested_offset, nested_blocksize, out):
    _fake_same_device(packed=packed, absmax=absmax, quant_map=code, nested_absmax=nested_absmax,
                      nested_quant_map=nested_code, nested_offset=nested_offset, out=out)
    return None


@torch.library.custom_op("qforge::dequantize_nf4", mutates_args=())
def dequantize_nf4(
    packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, shape: list[int], dtype: torch.dtype,
    nested_absmax: Optional[Tensor] = None, nested_code: Optional[Tensor] = None,
    nested_offset: Optional[Tensor] = None, nested_blocksize: int = 256,
) -> Tensor:
    """A new tensor of `shape` and `dtype` holding the dequantized weight."""
    _check_shape(shape)
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    dequantize_into(packed, absmax, code, blocksize, nested_absmax, nested_code, nested_offset, nested_blocksize, out)
    return out


@dequantize_nf4.register_fake
def _(packed, absmax, code, blocksize, shape, dtype, nested_absmax=None, nested_code=None, nested_offset=None, nested_blocksize=256):
    _fake_same_device(packed=packed, absmax=absmax, quant_map=code, nested_absmax=nested_absmax,
                      nested_quant_map=nested_code, nested_offset=nested_offset)
    _check_shape(shape)
    return packed.new_empty(shape, dtype=dtype)


@torch.library.custom_op("qforge::quantize_nf4", mutates_args=())
def quantize_nf4(x: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """(packed uint8 of shape (ceil(n/2), 1), fp32 absmax per block), as bitsandbytes' quantize_4bit."""
    T.require_contiguous(x, "weight to quantize")
    x_dtype = T.qf_dtype(x.dtype, "weight to quantize")
    _check_blocksize(blocksize, "quantize_nf4: blocksize")
    n = x.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=x.device)
    with T.on_device(x.device):
        check(_quantize(T.qf_device(x), T.ptr(x), x_dtype, n, blocksize, T.ptr(packed), packed.numel(),
                        T.ptr(absmax), absmax.numel(), T.stream_of(x.device)))
    return packed, absmax


@quantize_nf4.register_fake
def _(x, blocksize):
    _check_blocksize(blocksize, "quantize_nf4: blocksize")
    n = x.numel()
    return x.new_empty(((n + 1) // 2, 1), dtype=torch.uint8), x.new_empty(-(-n // blocksize), dtype=torch.float32)


@torch.library.custom_op("qforge::quantize_blockwise_8bit", mutates_args=())
def quantize_blockwise_8bit(x: Tensor, code: Tensor, blocksize: int, offset: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """bitsandbytes' quantize_blockwise of (x - offset): (uint8 codes, fp32 absmax per block)."""
    T.require_same_device(dict(x=x, code=code, offset=offset))
    for name, t in (("x", x), ("code", code), ("offset", offset)):
        if t is not None:
            T.require_contiguous(t, name)
            if t.dtype != torch.float32:
                raise ValueError(f"quantize_blockwise_8bit: {name} must be float32, got {t.dtype}")
    if code.numel() != 256:
        raise ValueError(f"quantize_blockwise_8bit: code must have 256 entries, got {code.numel()}")
    if offset is not None and offset.numel() != 1:
        raise ValueError(f"quantize_blockwise_8bit: offset must be one value, got {offset.numel()}")
    _check_blocksize(blocksize, "quantize_blockwise_8bit: blocksize")
    T.qf_device(x)
    n = x.numel()
    q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=x.device)
    with T.on_device(x.device):
        check(_quantize_8bit(T.qf_device(x), T.ptr(x), n, T.ptr(offset), T.ptr(code), blocksize, T.ptr(q),
                             T.ptr(absmax), absmax.numel(), T.stream_of(x.device)))
    return q, absmax


@quantize_blockwise_8bit.register_fake
def _(x, code, blocksize, offset=None):
    _fake_same_device(x=x, code=code, offset=offset)
    _check_blocksize(blocksize, "quantize_blockwise_8bit: blocksize")
    return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty(-(-x.numel() // blocksize), dtype=torch.float32)
