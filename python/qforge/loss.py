"""Memory-efficient linear + loss (challenge E).

* ``linear_cross_entropy`` / ``LinearCrossEntropyLoss``: the fused, chunked
  linear + cross-entropy of the C++/CUDA core (``qf_lce_forward``). The N x V
  logits are never materialised; with reduction "mean"/"sum" all gradients are
  computed in the forward pass (three GEMMs per chunk) and backward is a
  rescale by the upstream gradient; with reduction "none" backward recomputes
  per chunk with the per-token upstream gradients.
* ``chunked_linear``: the generic form. Any Python ``loss_fn(hidden_chunk,
  weight, labels_chunk, *extras_chunk)`` on a chunk of tokens, differentiated
  by autograd per chunk (no hard-coded derivatives), chunks weighted by their
  valid-token counts so that the result equals the unchunked computation.

Both are torch custom ops / autograd Functions; NaN or Inf in the hidden
states or the weight propagate to the loss and the gradients (documented, not
checked: a check would cost a pass over the inputs).
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .ops.loss import REDUCTION_NONE, auto_chunk_size, lce_op, reduction_code

__all__ = ["linear_cross_entropy", "LinearCrossEntropyLoss", "chunked_linear", "ChunkedLinearLoss",
           "auto_chunk_size"]

# ------------------------------------------------------------------ public API
def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                         ignore_index: int = -100, label_smoothing: float = 0.0,
                         weight_per_class: Optional[Tensor] = None, reduction: str = "mean",
                         softcap: Optional[float] = None, logit_scale: float = 1.0,
                         z_loss: float = 0.0, return_lse: bool = False,
                         chunk_size: Optional[int] = None, fp32_grad_weight: bool = False,
                         validate: bool = True, compact: bool = True):
    """cross_entropy(logit_scale * (hidden @ weight.T + bias) [soft-capped], labels)
    without materialising the logits.

    hidden [..., D], weight [V, D], labels [...] (int, ignore_index allowed),
    bias [V], weight_per_class [V] (PyTorch's ``weight=``). Matches
    ``torch.nn.functional.cross_entropy`` (with ``z_loss * lse**2`` added per
    valid token, divided like the loss under "mean"). Returns the loss (a
    scalar, or shaped like labels for "none"), and with ``return_lse`` also
    the per-token log-sum-exp (fp32, not differentiable).
    ``chunk_size`` tokens per chunk (None: automatic from free memory);
    ``fp32_grad_weight`` accumulates grad_weight in fp32 across chunks;
    ``validate`` checks labels up front on CUDA (one stream sync).
    ``compact``: rows labelled ``ignore_index`` are dropped before the GEMMs, so masked
    (prompt) tokens cost nothing there; the loss and gradients are those of the full
    computation (ignored rows get zero loss and zero gradient) for every reduction. It costs
    one host sync (counting the valid rows) and is skipped under torch.compile, with
    ``return_lse`` (ignored rows have an lse too) and when no row is ignored.
    NaN/Inf in hidden or weight propagate to the loss and gradients.
    """
    # Sizes, dtypes and options are checked by the core (qf_lce_run); here only what
    # flattening the leading dimensions and converting the labels needs, and devices.
    red = reduction_code(reduction)
    if not isinstance(hidden, Tensor) or not isinstance(weight, Tensor) or not isinstance(labels, Tensor):
        raise TypeError("linear_cross_entropy: hidden, weight and labels must be tensors")
    if hidden.dim() < 1:
        raise ValueError("linear_cross_entropy: hidden must be [..., D], got a 0-dimensional tensor")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"linear_cross_entropy: labels {tuple(labels.shape)} must have hidden's "
                         f"leading shape {tuple(hidden.shape[:-1])}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"linear_cross_entropy: labels must be an integer tensor, got {labels.dtype}")
    dev_type = hidden.device.type
    if torch.is_autocast_enabled(dev_type):
        ac = torch.get_autocast_dtype(dev_type)
        hidden, weight = hidden.to(ac), weight.to(ac)
        bias = bias.to(ac) if bias is not None else None
    bias = bias.to(hidden.dtype) if bias is not None else None
    cw = weight_per_class.detach().to(torch.float32).contiguous() if weight_per_class is not None else None
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias), ("weight_per_class", cw)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"linear_cross_entropy: {name} is on {t.device} but hidden is on {hidden.device}")
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    y = labels.reshape(-1).to(torch.int64).contiguous()
    w = weight.contiguous()
    b = bias.contiguous() if bias is not None else None
    kept = valid_rows(y, ignore_index) if compact and not return_lse else None
    if kept is not None:
        h2, y = h2.index_select(0, kept), y.index_select(0, kept)
    grad_on = torch.is_grad_enabled()
    loss, lse, *_ = lce_op(
        h2, w, y, b, cw, int(ignore_index), float(label_smoothing), float(softcap or 0.0),
        float(logit_scale), float(z_loss), red, int(chunk_size or 0), bool(validate), bool(return_lse),
        grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad, bool(fp32_grad_weight))
    if red == REDUCTION_NONE:
        if kept is not None:  # ignored rows: zero loss (and, through index_copy, zero gradient)
            loss = loss.new_zeros(labels.numel()).index_copy(0, kept, loss)
        loss = loss.reshape(lead)
    if return_lse:
        return loss, lse.reshape(lead)
    return loss


def valid_rows(labels: Tensor, ignore_index: int) -> Optional[Tensor]:
    """Indices of the rows whose label is not ignore_index, or None where compaction would not
    pay or cannot run: under torch.compile (data-dependent shape), when no row is ignored,
    and when every row is (the uncompacted op defines that case)."""
    if torch.compiler.is_compiling() or labels.numel() == 0:
        return None
    valid = labels != ignore_index
    n_valid = int(valid.sum())  # the one host sync
    if n_valid == 0 or n_valid == labels.numel():
        return None
    return valid.nonzero().squeeze(1)


class LinearCrossEntropyLoss(torch.nn.Module):
    """Module form: ``LinearCrossEntropyLoss(**options)(hidden, weight, labels, bias=None)``."""

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0,
                 weight_per_class: Optional[Tensor] = None, reduction: str = "mean",
                 softcap: Optional[float] = None, logit_scale: float = 1.0, z_loss: float = 0.0,
                 return_lse: bool = False, chunk_size: Optional[int] = None,
                 fp32_grad_weight: bool = False, compact: bool = True):
        super().__init__()
        reduction_code(reduction)  # a bad name fails here, not at the first call
        self.register_buffer("weight_per_class", weight_per_class, persistent=False)
        self.kw = dict(ignore_index=ignore_index, label_smoothing=label_smoothing,
                       reduction=reduction, softcap=softcap, logit_scale=logit_scale,
                       z_loss=z_loss, return_lse=return_lse, chunk_size=chunk_size,
                       fp32_grad_weight=fp32_grad_weight, compact=compact)

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None):
        return linear_cross_entropy(hidden, weight, labels, bias,
                                    weight_per_class=self.weight_per_class, **self.kw)


# ------------------------------------------------------------------ generic form
def _split(t, sizes):
    return t.split(sizes, dim=0) if isinstance(t, Tensor) else [t] * len(sizes)


class _ChunkedLinearF(torch.autograd.Function):
    """Per-chunk autograd in forward (loss_fn differentiated by autograd, no
    hard-coded derivative); backward rescales by the upstream gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, loss_fn, sizes, reduction, fp32_grad_weight, valid, labels,
                *extras):
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        counts = [int(c) for c in torch.stack([v.sum() for v in valid.split(sizes, 0)]).tolist()]
        total = sum(counts)
        gh = torch.zeros_like(hidden) if need_h else None
        gw = (torch.zeros(weight.shape, dtype=torch.float32 if fp32_grad_weight else weight.dtype,
                          device=weight.device) if need_w else None)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        hs, ys = hidden.split(sizes, 0), labels.split(sizes, 0)
        ex = [_split(e, sizes) for e in extras]
        offset = 0
        for i, n in enumerate(sizes):
            if reduction == "mean" and counts[i] == 0 and total > 0:
                offset += n  # no valid token: contributes nothing (its mean would be 0/0)
                continue
            h_c = hs[i].detach().requires_grad_(need_h)
            w_c = weight.detach().requires_grad_(need_w)
            with torch.enable_grad():
                out = loss_fn(h_c, w_c, ys[i], *[e[i] for e in ex])
                if not isinstance(out, Tensor) or out.dim() != 0:
                    raise ValueError("chunked_linear: loss_fn must return a scalar tensor, got "
                                     f"{getattr(out, 'shape', type(out))}")
                out = out.float()
                if reduction == "mean":  # chunk mean -> weight by its share of valid tokens
                    out = out * (counts[i] / total if total > 0 else 1.0)
            inputs = [t for t, need in ((h_c, need_h), (w_c, need_w)) if need]
            if inputs and out.requires_grad:
                grads = torch.autograd.grad(out, inputs, allow_unused=True)
                k = 0
                if need_h:
                    if grads[0] is not None:
                        gh[offset:offset + n] = grads[0]
                    k = 1
                if need_w and grads[k] is not None:
                    gw += grads[k].to(gw.dtype)
            loss += out.detach()
            offset += n
        ctx.save_for_backward(gh, gw)
        ctx.need = (need_h, need_w)
        ctx.wdtype = weight.dtype
        ctx.n_extras = len(extras)
        return loss

    @staticmethod
    def backward(ctx, g):
        gh, gw = ctx.saved_tensors
        need_h, need_w = ctx.need
        rh = gh.mul_(g.to(gh.dtype)) if need_h else None
        rw = (gw * g).to(ctx.wdtype) if need_w else None
        return (rh, rw, None, None, None, None, None, None) + (None,) * ctx.n_extras


_GENERIC_CHUNK_BYTES = 1 << 30


def _chunk_sizes(n: int, chunk_size, d: int, v: int, device) -> list[int]:
    if n == 0:
        return [0]
    if chunk_size is None:
        # budget for one chunk's fp32 logits (the loss_fn's upcast; autograd keeps
        # about three such buffers alive per chunk) and [chunk, D] buffers, sized as the
        # fused path's CPU workspace: env QFORGE_GENERIC_CHUNK_BYTES
        budget = int(os.environ.get("QFORGE_GENERIC_CHUNK_BYTES", _GENERIC_CHUNK_BYTES))
        if device.type == "cuda":
            budget = min(budget, torch.cuda.mem_get_info(device)[0] // 8)
        c = auto_chunk_size(n, d, v, torch.float32, torch.device("cpu"), budget_bytes=budget)
        return _sizes_from_int(n, c)
    if isinstance(chunk_size, int):
        if chunk_size < 1:
            raise ValueError(f"chunked_linear: chunk_size must be >= 1, got {chunk_size}")
        return _sizes_from_int(n, chunk_size)
    sizes = [int(s) for s in chunk_size]
    if any(s < 1 for s in sizes) or sum(sizes) != n:
        raise ValueError(f"chunked_linear: chunk sizes {sizes} must be >= 1 and sum to N={n}")
    return sizes


def _sizes_from_int(n, c):
    return [min(c, n - s) for s in range(0, n, c)]


def chunked_linear(hidden: Tensor, weight: Tensor, labels: Tensor,
                   loss_fn: Callable[..., Tensor],
                   chunk_size: Union[int, Sequence[int], None] = None, *extras: Tensor,
                   reduction: str = "mean", ignore_index: int = -100,
                   valid: Optional[Tensor] = None, fp32_grad_weight: bool = False) -> Tensor:
    """Generic memory-efficient ``loss_fn(hidden @ ...)``: tokens are split into
    chunks (``chunk_size`` int, a list of sizes, or None = automatic), and
    ``loss_fn(hidden_chunk, weight, labels_chunk, *extras_chunk)`` is evaluated
    and differentiated by autograd chunk by chunk; only one chunk's logits
    exist at a time. Gradients for hidden and weight are computed in the
    forward pass, so backward applies the upstream gradient by a rescale.

    reduction "mean": loss_fn returns the mean over the chunk's valid tokens;
    chunks are weighted by valid-token counts (``valid``, default
    ``labels != ignore_index``), so the result equals the unchunked mean.
    reduction "sum": loss_fn returns the chunk's sum; chunks are added.
    ``extras`` are per-token tensors (advantages, reference log-probs, masks,
    teacher hidden states, ...) split along dim 0 with the tokens (after
    flattening hidden's leading dims); pass anything else by closing over it
    in ``loss_fn``. hidden [N, D] (or [..., D]), labels [N] (or [..., ...]).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"chunked_linear: reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"chunked_linear: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         "must be [..., D] and [V, D]")
    h = hidden.reshape(-1, hidden.shape[-1])
    n = h.shape[0]
    y = labels.reshape(n, *labels.shape[hidden.dim() - 1:]) if labels.dim() >= hidden.dim() - 1 else labels
    if y.shape[0] != n:
        raise ValueError(f"chunked_linear: labels {tuple(labels.shape)} do not match hidden's {n} tokens")
    if valid is None:
        valid = (y != ignore_index) if not y.dtype.is_floating_point else torch.ones(n, dtype=torch.bool, device=h.device)
        if valid.dim() > 1:
            valid = valid.reshape(n, -1).all(1)
    valid = valid.reshape(n)
    ex = []
    for e in extras:
        if isinstance(e, Tensor):
            e = e.reshape(n, *e.shape[hidden.dim() - 1:]) if e.dim() >= hidden.dim() - 1 else e
            if e.shape[0] != n:
                raise ValueError(f"chunked_linear: extra tensor {tuple(e.shape)} does not have N={n} rows")
        ex.append(e)
    sizes = _chunk_sizes(n, chunk_size, h.shape[1], weight.shape[0], h.device)
    return _ChunkedLinearF.apply(h, weight, loss_fn, sizes, reduction, fp32_grad_weight, valid, y, *ex)


class ChunkedLinearLoss(torch.nn.Module):
    """Module form of :func:`chunked_linear` for a fixed ``loss_fn``."""

    def __init__(self, loss_fn: Callable[..., Tensor], chunk_size=None, reduction: str = "mean",
                 ignore_index: int = -100, fp32_grad_weight: bool = False):
        super().__init__()
        self.loss_fn, self.chunk_size, self.reduction = loss_fn, chunk_size, reduction
        self.ignore_index, self.fp32_grad_weight = ignore_index, fp32_grad_weight

    def forward(self, hidden, weight, labels, *extras, valid=None):
        return chunked_linear(hidden, weight, labels, self.loss_fn, self.chunk_size, *extras,
                              reduction=self.reduction, ignore_index=self.ignore_index,
                              valid=valid, fp32_grad_weight=self.fp32_grad_weight)
