"""Attention for training: one entry point for packed (variable-length) and dense batches, and
which scaled-dot-product-attention kernel dense SDPA runs.

``attention(q, k, v, cu_seqlens=..., causal=..., sliding_window=..., softcap=..., scale=...)``
takes SDPA's layout (q [B, Hq, T, D], k/v [B, Hkv, T, D], Hq a multiple of Hkv for grouped-query
attention) and, for packed rows, the document boundaries as ``cu_seqlens``: offsets into the B*T
tokens read row after row (0, end of document 1, ..., B*T; every row end is a boundary). No
backend builds a T x T mask for a packed batch:

- ``varlen``: torch's variable-length flash attention (torch.nn.attention.varlen; CUDA, fp16/bf16,
  no softcap);
- ``flash_attn``: the flash-attn package's flash_attn_varlen_func, where it is installed (CUDA);
- ``flex``: FlexAttention with a block mask (document + causal + sliding window) and a softcap
  score_mod. The block mask is classified block pair by block pair from the document bounds,
  O((T/128)^2) memory (torch's create_block_mask evaluates the mask on all T x T pairs), and built
  once a batch for all layers: eagerly through a cache on the cu_seqlens tensor, in compiled graphs
  (the whole model's, or each layer's) through the op ``qforge::flex_block_mask``, which reads the
  same cache at run time. torch runs flex's backward on CUDA only; on CPU it is forward-only (and
  eager flex on CPU is torch's reference implementation);
- ``sdpa``: scaled_dot_product_attention for dense batches (no cu_seqlens, or one document a row);
- ``documents``: any device, any dtype: one SDPA (or, with softcap, one explicit softmax) per
  document, so memory grows with the longest document, never with T^2. It is the torch op
  ``qforge::document_attention`` (its backward ``qforge::document_attention_backward``, the
  gradients spelled out per document), so a compiled graph holds it as one node, no graph break.

``auto`` picks flash_attn, then varlen, then flex on CUDA, sdpa for dense batches, and documents
on CPU (compiled or not). ``register_with_transformers()`` makes all this transformers' attention
implementation "qforge": packed position_ids (restarting per document) become cu_seqlens, and the
mask transformers builds for it is at most the 2D padding mask. ``use_for_training`` and
``packed_inputs`` are what ``qforge train --attention`` runs.

Which scaled-dot-product-attention kernel training runs (dense SDPA):

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
import inspect
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["prefer_cudnn_attention", "cudnn_takes_gqa", "attention", "cu_seqlens_from_position_ids",
           "available_backends", "register_with_transformers", "BACKENDS", "ATTENTION_CHOICES", "training_backend",
           "use_for_training", "packed_inputs"]


# device -> whether its cuDNN attention kernel takes grouped-query K/V: probed once per device
_cudnn_gqa: dict = {}


def cudnn_takes_gqa(device=None) -> bool:
    """Whether cuDNN's attention kernel (aten._scaled_dot_product_cudnn_attention as training calls
    it, with the log-sum-exp) takes K/V with fewer heads than q on ``device`` (default: the current
    CUDA device); asked once per device. qforge.decoder calls the kernel itself, and SDPA with
    enable_gqa=True hands it K/V as they are, its cuDNN gate asking only that their heads divide
    q's (torch 2.11 to 2.15: sdp_utils.cpp, attention.cpp), so one answer serves both. SDPA's
    other gates (cuDNN SDPA switched off, deterministic algorithms) keep it from cuDNN whatever the
    heads."""
    device = torch.device("cuda" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _cudnn_gqa:
        q = torch.zeros(1, 4, 16, 64, device=device, dtype=torch.bfloat16)
        kv = torch.zeros(1, 2, 16, 64, device=device, dtype=torch.bfloat16)
        try:
            torch.ops.aten._scaled_dot_product_cudnn_attention(q, kv, kv, None, True, 0.0, True, False)
            _cudnn_gqa[device] = True
        except RuntimeError:  # cuDNN's refusal (NotImplementedError too: no cuDNN kernel on this device)
            _cudnn_gqa[device] = False
    return _cudnn_gqa[device]


@contextlib.contextmanager
def prefer_cudnn_attention(device=None):
    """Context: SDPA tries cuDNN, flash, memory-efficient, math, in that order (CUDA only).
    ``device``: the GPU whose cuDNN is asked whether it takes grouped-query inputs (default: the
    current one)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not torch.cuda.is_available():
        raise RuntimeError("prefer_cudnn_attention: needs a CUDA device")
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    patched = None
    if not cudnn_takes_gqa(device):
        from transformers.integrations import sdpa_attention

        patched = sdpa_attention.use_gqa_in_sdpa
        sdpa_attention.use_gqa_in_sdpa = lambda *args, **kwargs: False
    try:
        with sdpa_kernel(order, set_priority=True):
            yield
    finally:
        if patched is not None:
            sdpa_attention.use_gqa_in_sdpa = patched


BACKENDS = ("auto", "varlen", "flash_attn", "flex", "sdpa", "documents")

# Set by register_with_transformers(); read by the "qforge" attention function transformers calls.
_hf_settings = {"backend": "auto"}
# One entry each: the cu_seqlens derived from the position_ids every layer of a forward shares, and
# the FlexAttention block masks built for a batch's cu_seqlens (one per causal/window kind, built
# at the first layer and reused by the others, eager or compiled: see _flex_block_mask_op).
_cu_seqlens_cache: list = []
_block_mask_cache: list = []
# The cu_seqlens last checked (each check reads it on the host), with its longest document.
_checked_cache: list = []
stats = {"block_masks_built": 0}


def _cache_hit(cache, key) -> bool:
    """Whether the one-entry cache holds key: tensors compared by identity, the rest by value."""
    return bool(cache) and all(a is b if isinstance(b, torch.Tensor) or b is None else a == b
                               for a, b in zip(cache[0], key))


try:
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
except ImportError:  # a torch without it
    _torch_varlen_attn = None
# whether this torch's varlen_attn takes grouped-query K/V itself (else its heads are repeated)
_VARLEN_TAKES_GQA = _torch_varlen_attn is not None and "enable_gqa" in inspect.signature(_torch_varlen_attn).parameters


def _varlen_attn():
    return _torch_varlen_attn


try:  # resolved once at import: an import that fails inside a traced forward is a graph break (Dynamo: "Import failure")
    from flash_attn import flash_attn_varlen_func as _flash_attn_varlen_func
except ImportError:  # the flash-attn package is optional
    _flash_attn_varlen_func = None


def _flash_attn_varlen():
    return _flash_attn_varlen_func


def available_backends(device) -> list[str]:
    """The backends attention() can run on this device, in auto's order of preference."""
    names = []
    if torch.device(device).type == "cuda":
        if _flash_attn_varlen() is not None:
            names.append("flash_attn")
        if _varlen_attn() is not None:
            names.append("varlen")
    return names + ["flex", "sdpa", "documents"]


def cu_seqlens_from_position_ids(position_ids: torch.Tensor, padding_mask: torch.Tensor | None = None
                                 ) -> torch.Tensor:
    """Document boundaries of packed rows: a document starts at each row start and wherever
    position_ids does not continue (p[i] != p[i-1] + 1). With a [B, T] padding mask (True = token),
    every padding token is a document of its own, so no real token attends to one.
    Returns int32 offsets into the B*T tokens, row after row: 0, ..., B*T."""
    if position_ids.dim() != 2 or position_ids.shape[1] == 0:
        raise ValueError(f"position_ids: expected shape [batch, tokens>0], got {tuple(position_ids.shape)}")
    if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
        raise ValueError(f"position_ids: expected an integer tensor, got {position_ids.dtype}")
    B, T = position_ids.shape
    pos = position_ids.long()
    start = torch.ones_like(pos, dtype=torch.bool)
    start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if padding_mask is not None:
        if tuple(padding_mask.shape) != (B, T):
            raise ValueError(f"padding mask: expected shape {(B, T)} like position_ids, got "
                             f"{tuple(padding_mask.shape)}")
        pad = ~padding_mask.to(device=pos.device, dtype=torch.bool)
        start[:, 1:] |= pad[:, 1:] | pad[:, :-1]
    starts = start.reshape(-1).nonzero().flatten()
    return torch.cat([starts, starts.new_tensor([B * T])]).to(torch.int32)


def _check_window(sliding_window):
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                       or sliding_window < 1):
        raise ValueError(f"attention: sliding_window must be a positive int or None, got {sliding_window!r}")


def _check_shapes(q, k, v, sliding_window, softcap, scale):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"attention: {name} must be [batch, heads, tokens, head_dim], got shape {tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    B, Hq, T, D = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, T, D):
        raise ValueError(f"attention: k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch, tokens "
                         "or head_dim")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"attention: q's {Hq} heads are not a multiple of k/v's {k.shape[1]} heads")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v differ in dtype or device ({q.dtype}/{k.dtype}/{v.dtype}, "
                         f"{q.device}/{k.device}/{v.device})")
    _check_window(sliding_window)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"attention: softcap must be > 0 or None, got {softcap!r}")
    if scale is not None and not (scale > 0 and scale < float("inf")):
        raise ValueError(f"attention: scale must be a positive finite number or None, got {scale!r}")


def _check_offsets_type(cu_seqlens):
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 2:
        raise ValueError(f"attention: cu_seqlens must be a 1-D int32/int64 tensor of >= 2 offsets, got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")


def _check_offsets_rise(cu_seqlens, total):
    """cu_seqlens as int64, after checking (on the host) that it rises strictly from 0 to total."""
    cu = cu_seqlens.long()
    if cu[0].item() != 0 or cu[-1].item() != total or not bool((cu[1:] > cu[:-1]).all()):
        raise ValueError(f"attention: cu_seqlens must rise strictly from 0 to batch*tokens = {total}")
    return cu


def _check(q, k, v, cu_seqlens, sliding_window, softcap, scale):
    _check_shapes(q, k, v, sliding_window, softcap, scale)
    if cu_seqlens is None or torch.compiler.is_compiling():
        return
    B, T = q.shape[0], q.shape[2]
    _check_offsets_type(cu_seqlens)
    if cu_seqlens.device != q.device:
        raise ValueError(f"attention: cu_seqlens is on {cu_seqlens.device}, q on {q.device}")
    key = (cu_seqlens, cu_seqlens._version, B, T)
    if _cache_hit(_checked_cache, key):  # every layer of a forward passes the same tensor: check it once
        return
    cu = _check_offsets_rise(cu_seqlens, B * T)
    row_ends = torch.arange(1, B, device=cu.device) * T
    if B > 1 and not bool(torch.isin(row_ends, cu).all()):
        raise ValueError(f"attention: cu_seqlens has a document crossing a row end (rows of {T} tokens)")
    _checked_cache[:] = [(*key, int((cu[1:] - cu[:-1]).max().item()))]


def _token_major(x):  # [B, H, T, D] -> [1, H, B*T, D]
    B, H, T, D = x.shape
    return x.permute(1, 0, 2, 3).reshape(1, H, B * T, D)


def _batch_major(x, B, T):  # [1, H, B*T, D] -> [B, H, T, D]
    H, D = x.shape[1], x.shape[3]
    return x.reshape(H, B, T, D).permute(1, 0, 2, 3)


def _allowed(length, causal, sliding_window, device):
    """[L, L] bool: which keys each query of one document sees, or None when it sees all."""
    if not causal and (sliding_window is None or sliding_window >= length):
        return None
    i = torch.arange(length, device=device)
    distance = i[:, None] - i[None, :]
    allowed = distance >= 0 if causal else torch.ones(length, length, dtype=torch.bool, device=device)
    if sliding_window is not None:
        allowed = allowed & (distance.abs() < sliding_window)
    return allowed


def _softcapped(q, k, v, allowed, softcap, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32))
    scores = softcap * torch.tanh(scores * scale / softcap)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1).to(v.dtype) @ v


def _document_bounds(cu_seqlens, B, T):
    return cu_seqlens.tolist() if cu_seqlens is not None else list(range(0, B * T + 1, T))


def _per_document(q, k, v, cu_seqlens, causal, sliding_window, softcap, scale):
    """One attention per document: memory follows the longest document, never T x T."""
    B, Hq, T, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    gqa = Hq != k.shape[1]
    qt, kt, vt = _token_major(q), _token_major(k), _token_major(v)
    bounds = _document_bounds(cu_seqlens, B, T)
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):  # at most B*T documents
        qd, kd, vd = qt[:, :, start:end], kt[:, :, start:end], vt[:, :, start:end]
        length = end - start
        plain_causal = causal and (sliding_window is None or sliding_window >= length)
        if softcap is not None:
            outs.append(_softcapped(qd, kd, vd, _allowed(length, causal, sliding_window, q.device), softcap, scale))
        else:
            allowed = None if plain_causal else _allowed(length, causal, sliding_window, q.device)
            outs.append(F.scaled_dot_product_attention(qd, kd, vd, attn_mask=allowed, is_causal=plain_causal,
                                                       scale=scale, enable_gqa=gqa))
    return _batch_major(torch.cat(outs, dim=2), B, T)


def _per_document_grads(grad_out, q, k, v, cu_seqlens, causal, sliding_window, softcap, scale):
    """The gradients of _per_document, spelled out (softmax, softcap and GQA's head groups), one
    document at a time: dV = P^T dO, dS = P * (dO V^T - rowsum(dO . O)), dQ = dS K, dK = dS^T Q."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    groups = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    qt, kt, vt, gt = (_token_major(x).to(acc) for x in (q, k, v, grad_out))
    dq, dk, dv = torch.zeros_like(qt), torch.zeros_like(kt), torch.zeros_like(vt)
    bounds = _document_bounds(cu_seqlens, B, T)
    for start, end in zip(bounds[:-1], bounds[1:]):  # at most B*T documents
        qd, gd = qt[:, :, start:end], gt[:, :, start:end]
        kd = kt[:, :, start:end].repeat_interleave(groups, dim=1)
        vd = vt[:, :, start:end].repeat_interleave(groups, dim=1)
        scores = qd @ kd.transpose(-1, -2) * scale
        if softcap is not None:
            capped = torch.tanh(scores / softcap)
            scores = softcap * capped
        allowed = _allowed(end - start, causal, sliding_window, q.device)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        p = scores.softmax(-1)
        dp = gd @ vd.transpose(-1, -2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        if softcap is not None:
            ds = ds * (1 - capped * capped)
        ds = ds * scale
        dq[:, :, start:end] = ds @ kd
        dk[:, :, start:end] = (ds.transpose(-1, -2) @ qd).unflatten(1, (Hkv, groups)).sum(2)
        dv[:, :, start:end] = (p.transpose(-1, -2) @ gd).unflatten(1, (Hkv, groups)).sum(2)
    return tuple(_batch_major(g, B, T).to(x.dtype) for g, x in ((dq, q), (dk, k), (dv, v)))


# The documents backend as torch ops: one node in a compiled graph (reading the boundaries on the
# host inside it is no graph break), with its backward an op of its own.
@torch.library.custom_op("qforge::document_attention", mutates_args=())
def _document_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                           causal: bool, sliding_window: Optional[int], softcap: Optional[float],
                           scale: Optional[float]) -> torch.Tensor:
    _check(q, k, v, cu_seqlens, sliding_window, softcap, scale)
    return _per_document(q, k, v, cu_seqlens, causal, sliding_window, softcap, scale).contiguous()


@_document_attention_op.register_fake
def _(q, k, v, cu_seqlens, causal, sliding_window, softcap, scale):
    _check_shapes(q, k, v, sliding_window, softcap, scale)
    return q.new_empty(q.shape)  # contiguous, as the op's result


@torch.library.custom_op("qforge::document_attention_backward", mutates_args=())
def _document_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    cu_seqlens: torch.Tensor, causal: bool, sliding_window: Optional[int],
                                    softcap: Optional[float], scale: Optional[float]
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(q, k, v, cu_seqlens, sliding_window, softcap, scale)
    if grad_out.shape != q.shape:
        raise ValueError(f"attention backward: grad_out {tuple(grad_out.shape)} is not q's shape {tuple(q.shape)}")
    grads = _per_document_grads(grad_out, q, k, v, cu_seqlens, causal, sliding_window, softcap, scale)
    return tuple(g.contiguous() for g in grads)


@_document_attention_backward_op.register_fake
def _(grad_out, q, k, v, cu_seqlens, causal, sliding_window, softcap, scale):
    _check_shapes(q, k, v, sliding_window, softcap, scale)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the op's


def _document_attention_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, *ctx.options = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens)


def _document_attention_backward(ctx, grad_out):
    q, k, v, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _document_attention_backward_op(grad_out, q, k, v, cu_seqlens, *ctx.options)
    return dq, dk, dv, None, None, None, None, None


_document_attention_op.register_autograd(_document_attention_backward, setup_context=_document_attention_setup)


def _documents(q, k, v, cu_seqlens, causal, sliding_window, softcap, scale):
    if cu_seqlens is None:
        B, T = q.shape[0], q.shape[2]
        cu_seqlens = torch.arange(0, B * T + 1, T, device=q.device, dtype=torch.int32)
    return _document_attention_op(q, k, v, cu_seqlens, causal, sliding_window,
                                  None if softcap is None else float(softcap), None if scale is None else float(scale))


FLEX_BLOCK = 128  # FlexAttention's block size (torch's default), for queries and keys alike


def _document_mask_mod(cu_seqlens, tokens, causal, sliding_window):
    """FlexAttention's mask_mod: same document, causal, |q - k| < window. Only the blocks the block
    mask marks partial evaluate it."""
    document = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(tokens, device=cu_seqlens.device), right=True)

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = document[q_idx] == document[kv_idx]
        if causal:
            allowed = allowed & (q_idx >= kv_idx)
        if sliding_window is not None:
            allowed = allowed & ((q_idx - kv_idx).abs() < sliding_window)
        return allowed

    return mask_mod


def _block_pairs(cu_seqlens, tokens, causal, sliding_window):
    """[n, n] bool (n = ceil(tokens / FLEX_BLOCK)): for each (query block, key block), whether some
    query-key pair in it may attend and whether every pair may, from the document bounds alone, in
    O(n^2) memory. As create_block_mask, which pads the T x T mask with False, a block cut short by
    the end of the tokens is never full."""
    bounds = cu_seqlens.long()
    n = (tokens + FLEX_BLOCK - 1) // FLEX_BLOCK
    first = torch.arange(n, device=bounds.device) * FLEX_BLOCK
    last = (first + FLEX_BLOCK).clamp(max=tokens) - 1
    first_doc = torch.searchsorted(bounds[1:], first, right=True)
    last_doc = torch.searchsorted(bounds[1:], last, right=True)
    # Off the diagonal the two blocks are disjoint ranges, so a document in both holds the end of
    # the earlier block and the start of the later one: the one candidate is the document of the
    # earlier block's last token. On the diagonal that document (the block's last) is in both too.
    doc = torch.minimum(last_doc[:, None], last_doc[None, :])
    shared = doc >= torch.maximum(first_doc[:, None], first_doc[None, :])
    doc_first, doc_last = bounds[doc], bounds[doc + 1] - 1
    q_first, q_last = torch.maximum(first[:, None], doc_first), torch.minimum(last[:, None], doc_last)
    k_first, k_last = torch.maximum(first[None, :], doc_first), torch.minimum(last[None, :], doc_last)
    # within the shared document, q - k takes every value from q_first - k_last to q_last - k_first
    lowest, highest = q_first - k_last, q_last - k_first
    whole = (torch.arange(n, device=bounds.device) < tokens // FLEX_BLOCK) & (first_doc == last_doc)
    some, every = shared, shared & whole[:, None] & whole[None, :]
    nearest = 0 if causal else None if sliding_window is None else 1 - sliding_window  # the smallest q - k allowed
    farthest = None if sliding_window is None else sliding_window - 1  # the largest
    if nearest is not None:
        some, every = some & (highest >= nearest), every & (lowest >= nearest)
    if farthest is not None:
        some, every = some & (lowest <= farthest), every & (highest <= farthest)
    return some, every


def _ordered(blocks):
    """A block mask's [1, 1, n] counts and [1, 1, n, n] indices (the blocks of a row first, in
    order) from an [n, n] bool, as create_block_mask orders them."""
    blocks = blocks.to(torch.int32, memory_format=torch.contiguous_format)  # a transposed one too
    return (blocks.sum(-1, dtype=torch.int32)[None, None],
            torch.argsort(blocks, dim=-1, descending=True, stable=True).to(torch.int32)[None, None])


_BLOCK_MASK_TENSORS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                       "q_indices", "full_q_num_blocks", "full_q_indices")


def _as_block_mask(tensors, cu_seqlens, tokens, causal, sliding_window):
    """A BlockMask of the eight _BLOCK_MASK_TENSORS. Built here, not by BlockMask.from_kv_blocks:
    its query-side transpose runs under vmap, which fails inside the op compiled graphs call
    (torch 2.15: "Cannot access storage of BatchedTensorImpl"); the transposed [n, n] blocks give
    the same tensors directly."""
    from torch.nn.attention.flex_attention import BlockMask

    return BlockMask(seq_lengths=(tokens, tokens), **dict(zip(_BLOCK_MASK_TENSORS, tensors)),
                     BLOCK_SIZE=(FLEX_BLOCK, FLEX_BLOCK),
                     mask_mod=_document_mask_mod(cu_seqlens, tokens, causal, sliding_window))


def _build_block_mask(cu_seqlens, tokens, causal, sliding_window):
    """The flex BlockMask of packed documents (+ causal, + window) over ``tokens`` tokens, never a
    T x T tensor (create_block_mask evaluates mask_mod on all T x T pairs)."""
    some, every = _block_pairs(cu_seqlens, tokens, causal, sliding_window)
    partial = some & ~every
    tensors = (*_ordered(partial), *_ordered(every), *_ordered(partial.T), *_ordered(every.T))
    return _as_block_mask(tensors, cu_seqlens, tokens, causal, sliding_window)


def _cached_block_mask(cu_seqlens, tokens, causal, sliding_window):
    """The block mask of this batch: built at the first layer, then reused by every layer (for each
    causal/window kind a model mixes, as Gemma's local and global layers)."""
    key = (cu_seqlens, cu_seqlens._version, tokens)
    if not _cache_hit(_block_mask_cache, key):
        _block_mask_cache[:] = [(*key, {})]
    masks = _block_mask_cache[0][-1]
    if (causal, sliding_window) not in masks:
        _check_window(sliding_window)  # once a batch: in a compiled graph nothing checked them before
        _check_offsets_type(cu_seqlens)
        _check_offsets_rise(cu_seqlens, tokens)
        masks[causal, sliding_window] = _build_block_mask(cu_seqlens, tokens, causal, sliding_window)
        stats["block_masks_built"] += 1
    return masks[causal, sliding_window]


# Inside a compiled graph the block mask comes from this op: it runs at run time, so the cache
# serves every layer's graph (a per-layer compile passes each layer the batch's cu_seqlens tensor)
# where a traced build would run again in each graph.
@torch.library.custom_op("qforge::flex_block_mask", mutates_args=())
def _flex_block_mask_op(cu_seqlens: torch.Tensor, tokens: int, causal: bool, sliding_window: Optional[int]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor, torch.Tensor, torch.Tensor]:
    mask = _cached_block_mask(cu_seqlens, tokens, causal, sliding_window)
    # copies, O((T / 128)^2): what an op returns belongs to the graph that called it
    return tuple(getattr(mask, name).clone() for name in _BLOCK_MASK_TENSORS)


@_flex_block_mask_op.register_fake
def _(cu_seqlens, tokens, causal, sliding_window):
    _check_window(sliding_window)
    _check_offsets_type(cu_seqlens)
    n = (tokens + FLEX_BLOCK - 1) // FLEX_BLOCK
    counts, indices = (1, 1, n), (1, 1, n, n)
    return tuple(cu_seqlens.new_empty(counts if name.endswith("num_blocks") else indices, dtype=torch.int32)
                 for name in _BLOCK_MASK_TENSORS)


def _block_mask(cu_seqlens, tokens, causal, sliding_window):
    if not torch.compiler.is_compiling():
        return _cached_block_mask(cu_seqlens, tokens, causal, sliding_window)
    tensors = _flex_block_mask_op(cu_seqlens, tokens, causal, sliding_window)
    return _as_block_mask(tensors, cu_seqlens, tokens, causal, sliding_window)


_compiled_flex = []


def _softcap_score_mod(cap: torch.Tensor):
    """FlexAttention score_mod for softcap; cap is a tensor because a float would retrace per value."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)
    return score_mod


def _flex(q, k, v, cu_seqlens, causal, sliding_window, softcap, scale):
    from torch.nn.attention.flex_attention import flex_attention

    B, Hq, T, D = q.shape
    if not q.is_cuda and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise ValueError("attention: torch runs FlexAttention's backward on CUDA only; on CPU train with the "
                         "documents backend (flex runs forward-only here)")
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, B * T + 1, T, device=q.device, dtype=torch.int32)
    block_mask = _block_mask(cu_seqlens, B * T, causal, sliding_window)
    score_mod = None if softcap is None else _softcap_score_mod(
        torch.tensor(softcap, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device))
    run = flex_attention
    if q.is_cuda and not torch.compiler.is_compiling():
        if not _compiled_flex:  # eager flex is a dense reference; the kernel comes from compiling it
            _compiled_flex.append(torch.compile(flex_attention, dynamic=True))
        run = _compiled_flex[0]
    out = run(_token_major(q), _token_major(k), _token_major(v), score_mod=score_mod, block_mask=block_mask,
              scale=scale, enable_gqa=Hq != k.shape[1])
    return _batch_major(out, B, T)


def _varlen_windows(causal, sliding_window):
    left = -1 if sliding_window is None else sliding_window - 1
    right = 0 if causal else left
    return left, right


def _longest_document(cu_seqlens) -> int:
    """From the check's cache when it holds this tensor, else read on the host."""
    if _checked_cache and _checked_cache[0][0] is cu_seqlens and _checked_cache[0][1] == cu_seqlens._version:
        return _checked_cache[0][-1]
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())


def _run_varlen(kernel, q, k, v, cu_seqlens, max_seqlen, **options):
    """Runs a flash-style varlen kernel: tokens [B*T, H, D], int32 cu_seqlens, longest document."""
    B, Hq, T, D = q.shape
    cu = cu_seqlens.to(torch.int32)
    longest = _longest_document(cu_seqlens) if max_seqlen is None else max_seqlen
    flat = [x.permute(0, 2, 1, 3).reshape(B * T, x.shape[1], D) for x in (q, k, v)]
    out = kernel(*flat, cu, cu, longest, longest, **options)
    return out.reshape(B, T, Hq, D).permute(0, 2, 1, 3)


def _varlen(q, k, v, cu_seqlens, causal, sliding_window, softcap, scale, max_seqlen=None):
    if softcap is not None:
        raise ValueError("attention: the varlen backend has no softcap; use flash_attn, flex or documents")
    gqa = {}
    if q.shape[1] != k.shape[1]:
        if _VARLEN_TAKES_GQA:
            gqa = {"enable_gqa": True}
        else:
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    return _run_varlen(_varlen_attn(), q, k, v, cu_seqlens, max_seqlen, scale=scale,
                       window_size=_varlen_windows(causal, sliding_window), **gqa)


def _flash_attn(q, k, v, cu_seqlens, causal, sliding_window, softcap, scale, max_seqlen=None):
    left = -1 if sliding_window is None else sliding_window - 1
    return _run_varlen(_flash_attn_varlen(), q, k, v, cu_seqlens, max_seqlen, softmax_scale=scale, causal=causal,
                       window_size=(left, left), softcap=0.0 if softcap is None else softcap)


def _sdpa(q, k, v, cu_seqlens, causal, sliding_window, softcap, scale):
    B, T = q.shape[0], q.shape[2]
    if cu_seqlens is not None and cu_seqlens.numel() != B + 1:
        raise ValueError("attention: the sdpa backend takes dense batches (one document a row); packed rows "
                         "need varlen, flash_attn, flex or documents")
    if softcap is not None:
        raise ValueError("attention: the sdpa backend has no softcap; use flash_attn, flex or documents")
    allowed = None if sliding_window is None else _allowed(T, causal, sliding_window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=causal and allowed is None,
                                          scale=scale, enable_gqa=q.shape[1] != k.shape[1])


_RUN = {"varlen": _varlen, "flash_attn": _flash_attn, "flex": _flex, "sdpa": _sdpa, "documents": _documents}


def _pick(q, cu_seqlens, sliding_window, softcap):
    # in a graph the number of documents is dynamic: a one-document row stays on the packed path
    # rather than specializing the graph to it
    dense = cu_seqlens is None or (not torch.compiler.is_compiling() and cu_seqlens.numel() == q.shape[0] + 1)
    if dense and softcap is None and sliding_window is None:
        return "sdpa"
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if _flash_attn_varlen() is not None:
            return "flash_attn"
        if _varlen_attn() is not None and softcap is None:
            return "varlen"
    if q.is_cuda:
        return "flex"
    return "documents"


def attention(q, k, v, *, cu_seqlens=None, causal=True, sliding_window=None, softcap=None, scale=None,
              backend="auto", max_seqlen=None):
    """Attention over dense or packed rows; see the module docstring for layouts and backends.

    q [B, Hq, T, D], k/v [B, Hkv, T, D] -> [B, Hq, T, D]. sliding_window W: a query sees keys less
    than W tokens away (itself and W-1 before it when causal). softcap c: scores become
    c * tanh(scores / c) after scaling (Gemma 2). scale defaults to 1/sqrt(D). max_seqlen: the
    longest document, where the caller knows it; the varlen kernels need it, and inside a compiled
    graph reading it from cu_seqlens would be a graph break."""
    if backend not in BACKENDS:
        raise ValueError(f"attention: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    _check(q, k, v, cu_seqlens, sliding_window, softcap, scale)
    name = _pick(q, cu_seqlens, sliding_window, softcap) if backend == "auto" else backend
    if name not in available_backends(q.device):
        raise ValueError(f"attention: backend {name!r} is not available on {q.device} here "
                         f"(available: {', '.join(available_backends(q.device))})")
    if name in ("varlen", "flash_attn") and cu_seqlens is None:
        B, T = q.shape[0], q.shape[2]
        cu_seqlens = torch.arange(0, B * T + 1, T, device=q.device, dtype=torch.int32)
    if name in ("varlen", "flash_attn"):
        if max_seqlen is not None and not torch.compiler.is_compiling() and max_seqlen < _longest_document(cu_seqlens):
            raise ValueError(f"attention: max_seqlen {max_seqlen} is shorter than the longest document "
                             f"({_longest_document(cu_seqlens)})")
        return _RUN[name](q, k, v, cu_seqlens, causal, sliding_window, softcap, scale, max_seqlen=max_seqlen)
    return _RUN[name](q, k, v, cu_seqlens, causal, sliding_window, softcap, scale)


def _hf_cu_seqlens(position_ids, padding_mask, batch, tokens, device):
    """cu_seqlens for a transformers forward, derived once and shared by all its layers."""
    if position_ids is None:
        position_ids = torch.arange(tokens, device=device).expand(batch, tokens)
    elif position_ids.shape[0] == 1 and batch > 1:
        position_ids = position_ids.expand(batch, -1)
    key = (position_ids, position_ids._version, padding_mask, None if padding_mask is None else padding_mask._version)
    if _cache_hit(_cu_seqlens_cache, key):
        return _cu_seqlens_cache[0][-1]
    cu = cu_seqlens_from_position_ids(position_ids.to(device), padding_mask).to(device)
    _cu_seqlens_cache[:] = [(*key, cu)]
    return cu


ATTENTION_CHOICES = ("auto", "flash", "flex", "sdpa", "documents")


def training_backend(choice: str, device) -> Optional[str]:
    """The attention() backend ``qforge train --attention choice`` trains with on ``device``, or
    None for sdpa (transformers' own SDPA, which builds a T x T mask for packed rows); a choice
    that cannot train there is a ValueError saying why. auto, flex, documents: those backends;
    flash: the flash-attn package's variable-length kernel, else torch's."""
    device = torch.device(device)
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"attention {choice!r}: expected one of {', '.join(ATTENTION_CHOICES)}")
    if choice == "sdpa":
        return None
    if choice == "flash":
        kernels = [name for name in ("flash_attn", "varlen") if name in available_backends(device)]
        if not kernels:
            raise ValueError(f"--attention flash: no variable-length flash kernel on {device} (needs CUDA and the "
                             "flash-attn package or a torch with torch.nn.attention.varlen); use auto, flex or sdpa")
        return kernels[0]
    if choice == "flex" and device.type != "cuda":
        raise ValueError(f"--attention flex: torch runs FlexAttention's backward on CUDA only, not on {device}; "
                         "use auto or documents")
    return choice


def use_for_training(model, choice: str, device) -> bool:
    """Sets ``model``'s attention for training by ``qforge train --attention`` (training_backend):
    qforge.attention under transformers' name "qforge", or transformers' SDPA. Returns whether
    qforge.attention runs it (and so takes the packer's cu_seqlens)."""
    backend = training_backend(choice, device)
    model.set_attn_implementation("sdpa" if backend is None else register_with_transformers(backend))
    return backend is not None


def packed_inputs(cu_seqlens: torch.Tensor, device) -> dict:
    """The model keywords that hand a packed batch's document boundaries to every attention layer
    (transformers' names): cu_seqlens on ``device`` and the longest document, read on the host."""
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    cu = cu_seqlens.to(device)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def hf_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                         sliding_window=None, softcap=None, position_ids=None, **kwargs):
    """transformers' attention-function signature over attention(); returns ([B, T, H, D], None)."""
    if dropout and module.training:
        raise ValueError(f"qforge attention: attention dropout is not supported (got {dropout}); set the "
                         "model config's attention_dropout to 0")
    batch, _, tokens, _ = query.shape
    if key.shape[2] != tokens:
        raise ValueError(f"qforge attention: {tokens} queries against {key.shape[2]} keys (a KV cache): it "
                         "trains on whole sequences; generate with attn_implementation='sdpa'")
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.dtype != torch.bool):
        raise ValueError(f"qforge attention: expected no mask or a 2D padding mask, got "
                         f"{attention_mask.dtype} {tuple(attention_mask.shape)} (register_with_transformers() "
                         "registers the mask function too)")
    if kwargs.get("cu_seq_lens_q") is not None:  # given by the caller (transformers' name): nothing to derive
        cu = kwargs["cu_seq_lens_q"]
    elif position_ids is None and attention_mask is None:
        cu = None
    else:
        cu = _hf_cu_seqlens(position_ids, attention_mask, batch, tokens, query.device)
    out = attention(query, key, value, cu_seqlens=cu, causal=getattr(module, "is_causal", True),
                    sliding_window=sliding_window, softcap=softcap, scale=scaling,
                    max_seqlen=kwargs.get("max_length_q"), backend=_hf_settings["backend"])
    return out.transpose(1, 2).contiguous(), None


def register_with_transformers(backend: str = "auto") -> str:
    """Registers attention() as transformers' attn_implementation "qforge" (and its mask function,
    which hands over at most the 2D padding mask); returns the name to load models with."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register("qforge", hf_attention_forward)
    AttentionMaskInterface.register("qforge", flash_attention_mask)
    _hf_settings["backend"] = backend
    return "qforge"
