"""Which scaled-dot-product-attention kernel training runs.

At long context attention is nearly all of a step's time (one Llama-3.1-8B layer, forward +
backward at 131,072 tokens on an H200, torch 2.11: flash 1506 ms, cuDNN 906 ms; at 2048 tokens
1.32 ms against 0.41 ms; bench/sdpa_backends.py), and torch tries flash before cuDNN. So

    with qforge.attention.prefer_cudnn_attention():
        loss = model(...).loss
        loss.backward()

puts cuDNN's kernel first (then flash, memory-efficient, math: inputs cuDNN refuses still run).
The preference is torch's global SDPA priority, so it also holds in the autograd engine's
threads that run backward. transformers hands grouped-query attention to SDPA as
``enable_gqa=True`` when it can; where this torch's cuDNN kernel refuses that, transformers is
told to repeat the K/V heads instead (as it does for other kernels), so the calls still reach
cuDNN.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

__all__ = ["prefer_cudnn_attention", "cudnn_takes_gqa"]


def cudnn_takes_gqa(device=None) -> bool:
    """Whether cuDNN's SDPA kernel runs grouped-query inputs (enable_gqa=True) here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.zeros(1, 4, 8, 64, device=device or "cuda", dtype=torch.bfloat16)
    kv = torch.zeros(1, 2, 8, 64, device=q.device, dtype=torch.bfloat16)
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
        return True
    except RuntimeError:
        return False


@contextlib.contextmanager
def prefer_cudnn_attention():
    """Context: SDPA tries cuDNN, flash, memory-efficient, math, in that order (CUDA only)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not torch.cuda.is_available():
        raise RuntimeError("prefer_cudnn_attention: needs a CUDA device")
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    patched = None
    if not cudnn_takes_gqa():
        from transformers.integrations import sdpa_attention

        patched = sdpa_attention.use_gqa_in_sdpa
        sdpa_attention.use_gqa_in_sdpa = lambda *args, **kwargs: False
    try:
        with sdpa_kernel(order, set_priority=True):
            yield
    finally:
        if patched is not None:
            sdpa_attention.use_gqa_in_sdpa = patched
