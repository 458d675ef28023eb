"""QLoRA decoder layers with a hand-written backward: the layer is recomputed only as far as its
backward needs.

    from qforge import decoder
    status = decoder.enable(model, offload=True, tile_tokens=8192)   # on supported layers
    print(status)                                                     # what runs fused, and why not
    decoder.disable(model)

Gradient checkpointing (``qforge.offload``) keeps each layer's input and re-runs the whole layer
in backward: all seven GEMMs and the attention forward. A layer here is one autograd Function
whose forward saves four tensors (in pinned host memory with ``offload``, through
``offload.HostOffloader``):

* ``x``, the layer input, and ``h = x + attention_block(x)``, the mid-layer residual;
* ``o``, the attention output (before o_proj), and its log-sum-exp ``lse``.

Backward recomputes only RMSNorm1 -> q/k/v (+LoRA) -> RoPE (-> q_norm/k_norm on Qwen3) and
RMSNorm2 -> gate/up (+LoRA) -> SwiGLU; o_proj's and down_proj's forward and the attention
forward are never re-run: attention's backward takes the saved ``o`` and ``lse``. At
Llama-3.1-8B shapes (2048 x 2) that removes about 35% of the recompute GEMM FLOPs and the
flash forward; at 131,072 tokens, where attention is most of the step, about a fifth of the
attention time.

The MLP block works over token tiles of ``tile_tokens`` (forward and backward), so nothing of
size tokens x intermediate outlives a tile. RMSNorm, SwiGLU and RoPE are qforge.layer's fused
kernels (one pass each; their raw forward/backward functions). q/k/v and gate/up each run as one
GEMM over their NF4 weights and LoRA A matrices stacked in qforge.nn's shared workspace
(``_Stack``; backward's input gradient is one GEMM too); o_proj and down_proj add LoRA into the
base GEMM's output (``out.addmm_(x @ A^T, B^T, alpha=scaling)``). LoRA gradients are written by
hand; each NF4 weight is dequantized once per use.

Attention: packed rows become cu_seqlens (document starts where position_ids do not continue,
qforge.attention.cu_seqlens_from_position_ids; never a T x T mask), grouped-query attention by
head counts. On CUDA (fp16/bf16) torch's flash kernels that return and take the log-sum-exp
(``aten._flash_attention_forward`` / ``_flash_attention_backward``, variable-length layout), or
cuDNN's (``aten._scaled_dot_product_cudnn_attention`` and its backward) for dense batches when
``qforge.attention.prefer_cudnn_attention()`` puts cuDNN first; elsewhere an fp32 math path per
document that uses the same log-sum-exp formulation (it defines the meaning; tests compare it
with transformers' layer).

Supported: transformers' Llama, Mistral, Qwen2 (q/k/v bias) and Qwen3 (q_norm/k_norm) decoder
layers whose seven projections are qforge NF4Linear, SiLU MLP, no LoRA or attention dropout.
Other layers keep plain offloaded checkpointing (``qforge.offload``); ``enable`` returns which
and why. At run time a call this layer cannot take (a KV cache, a custom 4D attention mask, a
missing ``position_embeddings``) runs the checkpointed path instead, with a one-time log line.
Like qforge.offload, the layers run only in training (grad enabled); evaluation and generation
run transformers' own forward.

Under FSDP2 (``fully_shard`` per decoder layer, before or after ``enable``) a fused layer runs
inside its module's call, between FSDP2's hooks, and reads its weights from the modules at each
call: the pre-forward hook gathers the NF4 codes (uint8) and LoRA weights, the pre-backward hook
on the layer's output gathers them again before the hand-written backward, and the LoRA gradients
it returns through autograd are reduce-scattered by the post-backward hook.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import offload as _offload
from .attention import cudnn_takes_gqa
from .distributed import decoder_layers
from .layer import (rms_norm_backward, rms_norm_forward, rope_backward_, rope_forward_, swiglu_backward_,
                    swiglu_forward)
from .nn import NF4Linear, dequantize_stacked, dequantize_weight

__all__ = ["enable", "disable", "wanted", "FUSED_LAYER_SETTINGS", "FusedStatus", "SUPPORTED_LAYERS",
           "attention_forward", "attention_backward"]

log = logging.getLogger("qforge.decoder")

# transformers decoder layer class -> family
SUPPORTED_LAYERS = {"LlamaDecoderLayer": "llama", "MistralDecoderLayer": "mistral",
                    "Qwen2DecoderLayer": "qwen2", "Qwen3DecoderLayer": "qwen3"}
_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# ------------------------------------------------------------------ attention with log-sum-exp
@dataclasses.dataclass
class Documents:
    """Document structure of one forward's B x T tokens (shared by all its layers)."""
    batch: int
    tokens: int
    cu_seqlens: Tensor  # int32, on the device: 0, ..., B*T
    bounds: list  # the same offsets on the host
    longest: int
    dense: bool  # one document a row


def packed_documents(position_ids: Optional[Tensor], padding_mask: Optional[Tensor], batch: int, tokens: int,
                     device) -> Documents:
    """The documents of a B x T forward: from position_ids restarting at 0 (packed rows; None: one
    document a row), padding excluded."""
    from .attention import cu_seqlens_from_position_ids

    if position_ids is None:
        position_ids = torch.arange(tokens, device=device).expand(batch, tokens)
    elif position_ids.shape[0] == 1 and batch > 1:
        position_ids = position_ids.expand(batch, -1)
    if padding_mask is not None:
        padding_mask = padding_mask.to(device=position_ids.device, dtype=torch.bool)
    cu = cu_seqlens_from_position_ids(position_ids, padding_mask).to(device)
    bounds = cu.tolist()  # one host read per forward; at most B*T + 1 offsets
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    return Documents(batch, tokens, cu, bounds, longest, len(bounds) == batch + 1)


def _allowed(length: int, window: Optional[int], device) -> Tensor:
    i = torch.arange(length, device=device)
    distance = i[:, None] - i[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    return allowed


def _wide(x: Tensor) -> Tensor:
    """x in fp32 (fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _math_forward(q, k, v, docs, scale, window):
    """Per document, in fp32 (fp64 for fp64 inputs): o [N, Hq, D] and lse [Hq, N]."""
    groups = q.shape[1] // k.shape[1]
    o = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=_wide(q[:0]).dtype, device=q.device)
    for a, b in zip(docs.bounds[:-1], docs.bounds[1:]):  # at most B*T documents
        qd = _wide(q[a:b].transpose(0, 1))
        kd = _wide(k[a:b].transpose(0, 1)).repeat_interleave(groups, 0)
        vd = _wide(v[a:b].transpose(0, 1)).repeat_interleave(groups, 0)
        s = (qd @ kd.transpose(1, 2)) * scale
        s = s.masked_fill(~_allowed(b - a, window, q.device), float("-inf"))
        lse[:, a:b] = torch.logsumexp(s, -1)
        o[a:b] = (torch.exp(s - lse[:, a:b, None]) @ vd).transpose(0, 1).to(o.dtype)
    return o, lse


def _math_backward(do, q, k, v, o, lse, docs, scale, window):
    groups = q.shape[1] // k.shape[1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for a, b in zip(docs.bounds[:-1], docs.bounds[1:]):
        qd = _wide(q[a:b].transpose(0, 1))
        kd = _wide(k[a:b].transpose(0, 1)).repeat_interleave(groups, 0)
        vd = _wide(v[a:b].transpose(0, 1)).repeat_interleave(groups, 0)
        dod, od = _wide(do[a:b].transpose(0, 1)), _wide(o[a:b].transpose(0, 1))
        s = (qd @ kd.transpose(1, 2)) * scale
        s = s.masked_fill(~_allowed(b - a, window, q.device), float("-inf"))
        p = torch.exp(s - lse[:, a:b, None])
        dp = dod @ vd.transpose(1, 2)
        ds = p * (dp - (dod * od).sum(-1, keepdim=True))
        dq[a:b] = ((ds @ kd) * scale).transpose(0, 1).to(dq.dtype)
        hk = k.shape[1]
        dk[a:b] = ((ds.transpose(1, 2) @ qd) * scale).view(hk, groups, b - a, -1).sum(1).transpose(0, 1).to(dk.dtype)
        dv[a:b] = (p.transpose(1, 2) @ dod).view(hk, groups, b - a, -1).sum(1).transpose(0, 1).to(dv.dtype)
    return dq, dk, dv


def _flash_windows(window):
    return (None, None) if window is None else (window - 1, 0)


def _pick_kernel(device: torch.device, dtype: torch.dtype, docs: Documents, window: Optional[int]) -> str:
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "math"
    if docs.dense and (window is None or window >= docs.longest) and _prefers_cudnn():
        return "cudnn"
    return "flash"


def _prefers_cudnn() -> bool:
    """Whether torch's SDPA priority (qforge.attention.prefer_cudnn_attention) puts cuDNN first."""
    from torch.nn.attention import SDPBackend

    order = torch._C._get_sdp_priority_order()
    return bool(order) and order[0] == int(SDPBackend.CUDNN_ATTENTION) and torch.backends.cuda.cudnn_sdp_enabled()


def attention_forward(q: Tensor, k: Tensor, v: Tensor, docs: Documents, scale: float, window: Optional[int],
                      kernel: str) -> tuple[Tensor, tuple]:
    """Causal attention of token-major q [N, Hq, D], k/v [N, Hkv, D] over docs' documents.
    Returns (o [N, Hq, D], state): state holds the log-sum-exp (state[0]) and what the kernel's
    backward needs besides q, k, v, o."""
    if kernel == "math":
        o, lse = _math_forward(q, k, v, docs, scale, window)
        return o, (lse,)
    if kernel == "flash":
        left, right = _flash_windows(window)
        o, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, docs.cu_seqlens, docs.cu_seqlens, docs.longest, docs.longest, 0.0, True, False,
            scale=scale, window_size_left=left, window_size_right=right)
        return o, (lse, rng, unused)
    if kernel == "cudnn":
        B, T = docs.batch, docs.tokens
        qb, kb, vb = (t.view(B, T, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
        if kb.shape[1] != qb.shape[1] and not cudnn_takes_gqa(q.device):
            groups = qb.shape[1] // kb.shape[1]
            kb, vb = kb.repeat_interleave(groups, 1), vb.repeat_interleave(groups, 1)
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(qb, kb, vb, None, True, 0.0, True, False,
                                                                 scale=scale)
        o = out[0].transpose(1, 2).reshape(q.shape)  # [B, Hq, T, D] -> token-major
        return o, (out[1], *out[2:8])
    raise ValueError(f"attention kernel {kernel!r}: expected math, flash or cudnn")


def attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, state: tuple, docs: Documents,
                       scale: float, window: Optional[int], kernel: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of attention_forward, from its output and state (no forward recompute)."""
    if kernel == "math":
        return _math_backward(do, q, k, v, o, state[0], docs, scale, window)
    if kernel == "flash":
        left, right = _flash_windows(window)
        lse, rng, unused = state
        return torch.ops.aten._flash_attention_backward(
            do.contiguous(), q, k, v, o, lse, docs.cu_seqlens, docs.cu_seqlens, docs.longest, docs.longest, 0.0,
            True, rng, unused, scale=scale, window_size_left=left, window_size_right=right)
    if kernel == "cudnn":
        B, T = docs.batch, docs.tokens
        lse, cum_q, cum_k, max_q, max_k, seed, offset = state
        qb, kb, vb, ob, dob = (t.view(B, T, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v, o, do))
        groups = qb.shape[1] // kb.shape[1]
        repeat = groups > 1 and not cudnn_takes_gqa(q.device)
        if repeat:
            kb, vb = kb.repeat_interleave(groups, 1), vb.repeat_interleave(groups, 1)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dob, qb, kb, vb, ob, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, True, scale=scale)
        if repeat:
            dk = dk.unflatten(1, (-1, groups)).sum(2)
            dv = dv.unflatten(1, (-1, groups)).sum(2)
        return tuple(t.transpose(1, 2).reshape(x.shape) for t, x in ((dq, q), (dk, k), (dv, v)))
    raise ValueError(f"attention kernel {kernel!r}: expected math, flash or cudnn")


# ------------------------------------------------------------------ linear + LoRA
def _weight(lin: NF4Linear, dtype: torch.dtype) -> Tensor:
    """The dequantized weight, in the shared workspace (valid until the next dequantization)."""
    return dequantize_weight(*lin.weight.storage_args(), dtype, True)


def _linear(lin: NF4Linear, x: Tensor, residual: Optional[Tensor] = None, out: Optional[Tensor] = None
            ) -> tuple[Tensor, Optional[Tensor]]:
    """x [n, in] (compute dtype) -> (residual + x @ W^T + b + scaling * t @ B^T, t = x @ A^T or
    None without LoRA). The residual and the LoRA branch add inside the GEMMs (beta = 1). With a
    residual, ``out`` (of the residual's dtype promoted with x's) receives the result."""
    w = _weight(lin, x.dtype)
    if residual is not None and residual.dtype == x.dtype and lin.bias is None:
        y, residual = torch.addmm(residual, x, w.t(), out=out), None
    else:
        y = F.linear(x, w, None if lin.bias is None else lin.bias.to(x.dtype))
    t = None
    if lin.lora_A is not None:
        t = x @ lin.lora_A.weight.to(x.dtype).t()
        y.addmm_(t, lin.lora_B.weight.to(x.dtype).t(), alpha=lin.scaling)
    return (y if residual is None else torch.add(residual, y, out=out)), t


def _linear_backward(lin: NF4Linear, dout: Tensor, x: Tensor, t: Optional[Tensor], grads: dict) -> Tensor:
    """Backward of _linear given its input x and t = x @ A^T: adds the LoRA gradients into grads
    (by parameter, in its dtype) and returns dx."""
    dx = dout @ _weight(lin, dout.dtype)
    if lin.lora_A is not None:
        a, b = lin.lora_A.weight, lin.lora_B.weight
        g = dout @ b.to(dout.dtype)  # d t / scaling
        _accumulate(grads, b, dout.t() @ t, lin.scaling)
        _accumulate(grads, a, g.t() @ x, lin.scaling)
        dx.addmm_(g, a.to(dout.dtype), alpha=lin.scaling)
    return dx


def _accumulate(grads: dict, param: Tensor, g: Tensor, scale: float) -> None:
    g = g.to(param.dtype).mul_(scale)
    if param in grads:
        grads[param] += g
    else:
        grads[param] = g


# Rows of a stacked weight are padded to a multiple of this (zero rows), so the rows of its
# [tokens, rows] products stay 16-byte aligned in bf16 whatever the LoRA ranks.
STACK_ROW_ALIGN = 8


class _Stack:
    """Sibling projections that read the same input (q/k/v; gate/up; down alone) as one GEMM:
    their NF4 weights dequantized one below the other into qforge.nn's workspace, then their LoRA
    A matrices, then zero rows: [W_1; ...; W_p; A_1; ...; A_p; 0]. x @ stack^T yields every
    x @ W_i^T and every t_i = x @ A_i^T with one read of x; in backward dx = [dY_1, ..., dY_p, g]
    @ stack with g_i = dY_i @ (s_i B_i) is one GEMM (K = outputs + ranks) where each projection
    took a GEMM, an add and a LoRA GEMM. The NF4 parameters stay separate; only the workspace
    is shared."""

    def __init__(self, *lins: NF4Linear):
        self.lins = lins
        self.outputs = []  # (start, stop): each projection's rows
        start = 0
        for lin in lins:
            self.outputs.append((start, start + lin.out_features))
            start += lin.out_features
        self.out = start
        self.lora = []  # (lin, rows of its A, its output rows) of the projections with LoRA
        for lin, rows in zip(lins, self.outputs):
            if lin.lora_A is not None:
                self.lora.append((lin, (start, start + lin.r), rows))
                start += lin.r
        self.rank = start - self.out
        self.rows = -(-start // STACK_ROW_ALIGN) * STACK_ROW_ALIGN

    def weight(self, dtype: torch.dtype) -> Tensor:
        """[rows, in] in the shared workspace (valid until the next dequantization)."""
        w = dequantize_stacked([lin.weight for lin in self.lins], self.rows, dtype)
        for lin, (s, e), _ in self.lora:
            w[s:e].copy_(lin.lora_A.weight)
        w[self.out + self.rank:].zero_()
        return w

    def bias(self, dtype: torch.dtype) -> Optional[Tensor]:
        """[rows]: the projections' biases, zero elsewhere (None when none has one)."""
        if all(lin.bias is None for lin in self.lins):
            return None
        b = torch.zeros(self.rows, dtype=dtype, device=self.lins[0].weight.device)
        for lin, (s, e) in zip(self.lins, self.outputs):
            if lin.bias is not None:
                b[s:e] = lin.bias
        return b

    def scaled_b(self, dtype: torch.dtype) -> Tensor:
        """[out, rank]: each s_i B_i on the block diagonal (its output rows, its A's columns)."""
        b = torch.zeros(self.out, self.rank, dtype=dtype, device=self.lins[0].weight.device)
        for lin, (s, e), (o_s, o_e) in self.lora:
            b[o_s:o_e, s - self.out:e - self.out] = lin.lora_B.weight * lin.scaling
        return b

    def lora_grads(self, grads: dict, dy_t: Callable[[tuple, tuple], Tensor], g_x: Tensor) -> None:
        """Adds every LoRA gradient into grads: dB_i = s_i dY_i^T t_i, with dY_i^T t_i =
        dy_t(its output rows, its A's rows); dA_i = rows of g_x = g^T x (g already scaled)."""
        for lin, (s, e), outputs in self.lora:
            _accumulate(grads, lin.lora_B.weight, dy_t(outputs, (s, e)), lin.scaling)
            _accumulate(grads, lin.lora_A.weight, g_x[s - self.out:e - self.out], 1.0)


def _stack_matmul(stack: _Stack, x: Tensor, transposed: bool = False) -> Tensor:
    """x [n, in] -> x @ stack^T + bias [n, rows] (transposed: its transpose [rows, n], each
    projection's output a contiguous block of rows) with the LoRA terms s_i t_i B_i^T added into
    the projections' outputs when transposed (untransposed: the caller adds them where it makes
    each output contiguous, _stack_outputs)."""
    w, b = stack.weight(x.dtype), stack.bias(x.dtype)
    if not transposed:
        return x @ w.t() if b is None else torch.addmm(b, x, w.t())
    out = w @ x.t() if b is None else torch.addmm(b[:, None], w, x.t())
    if stack.rank:
        out[:stack.out].addmm_(stack.scaled_b(x.dtype), out[stack.out:stack.out + stack.rank])
    return out


def _stack_outputs(stack: _Stack, out: Tensor) -> list:
    """Each projection's output (contiguous) from _stack_matmul's untransposed [n, rows]: its
    columns plus s_i t_i B_i^T."""
    lora = {lin: (s, e) for lin, (s, e), _ in stack.lora}
    outputs = []
    for lin, (s, e) in zip(stack.lins, stack.outputs):
        if lin in lora:
            t = out[:, lora[lin][0]:lora[lin][1]]
            outputs.append(torch.addmm(out[:, s:e], t, lin.lora_B.weight.to(out.dtype).t(), alpha=lin.scaling))
        else:
            outputs.append(out[:, s:e].contiguous())
    return outputs


def _stack_output_grads(stack: _Stack, dys: list, t: Optional[Tensor], x: Tensor, x_rows: bool,
                        grads: dict) -> Tensor:
    """Backward of a stack up to its input gradient, given each projection's output gradient
    dY_i [n, out_i], t = x @ A^T [n, rank] of its forward and its input x ([n, in], or [in, n]
    with x_rows): adds the LoRA gradients into grads and returns [dY_1, ..., dY_p, g, 0]
    [n, rows] with g_i = dY_i @ (s_i B_i), for _stack_input_grad (x is no longer needed)."""
    n = dys[0].shape[0]
    dyg = torch.empty(n, stack.rows, dtype=dys[0].dtype, device=dys[0].device)
    for dy, (s, e) in zip(dys, stack.outputs):
        dyg[:, s:e] = dy
    if stack.rank:
        g = dyg[:, :stack.out] @ stack.scaled_b(dyg.dtype)
        stack.lora_grads(grads, lambda o, a: dyg[:, o[0]:o[1]].t() @ t[:, a[0] - stack.out:a[1] - stack.out],
                         g.t() @ (x.t() if x_rows else x))
        dyg[:, stack.out:stack.out + stack.rank] = g
    dyg[:, stack.out + stack.rank:].zero_()
    return dyg


def _stack_input_grad(stack: _Stack, dyg: Tensor, x_rows: bool) -> Tensor:
    """dx = [dY_1, ..., dY_p, g, 0] @ stack, one GEMM with K = rows ([in, n] with x_rows)."""
    w = stack.weight(dyg.dtype)
    return w.t() @ dyg.t() if x_rows else dyg @ w


# ------------------------------------------------------------------ the layer
class _Layer:
    """What one decoder layer needs (its modules, read at each call: nothing copied)."""

    def __init__(self, layer: nn.Module, family: str):
        attn, mlp = layer.self_attn, layer.mlp
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.q, self.k, self.v, self.o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.gate, self.up, self.down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.q_norm = getattr(attn, "q_norm", None) if family == "qwen3" else None
        self.k_norm = getattr(attn, "k_norm", None) if family == "qwen3" else None
        self.head_dim, self.scale = attn.head_dim, attn.scaling
        self.heads = attn.config.num_attention_heads
        if family == "mistral":
            self.window = getattr(attn.config, "sliding_window", None)
        else:
            self.window = getattr(attn, "sliding_window", None)
        self.projections = (self.q, self.k, self.v, self.o, self.gate, self.up, self.down)
        self.qkv, self.gate_up, self.down_stack = _Stack(self.q, self.k, self.v), _Stack(self.gate, self.up), \
            _Stack(self.down)

    def lora(self) -> list:
        """The LoRA weights (A, B of each projection with LoRA), read from the modules at each call:
        under FSDP2 they are the gathered tensors only while the layer's hooks have unsharded it."""
        return [p for lin in self.projections if lin.lora_A is not None
                for p in (lin.lora_A.weight, lin.lora_B.weight)]


def _eps(norm: nn.Module) -> float:
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))


def _norm(norm: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    return rms_norm_forward(x, norm.weight, _eps(norm))


def _norm_backward(norm: nn.Module, dy: Tensor, x: Tensor, rstd: Tensor) -> Tensor:
    return rms_norm_backward(dy.to(x.dtype), x, norm.weight, rstd)


class _Call:
    """One forward's settings shared by its layers: cos/sin [1 or B, T, head_dim]."""

    def __init__(self, docs: Documents, cos: Tensor, sin: Tensor, dtype: torch.dtype, tile: Optional[int],
                 offloader: _offload.HostOffloader, save_h: bool = True):
        self.docs, self.cos, self.sin, self.dtype, self.tile, self.offloader = docs, cos, sin, dtype, tile, offloader
        self.save_h = save_h  # False: backward recomputes h = x + o_proj(o) (saves host memory)


def _tiles(n: int, tile: Optional[int]):
    step = n if not tile else tile
    return [(s, min(n, s + step)) for s in range(0, n, max(1, step))]


def _qkv(lay: _Layer, call: _Call, n1: Tensor):
    """q, k, v token-major [N, H, D] after q_norm/k_norm and RoPE (one GEMM, _Stack); their
    LoRA t = n1 @ A^T [N, rank] (None without LoRA); and what q_norm/k_norm's backward needs
    ((q, k) before them and their rstd) or None."""
    B, T, D = call.docs.batch, call.docs.tokens, lay.head_dim
    out = _stack_matmul(lay.qkv, n1)
    q, k, v = _stack_outputs(lay.qkv, out)
    t = out[:, lay.qkv.out:lay.qkv.out + lay.qkv.rank].clone() if lay.qkv.rank else None
    del out
    q, k = q.view(B, T, -1, D), k.view(B, T, -1, D)
    normed = None
    if lay.q_norm is not None:
        (qn, q_rstd), (kn, k_rstd) = _norm(lay.q_norm, q), _norm(lay.k_norm, k)
        normed = (q, q_rstd, k, k_rstd)
        q, k = qn.to(call.dtype), kn.to(call.dtype)
    rope_forward_(q, call.cos, call.sin)
    rope_forward_(k, call.cos, call.sin)
    N = B * T
    return q.view(N, -1, D), k.view(N, -1, D), v.view(N, -1, D), t, normed


def _forward(lay: _Layer, call: _Call, x: Tensor, kernel: str):
    """The layer's output y; the handles of x, o, lse and h (each handed to the offloader as soon
    as it exists, so its copy to the host overlaps the rest of the layer); the attention state
    besides lse; and o_proj's and down_proj's LoRA t (N x r, kept on the device)."""
    B, T, H = x.shape
    N, cd, save = B * T, call.dtype, call.offloader.save
    saved = [save(x)]
    n1 = _norm(lay.norm1, x)[0].to(cd).view(N, H)
    q, k, v, _, _ = _qkv(lay, call, n1)
    del n1
    o, state = attention_forward(q, k, v, call.docs, lay.scale, lay.window, kernel)
    del q, k, v
    saved += [save(o), save(state[0])]
    h, t_o = _linear(lay.o, o.view(N, -1), residual=x.view(N, H))
    saved.append(save(h.view(B, T, H)) if call.save_h else None)
    del o
    # the layer's output is no view: FSDP2 hooks it for its pre-backward unshard (and warns on views)
    y = torch.empty(B, T, H, dtype=h.dtype, device=h.device)
    t_down = None
    for s, e in _tiles(N, call.tile):
        n2 = _norm(lay.norm2, h[s:e])[0].to(cd)
        m = _gate_up(lay, n2)[0]
        del n2
        t = _linear(lay.down, m.t(), residual=h[s:e], out=y.view(N, H)[s:e])[1]
        if t is None or e - s == N:  # no LoRA, or one tile: its t is the layer's
            t_down = t
            continue
        if t_down is None:
            t_down = t.new_empty(N, t.shape[1])
        t_down[s:e] = t
    return y, saved, state[1:], (t_o, t_down)


class _DecoderLayer(torch.autograd.Function):
    """One decoder layer: forward saves x, h, o and the attention state; backward recomputes
    the norms, q/k/v + RoPE and gate/up + SwiGLU and nothing else."""

    @staticmethod
    def forward(ctx, lay: _Layer, call: _Call, x: Tensor, *lora: Tensor):
        kernel = _pick_kernel(x.device, call.dtype, call.docs, lay.window)
        with torch.autocast(x.device.type, enabled=False):
            y, saved, ctx.state, ctx.t = _forward(lay, call, x, kernel)
        # saved in the reverse of the order backward loads them: each load prefetches the one before
        ctx.x, ctx.o, ctx.lse, ctx.h = saved
        ctx.lay, ctx.call, ctx.kernel = lay, call, kernel
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        lay, call, off = ctx.lay, ctx.call, ctx.call.offloader
        need_dx = ctx.needs_input_grad[2]
        grads: dict = {}
        t_o, t_down = ctx.t
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.h is not None:
                h = off.load(ctx.h)  # brings lse back meanwhile; o and x too, while the MLP runs
                off.prefetch(ctx.o)
                off.prefetch(ctx.x)
                dh = _mlp_backward(lay, call, h, dy, t_down, grads)
                del h
                lse, o, x = off.load(ctx.lse), off.load(ctx.o), off.load(ctx.x)  # x's prefetches the layer below
            else:  # h was not kept (host budget): h = x + o_proj(o) again, one GEMM
                lse, o, x = off.load(ctx.lse), off.load(ctx.o), off.load(ctx.x)
                h = _linear(lay.o, o.view(x.shape[0] * x.shape[1], -1), residual=x.view(-1, x.shape[-1]))[0]
                dh = _mlp_backward(lay, call, h.view(x.shape), dy, t_down, grads)
                del h
            dx = _attention_backward(lay, call, x, o, (lse, *ctx.state), t_o, dh, ctx.kernel, grads, need_dx)
        ctx.x = ctx.o = ctx.lse = ctx.h = ctx.state = ctx.t = ctx.call = None
        return (None, None, dx, *[grads.get(p) for p in lay.lora()])


def _gate_up(lay: _Layer, n2: Tensor) -> tuple[Tensor, Tensor]:
    """(m, gu) for a tile n2 [n, H]: gu = [gate; up; t; 0] [rows, n] (transposed, so gate and up
    are contiguous blocks of rows, one GEMM; LoRA added) and m = silu(gate) * up [I, n]."""
    gu = _stack_matmul(lay.gate_up, n2, transposed=True)
    inter = lay.gate.out_features
    return swiglu_forward(gu[:inter], gu[inter:2 * inter]), gu


def _mlp_backward(lay: _Layer, call: _Call, h: Tensor, dy: Tensor, t_down: Optional[Tensor],
                  grads: dict) -> Tensor:
    """dh = dy + d(mlp_block(h))/dh, over token tiles; LoRA gradients into grads."""
    B, T, H = h.shape
    N, cd = B * T, call.dtype
    hf, dyf = h.view(N, H), dy.reshape(N, H)
    dh = torch.empty(N, H, dtype=torch.promote_types(h.dtype, dy.dtype), device=h.device)
    for s, e in _tiles(N, call.tile):
        ht = hf[s:e]
        n2, rstd = _norm(lay.norm2, ht)
        n2 = n2.to(cd)
        m, gu = _gate_up(lay, n2)  # [I, n], [rows, n]
        dyg = _stack_output_grads(lay.down_stack, [dyf[s:e].to(cd)], None if t_down is None else t_down[s:e], m,
                                  True, grads)
        del m
        dm = _stack_input_grad(lay.down_stack, dyg, True)  # [I, n], as gate and up
        del dyg
        stack, inter = lay.gate_up, lay.gate.out_features
        swiglu_backward_(dm, gu[:inter], gu[inter:2 * inter])  # dgate, dup over gate and up
        del dm
        if stack.rank:  # dB from t's rows, then g over them: gu = [dgate; dup; g; 0]
            g = stack.scaled_b(cd).t() @ gu[:stack.out]
            stack.lora_grads(grads, lambda o, a: gu[o[0]:o[1]] @ gu[a[0]:a[1]].t(), g @ n2)
            gu[stack.out:stack.out + stack.rank] = g
            del g
        dn2 = gu.t() @ stack.weight(cd)  # the zero rows of the stack kept gu's last rows at 0
        del gu
        torch.add(dyf[s:e], _norm_backward(lay.norm2, dn2, ht, rstd), out=dh[s:e])
    return dh.view(B, T, H)


def _attention_backward(lay: _Layer, call: _Call, x: Tensor, o: Tensor, state: tuple, t_o: Optional[Tensor],
                        dh: Tensor, kernel: str, grads: dict, need_dx: bool) -> Optional[Tensor]:
    """dx = dh + d(attention_block(x))/dx (None when not need_dx); LoRA gradients into grads."""
    B, T, H = x.shape
    N, cd, D = B * T, call.dtype, lay.head_dim
    n1, rstd1 = _norm(lay.norm1, x)
    n1 = n1.to(cd).view(N, H)
    q, k, v, t, normed = _qkv(lay, call, n1)
    do = _linear_backward(lay.o, dh.view(N, H).to(cd), o.view(N, -1), t_o, grads).view(o.shape)
    dq, dk, dv = attention_backward(do, q, k, v, o, state, call.docs, lay.scale, lay.window, kernel)
    del do, q, k, v, o
    dq, dk = dq.view(B, T, -1, D), dk.view(B, T, -1, D)
    rope_backward_(dq, call.cos, call.sin)
    rope_backward_(dk, call.cos, call.sin)
    if normed is not None:  # Qwen3: through q_norm / k_norm (frozen weights)
        q_in, q_rstd, k_in, k_rstd = normed
        dq = _norm_backward(lay.q_norm, dq, q_in, q_rstd)
        dk = _norm_backward(lay.k_norm, dk, k_in, k_rstd)
    dyg = _stack_output_grads(lay.qkv, [dq.reshape(N, -1), dk.reshape(N, -1), dv.reshape(N, -1)], t, n1, False,
                              grads)
    del dq, dk, dv, t, n1
    if not need_dx:
        return None
    dn1 = _stack_input_grad(lay.qkv, dyg, False)
    del dyg
    return dh.add_(_norm_backward(lay.norm1, dn1.view(B, T, H), x, rstd1))


# ------------------------------------------------------------------ installing it
def _layer_class(layer: nn.Module) -> type:
    """The layer's transformers class; fully_shard makes a layer an instance of a generated
    FSDP<class> subclass, which adds only FSDP2's hooks."""
    cls = type(layer)
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        if isinstance(layer, FSDPModule):
            return next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    return cls


def unsupported_reason(layer: nn.Module) -> Optional[str]:
    """Why this layer cannot run fused (None: it can)."""
    name = _layer_class(layer).__name__
    family = SUPPORTED_LAYERS.get(name)
    if family is None:
        return f"{name} is not one of {', '.join(sorted(SUPPORTED_LAYERS))}"
    for path in _PROJECTIONS:
        lin = layer.get_submodule(path)
        if not isinstance(lin, NF4Linear):
            return f"{path} is a {type(lin).__name__}, not a qforge NF4Linear"
        if lin.lora_A is not None and not isinstance(lin.lora_dropout, nn.Identity):
            return f"{path} has LoRA dropout {lin.lora_dropout.p} (the fused layer has none)"
        if lin.weight.is_meta:
            return f"{path}'s weight is not loaded (meta)"
    config = layer.self_attn.config
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        return f"MLP activation {act!r} (the fused layer has SwiGLU)"
    if getattr(config, "attention_dropout", 0.0):
        return f"attention dropout {config.attention_dropout}"
    has_qk_norm = hasattr(layer.self_attn, "q_norm")
    if has_qk_norm != (family == "qwen3"):
        return f"{name} {'has' if has_qk_norm else 'lacks'} q_norm/k_norm"
    return None


@dataclasses.dataclass
class FusedStatus:
    fused: int  # decoder layers that run fused
    layers: int  # decoder layers in all
    reason: Optional[str] = None  # why some did not (the first layer's reason)

    def __str__(self):
        if self.fused == self.layers:
            return f"fused decoder layers: on ({self.fused} layers, hand-written backward)"
        return (f"fused decoder layers: {self.fused} of {self.layers} "
                f"(the rest keep checkpointed recompute: {self.reason})")


_OUTSIDE = object()  # no model forward running: a layer called directly takes its own attention_mask


class _State:
    """Per model: the offloader, the padding mask of the current forward, one cached Documents."""

    def __init__(self, offloader, tile, host_budget: Optional[int], layers: int):
        self.offloader, self.tile = offloader, tile
        self.mask = _OUTSIDE  # the model's padding mask while its forward runs
        self.cache = None  # (key, Documents)
        self.warned: set = set()
        self.host_budget, self.layers = host_budget, layers
        self.host_used, self.layer_index = 0, 0  # this forward's: bytes sent to the host, layers run

    def start_forward(self) -> None:
        self.host_used, self.layer_index = 0, 0

    def plan_saves(self, hidden: Tensor, o_bytes: int, lse_bytes: int) -> str:
        """What this layer keeps for backward, within the host budget: "all" (x, o, lse, h), "no_h"
        (h recomputed from x and o with one GEMM) or "x" (checkpointed recompute, as qforge.offload,
        which re-runs attention). A layer takes "all" only while every later layer of the forward
        can still have "no_h", and "no_h" while every later one can have "x"."""
        x_bytes = hidden.numel() * hidden.element_size()
        size = {"all": 2 * x_bytes + o_bytes + lse_bytes, "no_h": x_bytes + o_bytes + lse_bytes, "x": x_bytes}
        later = max(0, self.layers - self.layer_index - 1)
        self.layer_index += 1
        if self.host_budget is None:
            return "all"
        for mode, floor in (("all", "no_h"), ("no_h", "no_h"), ("no_h", "x"), ("x", "x")):
            if self.host_used + size[mode] + later * size[floor] <= self.host_budget or mode == "x":
                self.host_used += size[mode]
                return mode

    def documents(self, position_ids, mask, batch, tokens, device) -> Documents:
        key = (position_ids, None if position_ids is None else position_ids._version, mask,
               None if mask is None else mask._version, batch, tokens)
        if self.cache is not None and len(self.cache[0]) == len(key) and all(
                a is b if isinstance(b, Tensor) or b is None else a == b for a, b in zip(self.cache[0], key)):
            return self.cache[1]
        docs = packed_documents(position_ids, mask, batch, tokens, device)
        self.cache = (key, docs)
        return docs

    def warn_once(self, why: str) -> None:
        if why not in self.warned:
            self.warned.add(why)
            log.warning("qforge.decoder: running a layer with checkpointed recompute instead: %s", why)


_KNOWN_KWARGS = {"attention_mask", "position_ids", "position_embeddings", "cache", "past_key_values",
                 "past_key_value", "use_cache", "cache_position", "output_attentions"}


def _call_refusal(kw: Optional[dict], hidden: Tensor, mask) -> Optional[str]:
    """Why this call cannot run fused (None: it can)."""
    if kw is None:
        return "the checkpoint call does not carry the layer's keyword arguments"
    if any(kw.get(n) is not None for n in ("cache", "past_key_values", "past_key_value")):
        return "a KV cache was passed"
    if kw.get("output_attentions"):
        return "output_attentions"
    unknown = sorted(n for n, val in kw.items() if n not in _KNOWN_KWARGS and val is not None)
    if unknown:
        return f"unsupported arguments {unknown}"
    if kw.get("position_embeddings") is None:
        return "no position_embeddings"
    if hidden.dim() != 3:
        return f"hidden states of shape {tuple(hidden.shape)}"
    if mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 2):
        return f"an attention mask of shape {tuple(getattr(mask, 'shape', ()))} (only 2-D padding masks)"
    return None


def _fused_checkpoint(lay: _Layer, state: _State, fallback, run, hidden, *args, **kwargs):
    """The layer's ``_gradient_checkpointing_func``: transformers calls it as func(run, hidden),
    with the layer's keyword arguments bound into run (a functools.partial)."""
    kw = run.keywords if isinstance(run, functools.partial) and not args and not kwargs else None
    mask = None if kw is None else (kw.get("attention_mask") if state.mask is _OUTSIDE else state.mask)
    why = _call_refusal(kw, hidden, mask)
    if why is not None:
        state.warn_once(why)
        return fallback(run, hidden, *args, **kwargs)
    B, T, _ = hidden.shape
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
        else hidden.dtype
    saves = state.plan_saves(hidden, B * T * lay.heads * lay.head_dim * dtype.itemsize, lay.heads * B * T * 4)
    if saves == "x":
        state.warn_once("the host budget holds only the layer inputs (qforge.decoder.enable's host_budget_gib)")
        return fallback(run, hidden, *args, **kwargs)
    docs = state.documents(kw.get("position_ids"), mask, B, T, hidden.device)
    cos, sin = kw["position_embeddings"]
    call = _Call(docs, cos.to(dtype), sin.to(dtype), dtype, state.tile, state.offloader, save_h=saves == "all")
    if _calls_module(run):  # the layer's hooks (FSDP2's unshard, reshard, pre- and post-backward) around it
        return run(hidden, **{_FUSED_CALL: call})
    return _DecoderLayer.apply(lay, call, hidden, *lay.lora())


def _calls_module(run) -> bool:
    """Whether run calls the layer through nn.Module.__call__, hooks included: older transformers
    (5.17) checkpoint the layer's __call__; newer ones (5.24) checkpoint its forward, with the
    hooks already run around this call."""
    return getattr(run.func, "__func__", None) is nn.Module.__call__


# The keyword through which _fused_checkpoint hands its _Call to a fused layer's forward.
_FUSED_CALL = "_qforge_fused_call"


def _layer_forward(lay: _Layer, layer: nn.Module, *args, **kwargs):
    """A fused layer module's forward: the fused layer when _fused_checkpoint passes its _Call,
    else the forward it had before: its own, or its class's as of now (fully_shard after enable()
    changes the class; transformers' checkpointing wraps the outermost class's forward)."""
    call = kwargs.pop(_FUSED_CALL, None)
    if call is not None:
        return _DecoderLayer.apply(lay, call, args[0], *lay.lora())
    plain = layer.__dict__["_qforge_plain_forward"]
    return plain(*args, **kwargs) if plain is not None else type(layer).forward(layer, *args, **kwargs)


def _install_forward(layer: nn.Module, lay: _Layer) -> None:
    layer._qforge_plain_forward = layer.__dict__.get("forward")  # None: the class's
    layer.forward = functools.partial(_layer_forward, lay, layer)


def _restore_forward(layer: nn.Module) -> None:
    if "_qforge_plain_forward" not in layer.__dict__:
        return
    plain = layer.__dict__.pop("_qforge_plain_forward")
    if plain is None:
        del layer.forward
    else:
        layer.forward = plain


def _stack_owner(model: nn.Module, layers: list) -> Optional[nn.Module]:
    """The module whose forward runs the decoder layers (holds them in a ModuleList)."""
    first = layers[0]
    for m in model.modules():
        for child in m.children():
            if isinstance(child, nn.ModuleList) and any(c is first for c in child):
                return m
    return None


FUSED_LAYER_SETTINGS = ("auto", "on", "off")


def wanted(setting: str, device: torch.device, checkpointing: bool, compiled: bool,
           distributed: bool = False) -> tuple[bool, str]:
    """Whether a training run uses fused layers (``qforge train --fused-layers``), and why.
    auto: on CUDA, with checkpointing, not compiled, in one process. Under torchrun FSDP2's hooks
    gather each fused layer (tested over gloo), but auto waits for a multi-GPU run to confirm it:
    ``on`` turns them on there. on: wherever it can run (any device; refused with --compile).
    off: never."""
    if setting not in FUSED_LAYER_SETTINGS:
        raise ValueError(f"fused layers: expected one of {', '.join(FUSED_LAYER_SETTINGS)}, got {setting!r}")
    if setting == "off":
        return False, "--fused-layers off"
    blocker = "--compile (compiled layers keep transformers' checkpointing)" if compiled else None
    if setting == "on":
        if blocker:
            raise ValueError(f"--fused-layers on does not combine with {blocker}")
        return True, "--fused-layers on"
    if blocker:
        return False, blocker
    if device.type != "cuda":
        return False, f"auto: on CUDA only (this run is on {device.type})"
    if not checkpointing:
        return False, "auto: gradient checkpointing is off"
    if distributed:
        return False, "auto: off under torchrun until measured on GPUs (--fused-layers on turns them on)"
    return True, "auto"


def default_host_budget() -> int:
    """HOST_BUDGET_FRACTION of this machine's physical memory, in bytes."""
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * HOST_BUDGET_FRACTION)


# What the offloaded saves of one forward may take of the host's memory by default: at 131,072
# tokens of a Llama-3.1-8B, x, o and h are 1 GiB each a layer (96 GiB for 32 layers).
HOST_BUDGET_FRACTION = 0.6


# Saves whose copy to the host may be pending: a layer hands over x, then o and lse, then h, so
# with three the o_proj GEMM does not wait for o's copy before h is handed over.
MAX_INFLIGHT_COPIES = 3


def enable(model: nn.Module, offload: bool = True, tile_tokens: Optional[int] = _offload.DEFAULT_TILE_TOKENS,
           max_inflight: int = MAX_INFLIGHT_COPIES, host_budget_gib: Optional[float] = None
           ) -> FusedStatus:
    """Per-layer checkpointing (qforge.offload.enable, same arguments) with every supported decoder
    layer fused (module doc). Returns which layers run fused, and why the others do not.

    With ``offload``, the saves of one forward stay within ``host_budget_gib`` of host memory
    (default: HOST_BUDGET_FRACTION of physical memory), layer by layer (_State.plan_saves): x, o,
    lse and h; or x, o and lse (backward recomputes h with one GEMM); or only x (checkpointed
    recompute, as qforge.offload)."""
    if host_budget_gib is not None and not host_budget_gib > 0:
        raise ValueError(f"decoder.enable: host_budget_gib must be > 0 or None, got {host_budget_gib!r}")
    offloader = _offload.enable(model, offload=offload, tile_tokens=tile_tokens, max_inflight=max_inflight)
    layers = decoder_layers(model)
    _remove_hooks(model)
    budget = None if not offload else (int(host_budget_gib * 2**30) if host_budget_gib is not None
                                       else default_host_budget())
    state = _State(offloader, tile_tokens, budget, 0)
    owner = _stack_owner(model, layers)
    fused, reason = 0, None
    if owner is None:
        reason = "the decoder layers' parent module was not found"
    for layer in layers:
        why = reason or unsupported_reason(layer)
        if why is not None:
            reason = reason or why
            continue
        lay = _Layer(layer, SUPPORTED_LAYERS[_layer_class(layer).__name__])
        layer._gradient_checkpointing_func = functools.partial(_fused_checkpoint, lay, state,
                                                               layer._gradient_checkpointing_func)
        _install_forward(layer, lay)
        fused += 1
    state.layers = fused
    if fused:
        def remember_mask(module, args, kwargs):
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            state.mask = mask if isinstance(mask, Tensor) else None
            state.start_forward()

        def forget_mask(module, args, output):
            state.mask = _OUTSIDE

        model._qforge_decoder_hooks = [owner.register_forward_pre_hook(remember_mask, with_kwargs=True),
                                       owner.register_forward_hook(forget_mask)]
    status = FusedStatus(fused, len(layers), reason)
    model._qforge_decoder = status
    if fused < len(layers):
        log.warning("qforge.decoder: %s", status)
    return status


def _remove_hooks(model: nn.Module) -> None:
    """The mask hooks and the layers' fused forwards of an earlier enable() removed."""
    for hook in getattr(model, "_qforge_decoder_hooks", None) or ():
        hook.remove()
    model._qforge_decoder_hooks = None
    for layer in decoder_layers(model):
        _restore_forward(layer)


def disable(model: nn.Module) -> nn.Module:
    """Undo :func:`enable` (and the checkpointing it turned on)."""
    _remove_hooks(model)
    model._qforge_decoder = None
    return _offload.disable(model)
