"""Hugging Face drop-in: route a causal LM's training loss through qforge's
fused linear + cross-entropy, so full logits are never computed.

    model = AutoModelForCausalLM.from_pretrained(...)
    qforge.hf.patch_causal_lm(model)             # fused C++/CUDA path
    qforge.hf.patch_causal_lm(model, "generic")  # chunked_linear + F.cross_entropy

Works for Llama-family ``*ForCausalLM`` models (also inside a PEFT wrapper) (a ``.model`` returning
``last_hidden_state`` and an ``.lm_head`` Linear), Gemma-2-style
``final_logit_softcapping`` included. With ``labels`` (or ``shift_labels``)
in training mode the loss equals transformers' ``ForCausalLMLoss``
(labels shifted, ignore_index -100, ``num_items_in_batch`` honoured) and the
returned ``logits`` is None; without labels, or in eval mode, the original
forward runs unchanged.
"""
from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn.functional as F

from .loss import chunked_linear, linear_cross_entropy, valid_rows

__all__ = ["patch_causal_lm", "unpatch_causal_lm", "causal_lm_loss"]


def causal_lm_loss(hidden: torch.Tensor, lm_head: torch.nn.Linear, labels: Optional[torch.Tensor],
                   shift_labels: Optional[torch.Tensor] = None, num_items_in_batch=None,
                   ignore_index: int = -100, softcap: Optional[float] = None, mode: str = "fused",
                   chunk_size: Optional[int] = None) -> torch.Tensor:
    """transformers' ForCausalLMLoss on hidden states, without full logits."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    y = shift_labels.reshape(-1).to(hidden.device)
    h = hidden.reshape(-1, hidden.shape[-1])
    reduction = "sum" if num_items_in_batch is not None else "mean"
    if mode == "fused":
        loss = linear_cross_entropy(h, lm_head.weight, y, lm_head.bias, ignore_index=ignore_index,
                                    reduction=reduction, softcap=softcap, chunk_size=chunk_size)
    elif mode == "generic":
        kept = valid_rows(y, ignore_index)  # masked rows cost nothing in the GEMMs
        if kept is not None:
            h, y = h.index_select(0, kept), y.index_select(0, kept)

        def ce(hc, w, yc):
            z = F.linear(hc, w, lm_head.bias).float()
            if softcap is not None:
                z = softcap * torch.tanh(z / softcap)
            return F.cross_entropy(z, yc, ignore_index=ignore_index, reduction=reduction)

        loss = chunked_linear(h, lm_head.weight, y, ce, chunk_size, reduction=reduction,
                              ignore_index=ignore_index)
    else:
        raise ValueError(f"causal_lm_loss: mode must be 'fused' or 'generic', got {mode!r}")
    if reduction == "sum":
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


# The KV cache's keyword: transformers 5.24 calls it ``cache`` in forwards and
# outputs (and warns that ``past_key_values`` is deprecated), 5.17
# ``past_key_values``. The patched forward takes either from its caller and
# hands the model the one its forward declares.
_OLD_CACHE_KEYWORD = "past_key_values"


def _cache_keyword(fn_or_output_class) -> str:
    """``"cache"`` when a forward (or a ModelOutput class) takes the new name, else ``"past_key_values"``."""
    import dataclasses
    import inspect

    if dataclasses.is_dataclass(fn_or_output_class):
        names = {f.name for f in dataclasses.fields(fn_or_output_class)}
    else:
        names = set(inspect.signature(fn_or_output_class).parameters)
    return "cache" if "cache" in names else "past_key_values"


def patch_causal_lm(model: torch.nn.Module, mode: str = "fused", chunk_size: Optional[int] = None):
    """Replace ``model.forward`` (in place; returns the model). See the module doc."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if mode not in ("fused", "generic"):
        raise ValueError(f"patch_causal_lm: mode must be 'fused' or 'generic', got {mode!r}")
    if hasattr(model, "get_base_model"):  # a PEFT wrapper: patch the wrapped causal LM
        patch_causal_lm(model.get_base_model(), mode, chunk_size)
        return model
    if not hasattr(model, "lm_head") or not hasattr(model, "model"):
        raise ValueError(f"patch_causal_lm: {type(model).__name__} has no .model/.lm_head "
                         "(expected a Llama-family *ForCausalLM)")
    if getattr(model, "_qforge_original_forward", None) is None:
        model._qforge_original_forward = model.forward
    original = model._qforge_original_forward
    softcap = getattr(model.config, "final_logit_softcapping", None)

    cache_kw = _cache_keyword(original)
    out_cache = _cache_keyword(CausalLMOutputWithPast)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        # Callers written for either transformers name the KV cache theirs;
        # the model is handed it under the name its forward takes.
        if _OLD_CACHE_KEYWORD in kwargs:
            if cache is not None:
                raise ValueError("patch_causal_lm: both cache and past_key_values given; pass one")
            cache = kwargs.pop(_OLD_CACHE_KEYWORD)
        kwargs[cache_kw] = cache
        shift_labels = kwargs.get("shift_labels")
        if (labels is None and shift_labels is None) or not self.training:
            return original(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids, inputs_embeds=inputs_embeds, labels=labels,
                            use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("shift_labels", None)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, inputs_embeds=inputs_embeds,
                             use_cache=use_cache, **kwargs)
        return CausalLMOutputWithPast(loss=causal_lm_loss(outputs.last_hidden_state, self.lm_head, labels,
                                                          shift_labels, num_items, softcap=softcap,
                                                          mode=mode, chunk_size=chunk_size),
                                      logits=None, hidden_states=outputs.hidden_states,
                                      attentions=outputs.attentions,
                                      **{out_cache: outputs.get(out_cache)})

    model.forward = types.MethodType(forward, model)
    model._qforge_loss_mode = mode
    return model


def unpatch_causal_lm(model: torch.nn.Module):
    """Undo :func:`patch_causal_lm`."""
    if hasattr(model, "get_base_model"):
        unpatch_causal_lm(model.get_base_model())
        return model
    orig = getattr(model, "_qforge_original_forward", None)
    if orig is not None:
        model.forward = orig
        model._qforge_original_forward = None
    return model
