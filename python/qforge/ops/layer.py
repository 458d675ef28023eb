"""Layer-kernel bindings (src/layer: RMSNorm, SwiGLU, RoPE): the ctypes
declarations of qforge.h's layer entries and their torch ops.

Two faces over the same C ABI calls:

* raw functions for hand-written backward passes, called eagerly without the
  custom-op dispatch: ``rms_norm_forward``, ``rms_norm_backward``,
  ``swiglu_forward``, ``swiglu_backward``, ``swiglu_backward_`` (in place),
  ``rope_forward_``, ``rope_backward_`` (in place);
* ``torch.ops.qforge.*`` custom ops with fake kernels (torch.compile), the
  differentiable ones with their backward registered: ``rms_norm_forward``,
  ``swiglu_forward``, ``rope``; plus ``rms_norm_backward``,
  ``swiglu_backward``, ``swiglu_backward_`` and ``rope_``.

Every entry checks its tensors (dtype, device, contiguity, shapes) and raises
ValueError naming the problem. The public API is ``qforge.layer``.
"""
from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from .. import _torch as T
from .._lib import check, declare

_vp, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_rms_forward = declare("qf_rms_norm_forward", _int, _vp, _int, _vp, _int, _i64, _i64, ctypes.c_float, _vp,
                       _vp, _vp)
_rms_backward = declare("qf_rms_norm_backward", _int, _vp, _vp, _int, _vp, _int, _vp, _i64, _i64, _vp, _vp)
_swiglu_forward = declare("qf_swiglu_forward", _int, _vp, _vp, _int, _i64, _vp, _vp)
_swiglu_backward = declare("qf_swiglu_backward", _int, _vp, _vp, _vp, _int, _i64, _vp, _vp, _vp)
_rope = declare("qf_rope", _int, _vp, _vp, _int, _i64, _i64, _i64, _i64, _vp, _vp, _int, _i64, _int, _vp)

def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_tensors(op: str, **tensors: Tensor) -> torch.device:
    """One device (cpu or cuda), contiguous, fp32/fp16/bf16; the device."""
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise ValueError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    device = T.require_same_device(tensors)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: qforge runs on cpu or cuda tensors, got {device}")
    for name, t in tensors.items():
        if t.dtype not in T.FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} must be float32, float16 or bfloat16, got {_name(t.dtype)}")
        T.require_contiguous(t, f"{op}: {name}")
    return device


def _check_same(op: str, what: str, a: Tensor, b: Tensor, a_name: str, b_name: str) -> None:
    if what == "shape" and a.shape != b.shape:
        raise ValueError(f"{op}: {b_name} has shape {tuple(b.shape)} but {a_name} has {tuple(a.shape)}")
    if what == "dtype" and a.dtype != b.dtype:
        raise ValueError(f"{op}: {b_name} is {_name(b.dtype)} but {a_name} is {_name(a.dtype)}")


# ------------------------------------------------------------------ RMSNorm
def _check_rms(op: str, x: Tensor, weight: Tensor, **more: Tensor) -> tuple[torch.device, int, int]:
    """(device, rows, dim) of x [..., dim] normalized with weight [dim]."""
    device = _check_tensors(op, x=x, weight=weight, **more)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a last (normalized) dimension of size > 0, got shape {tuple(x.shape)}")
    dim = x.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"{op}: weight must have shape ({dim},) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"{op}: weight must be {_name(x.dtype)} (as x) or float32, got {_name(weight.dtype)}")
    return device, x.numel() // dim, dim


def rms_norm_forward(x: Tensor, weight: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """(y, rstd): Hugging Face LlamaRMSNorm of x [..., D] with weight [D]
    (x's dtype or fp32), in one pass: rstd [...] fp32 = 1 / sqrt(mean(x^2) + eps),
    y = weight * (x * rstd rounded to x's dtype), rounded to x's dtype."""
    op = "rms_norm_forward"
    device, rows, dim = _check_rms(op, x, weight)
    y = torch.empty_like(x)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=device)
    with T.on_device(device):
        check(_rms_forward(T.qf_device(x), T.ptr(x), T.qf_dtype(x.dtype, "x"), T.ptr(weight),
                           T.qf_dtype(weight.dtype, "weight"), rows, dim, eps, T.ptr(y), T.ptr(rstd),
                           T.stream_of(device)))
    return y, rstd


def rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> Tensor:
    """d loss / d x of rms_norm_forward given dy (like x) and its rstd; the
    weight is frozen (no gradient for it)."""
    op = "rms_norm_backward"
    device, rows, dim = _check_rms(op, x, weight, dy=dy)
    _check_same(op, "shape", x, dy, "x", "dy")
    _check_same(op, "dtype", x, dy, "x", "dy")
    T.require_same_device(dict(x=x, rstd=rstd))
    if rstd.dtype != torch.float32 or rstd.shape != x.shape[:-1]:
        raise ValueError(f"{op}: rstd must be float32 of shape {tuple(x.shape[:-1])}, got {_name(rstd.dtype)} "
                         f"{tuple(rstd.shape)}")
    T.require_contiguous(rstd, f"{op}: rstd")
    dx = torch.empty_like(x)
    with T.on_device(device):
        check(_rms_backward(T.qf_device(x), T.ptr(dy), T.ptr(x), T.qf_dtype(x.dtype, "x"), T.ptr(weight),
                            T.qf_dtype(weight.dtype, "weight"), T.ptr(rstd), rows, dim, T.ptr(dx),
                            T.stream_of(device)))
    return dx


@torch.library.custom_op("qforge::rms_norm_forward", mutates_args=())
def _rms_norm_forward_op(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return rms_norm_forward(x, weight, eps)


@_rms_norm_forward_op.register_fake
def _(x, weight, eps):
    _check_rms("rms_norm_forward", x, weight)
    return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("qforge::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> Tensor:
    return rms_norm_backward(dy, x, weight, rstd)


@_rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd):
    _check_rms("rms_norm_backward", x, weight, dy=dy)
    _check_same("rms_norm_backward", "shape", x, dy, "x", "dy")
    return torch.empty_like(x)


def _rms_setup(ctx, inputs, output):
    x, weight, _eps = inputs
    _y, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)


def _rms_grad(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    if ctx.needs_input_grad[1]:
        raise RuntimeError("qforge rms_norm: the weight has no gradient here (it is frozen in QLoRA); "
                           "set weight.requires_grad_(False)")
    dx = _rms_norm_backward_op(dy.contiguous(), x, weight, rstd) if ctx.needs_input_grad[0] else None
    return dx, None, None


_rms_norm_forward_op.register_autograd(_rms_grad, setup_context=_rms_setup)


# ------------------------------------------------------------------- SwiGLU
def _check_swiglu(op: str, **tensors: Tensor) -> torch.device:
    device = _check_tensors(op, **tensors)
    names = list(tensors)
    first = tensors[names[0]]
    for name in names[1:]:
        _check_same(op, "shape", first, tensors[name], names[0], name)
        _check_same(op, "dtype", first, tensors[name], names[0], name)
    return device


def swiglu_forward(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up in one pass (rounded as eager F.silu(gate) * up)."""
    device = _check_swiglu("swiglu_forward", gate=gate, up=up)
    out = torch.empty_like(gate)
    with T.on_device(device):
        check(_swiglu_forward(T.qf_device(gate), T.ptr(gate), T.ptr(up), T.qf_dtype(gate.dtype, "gate"),
                              gate.numel(), T.ptr(out), T.stream_of(device)))
    return out


def _swiglu_backward_into(dout, gate, up, dgate, dup):
    with T.on_device(gate.device):
        check(_swiglu_backward(T.qf_device(gate), T.ptr(dout), T.ptr(gate), T.ptr(up),
                               T.qf_dtype(gate.dtype, "gate"), gate.numel(), T.ptr(dgate), T.ptr(dup),
                               T.stream_of(gate.device)))


def swiglu_backward(dout: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """(dgate, dup) of out = silu(gate) * up given d out, in one pass."""
    _check_swiglu("swiglu_backward", dout=dout, gate=gate, up=up)
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    _swiglu_backward_into(dout, gate, up, dgate, dup)
    return dgate, dup


def swiglu_backward_(dout: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """swiglu_backward writing dgate over gate and dup over up (no new memory);
    returns (gate, up), now holding the gradients."""
    _check_swiglu("swiglu_backward_", dout=dout, gate=gate, up=up)
    if gate.data_ptr() == up.data_ptr() and gate.numel() > 0:
        raise ValueError("swiglu_backward_: gate and up must be different tensors (each receives a gradient)")
    _swiglu_backward_into(dout, gate, up, gate, up)
    return gate, up


@torch.library.custom_op("qforge::swiglu_forward", mutates_args=())
def _swiglu_forward_op(gate: Tensor, up: Tensor) -> Tensor:
    return swiglu_forward(gate, up)


@_swiglu_forward_op.register_fake
def _(gate, up):
    _check_swiglu("swiglu_forward", gate=gate, up=up)
    return torch.empty_like(gate)


@torch.library.custom_op("qforge::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dout: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    return swiglu_backward(dout, gate, up)


@_swiglu_backward_op.register_fake
def _(dout, gate, up):
    _check_swiglu("swiglu_backward", dout=dout, gate=gate, up=up)
    return torch.empty_like(gate), torch.empty_like(up)


@torch.library.custom_op("qforge::swiglu_backward_", mutates_args=("gate", "up"))
def _swiglu_backward_inplace_op(dout: Tensor, gate: Tensor, up: Tensor) -> None:
    swiglu_backward_(dout, gate, up)


@_swiglu_backward_inplace_op.register_fake
def _(dout, gate, up):
    _check_swiglu("swiglu_backward_", dout=dout, gate=gate, up=up)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_grad(ctx, dout):
    gate, up = ctx.saved_tensors
    return _swiglu_backward_op(dout.contiguous(), gate, up)


_swiglu_forward_op.register_autograd(_swiglu_grad, setup_context=_swiglu_setup)


# --------------------------------------------------------------------- RoPE
def _check_rope(op: str, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[torch.device, int]:
    """(device, batch of cos/sin) for x [B, T, H, Dh], cos/sin [T, Dh] or [1 or B, T, Dh]."""
    device = _check_tensors(op, x=x, cos=cos, sin=sin)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be [batch, seq, heads, head_dim], got shape {tuple(x.shape)}")
    batch, seq, _heads, head_dim = x.shape
    _check_same(op, "shape", cos, sin, "cos", "sin")
    _check_same(op, "dtype", cos, sin, "cos", "sin")
    if cos.dim() not in (2, 3) or tuple(cos.shape[-2:]) != (seq, head_dim) or (
            cos.dim() == 3 and cos.shape[0] not in (1, batch)):
        raise ValueError(f"{op}: cos/sin must be [{seq}, {head_dim}] or [1 or {batch}, {seq}, {head_dim}] "
                         f"for x of shape {tuple(x.shape)}, got {tuple(cos.shape)}")
    if cos.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"{op}: cos/sin must be {_name(x.dtype)} (as x) or float32, got {_name(cos.dtype)}")
    if head_dim % 2:
        raise ValueError(f"{op}: head_dim must be even (rotate_half splits it in two), got {head_dim}")
    return device, (cos.shape[0] if cos.dim() == 3 else 1)


def _rope_into(x: Tensor, out: Tensor, cos: Tensor, sin: Tensor, backward: bool, op: str) -> Tensor:
    device, cos_batch = _check_rope(op, x, cos, sin)
    batch, seq, heads, head_dim = x.shape
    with T.on_device(device):
        check(_rope(T.qf_device(x), T.ptr(x), T.ptr(out), T.qf_dtype(x.dtype, "x"), batch, seq, heads, head_dim,
                    T.ptr(cos), T.ptr(sin), T.qf_dtype(cos.dtype, "cos"), cos_batch, int(backward),
                    T.stream_of(device)))
    return out


def rope_forward_(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, H, Dh] <- x * cos + rotate_half(x) * sin, in place (Hugging
    Face's apply_rotary_pos_emb on the projection's [B, T, H, Dh] view);
    cos/sin [T, Dh] or [1 or B, T, Dh], x's dtype or fp32. Returns x."""
    return _rope_into(x, x, cos, sin, False, "rope_forward_")


def rope_backward_(dx: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The gradient of rope_forward_, in place over the upstream gradient dx
    (the transpose rotation). Returns dx."""
    return _rope_into(dx, dx, cos, sin, True, "rope_backward_")


@torch.library.custom_op("qforge::rope", mutates_args=())
def _rope_op(x: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> Tensor:
    return _rope_into(x, torch.empty_like(x), cos, sin, backward, "rope")


@_rope_op.register_fake
def _(x, cos, sin, backward):
    _check_rope("rope", x, cos, sin)
    return torch.empty_like(x)


@torch.library.custom_op("qforge::rope_", mutates_args=("x",))
def _rope_inplace_op(x: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> None:
    _rope_into(x, x, cos, sin, backward, "rope_")


@_rope_inplace_op.register_fake
def _(x, cos, sin, backward):
    _check_rope("rope_", x, cos, sin)


def _rope_setup(ctx, inputs, output):
    _x, cos, sin, backward = inputs
    ctx.backward = backward
    ctx.save_for_backward(cos, sin)


def _rope_grad(ctx, dy):
    cos, sin = ctx.saved_tensors
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        raise RuntimeError("qforge rope: cos and sin have no gradient here (position embeddings are constants); "
                           "compute them under torch.no_grad() as transformers does")
    return _rope_op(dy.contiguous(), cos, sin, not ctx.backward), None, None, None


_rope_op.register_autograd(_rope_grad, setup_context=_rope_setup)
