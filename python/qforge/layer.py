"""Fused kernels of a decoder layer: RMSNorm, SwiGLU and rotary embeddings.

Each makes one pass over its tensors where eager PyTorch makes several
(docs/layer_kernels.md has the formulas, rounding points and bandwidths).

Differentiable (torch custom ops, torch.compile-able):

* ``rms_norm(x, weight, eps)`` -- Hugging Face's LlamaRMSNorm; the weight is
  frozen (a weight that requires grad is refused).
* ``swiglu(gate, up)`` -- ``F.silu(gate) * up``.
* ``apply_rope(q, k, cos, sin)`` -- ``apply_rotary_pos_emb`` on q, k in the
  projections' [batch, seq, heads, head_dim] layout.

Raw forward/backward pieces for hand-written backward passes:
``rms_norm_forward``, ``rms_norm_backward``, ``swiglu_forward``,
``swiglu_backward``, ``swiglu_backward_`` (gradients over gate/up),
``rope_forward_`` and ``rope_backward_`` (in place).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .ops.layer import (rms_norm_backward, rms_norm_forward, rope_backward_, rope_forward_, swiglu_backward,
                        swiglu_backward_, swiglu_forward)

__all__ = ["rms_norm", "swiglu", "apply_rope", "rms_norm_forward", "rms_norm_backward", "swiglu_forward",
           "swiglu_backward", "swiglu_backward_", "rope_forward_", "rope_backward_"]


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """LlamaRMSNorm(x) with `weight` (x's dtype or fp32), output in x's dtype."""
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("qforge.layer.rms_norm: the weight must be frozen (requires_grad=False); "
                         "its gradient is not computed")
    return torch.ops.qforge.rms_norm_forward(x, weight, eps)[0]


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up (same shape and dtype)."""
    return torch.ops.qforge.swiglu_forward(gate, up)


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """(q, k) rotated: x * cos + rotate_half(x) * sin for q [B, T, Hq, Dh] and
    k [B, T, Hk, Dh] (contiguous), cos/sin [T, Dh] or [1 or B, T, Dh] as
    LlamaRotaryEmbedding returns them (x's dtype or fp32)."""
    return torch.ops.qforge.rope(q, cos, sin, False), torch.ops.qforge.rope(k, cos, sin, False)
