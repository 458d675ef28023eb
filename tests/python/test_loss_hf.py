"""qforge.hf drop-in: a tiny transformers Llama trains with the fused loss and matches the unfused run."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from qforge.hf import patch_causal_lm, unpatch_causal_lm  # noqa: E402


def tiny_llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=131, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).float()


def batch(seed=1, b=2, t=17, v=131):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, v, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt that is not trained on
    return ids, labels


@pytest.mark.parametrize("mode", ["fused", "generic"])
def test_training_loss_matches_unfused_step_for_step(mode):
    ref = tiny_llama()
    ours = copy.deepcopy(ref)
    patch_causal_lm(ours, mode=mode, chunk_size=7)
    opt_r = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt_o = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    ref.train(), ours.train()
    for step in range(4):
        ids, labels = batch(seed=step)
        lr_ = ref(input_ids=ids, labels=labels)
        lo = ours(input_ids=ids, labels=labels)
        assert lo.logits is None
        assert abs(lr_.loss.item() - lo.loss.item()) < 1e-5 * max(1.0, abs(lr_.loss.item())), step
        lr_.loss.backward(), lo.loss.backward()
        for (n, p), q in zip(ref.named_parameters(), ours.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), n
        opt_r.step(), opt_o.step(), opt_r.zero_grad(), opt_o.zero_grad()


def test_num_items_in_batch_and_inference_unchanged():
    ref = tiny_llama()
    ours = patch_causal_lm(copy.deepcopy(ref))
    ids, labels = batch()
    n = (labels[:, 1:] != -100).sum() + 3
    a = ref(input_ids=ids, labels=labels, num_items_in_batch=n).loss
    b = ours(input_ids=ids, labels=labels, num_items_in_batch=n).loss
    assert abs(a.item() - b.item()) < 1e-5
    with torch.no_grad():
        la = ref(input_ids=ids).logits
        lb = ours(input_ids=ids).logits  # labels=None: the original forward
        assert torch.equal(la, lb)
        ours.eval()
        assert ours(input_ids=ids, labels=labels).logits is not None  # eval: unchanged
    unpatch_causal_lm(ours)
    assert not hasattr(ours.forward, "__func__") or ours.forward.__func__.__name__ == "forward"


def test_peft_lora_model():
    peft = pytest.importorskip("peft")
    ref = tiny_llama()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    ref = peft.get_peft_model(ref, cfg)
    ours = copy.deepcopy(ref)
    patch_causal_lm(ours)
    ref.train(), ours.train()
    ids, labels = batch(seed=9)
    a, b = ref(input_ids=ids, labels=labels), ours(input_ids=ids, labels=labels)
    assert b.logits is None and abs(a.loss.item() - b.loss.item()) < 1e-5
    a.loss.backward(), b.loss.backward()
    for (n, p), q in zip(ref.named_parameters(), ours.parameters()):
        if p.requires_grad:
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), n


def test_kv_cache_keyword_follows_the_model_without_deprecation_warnings(monkeypatch):
    from transformers.utils import generic

    warned = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: warned.append(msg))
    ours = patch_causal_lm(tiny_llama())
    ours.train()
    ids, labels = batch()
    out = ours(input_ids=ids, labels=labels, use_cache=True)
    cache_field = "cache" if "cache" in out.keys() else "past_key_values"
    first = out[cache_field]
    assert isinstance(first, transformers.Cache) and first.get_seq_length() == ids.shape[1]
    # a caller written for the old name still hands the model its cache
    out = ours(input_ids=ids[:, :1], labels=labels[:, :1], use_cache=True, past_key_values=first)
    assert out[cache_field].get_seq_length() == ids.shape[1] + 1
    assert warned == [], warned
    with pytest.raises(ValueError, match="both cache and past_key_values"):
        ours(input_ids=ids, labels=labels, cache=first, past_key_values=first)


def test_kv_cache_passed_as_past_key_values_to_models_that_take_it():
    class OldStyle(torch.nn.Module):  # transformers 5.17's forward signature
        def __init__(self):
            super().__init__()
            self.model, self.lm_head, self.config = torch.nn.Identity(), torch.nn.Linear(2, 2), object()
            self.seen = None

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
            self.seen = dict(kwargs, past_key_values=past_key_values)
            return "original"

    model = patch_causal_lm(OldStyle())
    marker = object()
    assert model(input_ids=torch.zeros(1, 3), cache=marker) == "original"
    assert model.seen == {"past_key_values": marker}
    assert model(input_ids=torch.zeros(1, 3), past_key_values=marker) == "original"
    assert model.seen == {"past_key_values": marker}
