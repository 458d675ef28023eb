"""Tensor <-> C ABI glue shared by every torch op: dtypes, devices, streams, checks."""
from __future__ import annotations

import ctypes

import torch

from ._lib import QF_BFLOAT16, QF_CPU, QF_CUDA, QF_FLOAT16, QF_FLOAT32, QF_FLOAT64, QF_INT32, QF_INT64, QF_UINT8

_QF_DTYPES = {
    torch.float32: QF_FLOAT32,
    torch.float16: QF_FLOAT16,
    torch.bfloat16: QF_BFLOAT16,
    torch.uint8: QF_UINT8,
    torch.int64: QF_INT64,
    torch.int32: QF_INT32,
    torch.float64: QF_FLOAT64,
}

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the kernels compute in


def qf_dtype(dtype: torch.dtype, what: str, allowed=FLOAT_DTYPES) -> int:
    if dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"{what} must be one of {names}, got {str(dtype).removeprefix('torch.')}")
    return _QF_DTYPES[dtype]


def qf_device(where: torch.Tensor | torch.device) -> int:
    """The qf_device of a tensor or a device."""
    kind = where.device.type if isinstance(where, torch.Tensor) else where.type
    if kind == "cpu":
        return QF_CPU
    if kind == "cuda":
        return QF_CUDA
    raise ValueError(f"qforge runs on cpu or cuda tensors, got a {kind} tensor")


def require_contiguous(t: torch.Tensor, what: str) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{what} must be contiguous (got strides {tuple(t.stride())} for shape {tuple(t.shape)})")


def require_same_device(tensors: dict[str, torch.Tensor | None]) -> torch.device:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device: {where}")
    return next(iter(devices))


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() if t is not None else None)


def stream_of(device: torch.device) -> ctypes.c_void_p:
    """The caller's current CUDA stream on `device` (None on CPU)."""
    if device.type != "cuda":
        return ctypes.c_void_p(None)
    # the raw handle, without building a torch.cuda.Stream object (hot path)
    return ctypes.c_void_p(torch._C._cuda_getCurrentRawStream(device.index))


class on_device:
    """Make `device` current for a kernel launch; free when it already is (hot path)."""

    __slots__ = ("index", "previous")

    def __init__(self, device: torch.device):
        self.index = device.index if device.type == "cuda" else None

    def __enter__(self):
        self.previous = None
        if self.index is not None:
            current = torch.cuda.current_device()
            if current != self.index:
                self.previous = current
                torch.cuda.set_device(self.index)

    def __exit__(self, *exc):
        if self.previous is not None:
            torch.cuda.set_device(self.previous)


MAX_DIMS = 8  # QF_MAX_DIMS


class QfTensor(ctypes.Structure):
    """qf_tensor of qforge.h: a tensor's data, dtype, device and layout, for
    entries that check shapes and strides in C++ themselves."""

    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int32), ("device", ctypes.c_int32),
                ("device_index", ctypes.c_int32), ("ndim", ctypes.c_int32),
                ("sizes", ctypes.c_int64 * MAX_DIMS), ("strides", ctypes.c_int64 * MAX_DIMS)]


_DEVICE_CODES = {"cpu": QF_CPU, "cuda": QF_CUDA}


def describe(t: torch.Tensor | None) -> QfTensor:
    """The qf_tensor of `t` (None: absent). Unknown dtypes and devices get
    codes the C++ side rejects by name; ranks above MAX_DIMS are passed on
    (sizes truncated) for the C++ side to reject."""
    if t is None:
        return QfTensor(None, 0, 0, 0, -1)
    d = QfTensor(t.data_ptr() or None, _QF_DTYPES.get(t.dtype, -1), _DEVICE_CODES.get(t.device.type, -1),
                 t.device.index or 0, t.dim())
    for i, (size, stride) in enumerate(zip(t.shape[:MAX_DIMS], t.stride()[:MAX_DIMS])):
        d.sizes[i], d.strides[i] = size, stride
    return d
