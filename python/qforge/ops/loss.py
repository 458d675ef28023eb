"""Loss bindings: the ctypes declarations of qforge.h's fused linear + cross-entropy
entries (`qf_lce_*`) and the torch ops `torch.ops.qforge.linear_cross_entropy` and
`linear_cross_entropy_backward` with their fake kernels and autograd formula. The
public API is qforge.loss.
"""
from __future__ import annotations

import ctypes
import os
from typing import Optional

import torch
from torch import Tensor

from .. import _torch as T
from .._lib import check, declare

class _Options(ctypes.Structure):
    _fields_ = [("ignore_index", ctypes.c_int64), ("label_smoothing", ctypes.c_float),
                ("softcap", ctypes.c_float), ("logit_scale", ctypes.c_float),
                ("z_loss", ctypes.c_float), ("reduction", ctypes.c_int32),
                ("validate", ctypes.c_int32), ("chunk_size", ctypes.c_int64)]


_vp, _i64, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_lce_ws = declare("qf_lce_workspace_bytes", _i32, _i64, _i64, _i64, _i32, _i64,
                  ctypes.POINTER(ctypes.c_int64))
_lce_chunk = declare("qf_lce_chunk_size", _i32, _i64, _i64, _i64, _i32, _i64, ctypes.POINTER(ctypes.c_int64))
_lce_reduction = declare("qf_lce_reduction", ctypes.c_char_p, ctypes.POINTER(ctypes.c_int32))
_lce_scale = declare("qf_lce_scale_inplace", _i32, _vp, _i32, _i64, _vp, _vp)
REDUCTION_NONE = 0  # QF_REDUCTION_NONE


def _ask_reduction(name) -> int:
    code = ctypes.c_int32()
    check(_lce_reduction(str(name).encode("utf-8", "replace"), ctypes.byref(code)))
    return code.value


# asked once: torch.compile traces reduction_code, and a ctypes call would break the graph
_REDUCTION_CODES = {name: _ask_reduction(name) for name in ("none", "mean", "sum")}


def reduction_code(name: str) -> int:
    """The QF_REDUCTION_* of "none", "mean" or "sum"; for anything else the core's
    ValueError naming the choices."""
    if isinstance(name, str) and name in _REDUCTION_CODES:
        return _REDUCTION_CODES[name]
    return _ask_reduction(name)


class _LceTensors(ctypes.Structure):
    _fields_ = [(name, T.QfTensor) for name in (
        "hidden", "weight", "bias", "labels", "class_weight", "loss", "lse", "grad_hidden", "grad_weight",
        "grad_bias", "grad_scale", "workspace")]


_lce_run = declare("qf_lce_run", ctypes.POINTER(_LceTensors), ctypes.POINTER(_Options), _vp)

# Default budget for the whole workspace of the fused path (the chunk's logits
# are nearly all of it); env QFORGE_LCE_CHUNK_BYTES overrides.
_DEFAULT_WORKSPACE_BYTES = 512 << 20


def auto_chunk_size(n: int, d: int, v: int, dtype: torch.dtype, device: torch.device,
                    budget_bytes: Optional[int] = None) -> int:
    """Tokens per chunk of the fused path for n tokens, hidden size d and vocabulary v:
    the core's qf_lce_chunk_size, whose workspace (nearly all of it the chunk's
    logits) fits in ``budget_bytes`` (default: 512 MiB, env QFORGE_LCE_CHUNK_BYTES,
    at most a quarter of the free device memory). n when all tokens fit, else
    128 * 2^k tokens where that fits: on an H100 the GEMMs ran fastest at such sizes."""
    if budget_bytes is None:
        budget_bytes = int(os.environ.get("QFORGE_LCE_CHUNK_BYTES", _DEFAULT_WORKSPACE_BYTES))
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget_bytes = min(budget_bytes, free // 4)
    chunk = ctypes.c_int64()
    check(_lce_chunk(T.qf_device(device), n, d, v, T.qf_dtype(dtype, "linear_cross_entropy: dtype"),
                     budget_bytes, ctypes.byref(chunk)))
    return chunk.value


def scale_inplace_(t: Tensor, scale: Tensor) -> Tensor:
    """t *= scale (a one-element fp32 tensor on t's device) in place, fp32 arithmetic,
    one pass, no host sync (qf_lce_scale_inplace)."""
    if t.numel() == 0:
        return t
    if not t.is_contiguous() or t.dtype not in T.FLOAT_DTYPES:
        return t.mul_(scale)
    g = scale.detach().to(device=t.device, dtype=torch.float32).reshape(1).contiguous()
    check(_lce_scale(T.qf_device(t), T.ptr(t), T.qf_dtype(t.dtype, "scale_inplace_: tensor"), t.numel(),
                     T.ptr(g), T.stream_of(t.device)))
    return t


def _token_sizes(hidden: Tensor, weight: Tensor) -> tuple[int, int, int]:
    """(N, D, V) to size the outputs by; read leniently so that a tensor of the
    wrong rank reaches the C++ checks (which name it) instead of failing here."""
    n = hidden.shape[0] if hidden.dim() >= 1 else 1
    d = hidden.shape[-1] if hidden.dim() >= 1 else 1
    v = weight.shape[0] if weight.dim() >= 1 else 1
    return n, d, v


def _run_core(hidden, weight, labels, bias, class_weight, ignore_index, label_smoothing, softcap,
              logit_scale, z_loss, reduction, chunk_size, validate, loss, lse, gh, gw, gb,
              grad_scale):
    """One qf_lce_run: every tensor's shape, strides, dtype and device are checked in C++."""
    n, d, v = _token_sizes(hidden, weight)
    dev = hidden.device
    nbytes = ctypes.c_int64(0)
    # sizes the workspace cannot be computed for are left to qf_lce_run, which names them
    if hidden.dtype in T.FLOAT_DTYPES and d >= 1 and v >= 1 and chunk_size >= 0:
        if chunk_size == 0:
            chunk_size = auto_chunk_size(n, d, v, hidden.dtype, dev)
        check(_lce_ws(T.qf_device(hidden), n, d, v, T.qf_dtype(hidden.dtype, "hidden"), chunk_size,
                      ctypes.byref(nbytes)))
    ws = torch.empty(nbytes.value, dtype=torch.uint8, device=dev)
    if dev.type == "cuda" and validate and torch.cuda.is_current_stream_capturing():
        validate = False
    opts = _Options(int(ignore_index), float(label_smoothing), float(softcap or 0.0),
                    float(logit_scale), float(z_loss), int(reduction), int(bool(validate)),
                    int(chunk_size))
    tensors = _LceTensors(*(T.describe(t) for t in (hidden, weight, bias, labels, class_weight, loss, lse, gh,
                                                    gw, gb, grad_scale, ws)))
    with T.on_device(dev):
        check(_lce_run(ctypes.byref(tensors), ctypes.byref(opts), T.stream_of(dev)))


@torch.library.custom_op("qforge::linear_cross_entropy", mutates_args=())
def lce_op(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor],
            class_weight: Optional[Tensor], ignore_index: int, label_smoothing: float,
            softcap: float, logit_scale: float, z_loss: float, reduction: int, chunk_size: int,
            validate: bool, want_lse: bool, grad_hidden: bool, grad_weight: bool,
            grad_bias: bool, fp32_grad_weight: bool
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    n, d, v = _token_sizes(hidden, weight)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    loss = torch.empty((n,) if reduction == REDUCTION_NONE else (), **f32)
    lse = torch.empty((n,) if want_lse else (0,), **f32)
    gh = torch.empty((n, d) if grad_hidden else (0,), dtype=hidden.dtype, device=hidden.device)
    gw = torch.empty((v, d) if grad_weight else (0,),
                     dtype=torch.float32 if fp32_grad_weight else weight.dtype, device=weight.device)
    gb = torch.empty((v,) if grad_bias else (0,), **f32)
    _run_core(hidden, weight, labels, bias, class_weight, ignore_index, label_smoothing, softcap,
              logit_scale, z_loss, reduction, chunk_size, validate, loss,
              lse if want_lse else None, gh if grad_hidden else None,
              gw if grad_weight else None, gb if grad_bias else None, None)
    return loss, lse, gh, gw, gb


@lce_op.register_fake
def _(hidden, weight, labels, bias, class_weight, ignore_index, label_smoothing, softcap,
      logit_scale, z_loss, reduction, chunk_size, validate, want_lse, grad_hidden, grad_weight,
      grad_bias, fp32_grad_weight):
    # a meta tensor among real ones dispatches here: the C++ checks never see it
    T.require_same_device(dict(hidden=hidden, weight=weight, labels=labels, bias=bias,
                               class_weight=class_weight))
    n, d, v = _token_sizes(hidden, weight)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return (hidden.new_empty((n,) if reduction == REDUCTION_NONE else (), dtype=torch.float32),
            torch.empty((n,) if want_lse else (0,), **f32),
            hidden.new_empty((n, d) if grad_hidden else (0,)),
            weight.new_empty((v, d) if grad_weight else (0,),
                             dtype=torch.float32 if fp32_grad_weight else weight.dtype),
            torch.empty((v,) if grad_bias else (0,), **f32))


@torch.library.custom_op("qforge::linear_cross_entropy_backward", mutates_args=())
def _lce_bwd_op(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor],
                class_weight: Optional[Tensor], grad_loss: Tensor, ignore_index: int,
                label_smoothing: float, softcap: float, logit_scale: float, z_loss: float,
                reduction: int, chunk_size: int, grad_hidden: bool, grad_weight: bool,
                grad_bias: bool, fp32_grad_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients with a per-token upstream gradient (reduction none): recomputes
    the chunks' logits with each token's gradient scaled by grad_loss[i]."""
    n, d, v = _token_sizes(hidden, weight)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    loss = torch.empty((n,) if reduction == REDUCTION_NONE else (), **f32)
    gh = torch.empty((n, d) if grad_hidden else (0,), dtype=hidden.dtype, device=hidden.device)
    gw = torch.empty((v, d) if grad_weight else (0,),
                     dtype=torch.float32 if fp32_grad_weight else weight.dtype, device=weight.device)
    gb = torch.empty((v,) if grad_bias else (0,), **f32)
    scale = grad_loss.to(torch.float32).reshape(-1)
    if scale.numel() == 1:
        scale = scale.expand(n)
    scale = scale.contiguous()  # any other size than 1 or N is named by the C++ checks
    _run_core(hidden, weight, labels, bias, class_weight, ignore_index, label_smoothing, softcap,
              logit_scale, z_loss, reduction, chunk_size, False, loss, None,
              gh if grad_hidden else None, gw if grad_weight else None, gb if grad_bias else None,
              scale)
    return gh, gw, gb


@_lce_bwd_op.register_fake
def _(hidden, weight, labels, bias, class_weight, grad_loss, ignore_index, label_smoothing, softcap,
      logit_scale, z_loss, reduction, chunk_size, grad_hidden, grad_weight, grad_bias,
      fp32_grad_weight):
    T.require_same_device(dict(hidden=hidden, weight=weight, labels=labels, bias=bias,
                               class_weight=class_weight, grad_loss=grad_loss))
    n, d, v = _token_sizes(hidden, weight)
    return (hidden.new_empty((n, d) if grad_hidden else (0,)),
            weight.new_empty((v, d) if grad_weight else (0,),
                             dtype=torch.float32 if fp32_grad_weight else weight.dtype),
            torch.empty((v,) if grad_bias else (0,), dtype=torch.float32, device=hidden.device))


_OPT_NAMES = ("ignore_index", "label_smoothing", "softcap", "logit_scale", "z_loss", "reduction",
              "chunk_size", "validate", "want_lse", "grad_hidden", "grad_weight", "grad_bias",
              "fp32_grad_weight")


def _eager(*ts) -> bool:
    return not torch.compiler.is_compiling() and all(
        t is None or type(t) is torch.Tensor for t in ts)


def _setup_context(ctx, inputs, output):
    (hidden, weight, labels, bias, class_weight, *opts) = inputs
    ctx.opts = dict(zip(_OPT_NAMES, opts))
    loss, lse, gh, gw, gb = output
    ctx.mark_non_differentiable(lse, gh, gw, gb)
    ctx.set_materialize_grads(False)  # no zero-filled V x D "gradients" for the grad outputs
    ctx.weight_dtype, ctx.bias_dtype = weight.dtype, (bias.dtype if bias is not None else None)
    ctx.grads = None
    if ctx.opts["reduction"] == REDUCTION_NONE:
        ctx.save_for_backward(hidden, weight, labels, bias, class_weight)
    elif _eager(gh, gw, gb):
        # Held as plain attributes, not saved tensors: backward drops its reference
        # and rescales in place, so autograd can take the buffer as .grad without
        # a copy (a saved tensor would keep a second reference and force one).
        ctx.grads = [gh, gw, gb]
    else:
        ctx.save_for_backward(gh, gw, gb)


def _backward(ctx, g_loss, g_lse, g_gh, g_gw, g_gb):
    o = ctx.opts
    gh = gw = gb = None
    if o["reduction"] == REDUCTION_NONE:
        hidden, weight, labels, bias, class_weight = ctx.saved_tensors
        gh, gw, gb = _lce_bwd_op(hidden, weight, labels, bias, class_weight, g_loss,
                                 o["ignore_index"], o["label_smoothing"], o["softcap"],
                                 o["logit_scale"], o["z_loss"], REDUCTION_NONE, o["chunk_size"],
                                 o["grad_hidden"], o["grad_weight"], o["grad_bias"],
                                 o["fp32_grad_weight"])
        gh = gh if o["grad_hidden"] else None
        gw = gw.to(ctx.weight_dtype) if o["grad_weight"] else None
        gb = gb.to(ctx.bias_dtype) if o["grad_bias"] else None
    else:
        in_place = ctx.grads is not None
        if in_place:
            sgh, sgw, sgb = ctx.grads
            if sgh is None and sgw is None and sgb is None:
                raise RuntimeError("linear_cross_entropy: backward ran twice; the gradients computed "
                                   "in the forward pass are consumed by the first backward")
            ctx.grads = [None, None, None]
        else:
            sgh, sgw, sgb = ctx.saved_tensors
        if g_loss is None:
            g_loss = torch.ones((), dtype=torch.float32, device=sgh.device)
        on_h, on_w, on_b = o["grad_hidden"], o["grad_weight"], o["grad_bias"]
        if in_place:
            # one vectorised pass each, fp32 arithmetic with the fp32 upstream scalar
            for t, on in ((sgh, on_h), (sgw, on_w and sgw.dtype == ctx.weight_dtype)):
                if on:
                    scale_inplace_(t, g_loss)
            gh = sgh if on_h else None
            if on_w:
                gw = sgw if sgw.dtype == ctx.weight_dtype else (sgw * g_loss).to(ctx.weight_dtype)
        else:
            gh = (sgh * g_loss).to(sgh.dtype) if on_h else None
            gw = (sgw * g_loss).to(ctx.weight_dtype) if on_w else None
        gb = (sgb * g_loss).to(ctx.bias_dtype) if on_b else None
        del sgh, sgw, sgb
    return (gh, gw, None, gb, None) + (None,) * len(_OPT_NAMES)


lce_op.register_autograd(_backward, setup_context=_setup_context)
