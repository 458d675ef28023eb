"""PEFT-format adapters: what qforge saves loads in peft.PeftModel on the original
transformers model and gives the same outputs; what PEFT saves loads in qforge;
merged checkpoints load in transformers with the same outputs."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import qforge  # noqa: E402
from qforge.nn import NF4Linear  # noqa: E402

SMALL = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.05)


@pytest.fixture(params=["llama", "qwen2"])
def base_dir(request, tmp_path):
    cfg = transformers.LlamaConfig(**SMALL) if request.param == "llama" else transformers.Qwen2Config(**SMALL)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path / "base"))
    return tmp_path / "base"


def hf_dequantized(base_dir, qmodel):
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    for name, m in qmodel.named_modules():
        if isinstance(m, NF4Linear):
            ref.get_submodule(name).weight.data = m.dequantize(torch.float32)
    return ref.eval()


def trained_like(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


IDS = torch.randint(0, SMALL["vocab_size"], (2, 15), generator=torch.Generator().manual_seed(9))


def test_saved_adapter_loads_in_peft_with_same_outputs(base_dir, tmp_path):
    model = qforge.load(base_dir, dtype=torch.float32, device="cpu")
    qforge.add_lora(model, r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"])
    trained_like(model).eval()
    qforge.save_adapter(model, tmp_path / "adapter")
    ref = hf_dequantized(base_dir, model)
    with torch.no_grad():
        base_out = ref(IDS).logits.clone()
    peft_model = peft.PeftModel.from_pretrained(ref, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        want = peft_model(IDS).logits
        got = model(IDS).logits
    assert (want - base_out).abs().max() > 1e-3  # the adapter changes the outputs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # same tensors under the same names as PEFT's own state dict
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    ours = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    theirs = get_peft_model_state_dict(peft_model)
    assert set(ours) == set(theirs) and len(ours) == 28
    for k in ours:
        assert torch.equal(ours[k], theirs[k].cpu()), k


def test_modules_left_without_lora_are_not_adapted_by_peft(base_dir, tmp_path):
    # a frozen part (a vision tower in a VLM) has q_proj etc. too; PEFT must not adapt them
    model = qforge.load(base_dir, dtype=torch.float32, device="cpu")
    model.qforge_frozen_prefixes = ("model.layers.0.",)
    qforge.add_lora(model, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    trained_like(model).eval()
    qforge.save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, NF4Linear) and m.lora_A is not None)
    assert cfg["target_modules"] == adapted and not any(".layers.0." in n for n in adapted)
    ref = hf_dequantized(base_dir, model)
    peft_model = peft.PeftModel.from_pretrained(ref, str(tmp_path / "adapter")).eval()
    peft_adapted = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                          if hasattr(m, "lora_A") and len(m.lora_A))
    assert peft_adapted == adapted
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, peft_model(IDS).logits, rtol=1e-5, atol=1e-5)
    again = qforge.load(base_dir, dtype=torch.float32, device="cpu")
    qforge.load_adapter(again, tmp_path / "adapter")
    assert sorted(n for n, m in again.named_modules()
                  if isinstance(m, NF4Linear) and m.lora_A is not None) == adapted


def test_adapter_config_matches_peft(base_dir, tmp_path):
    model = qforge.load(base_dir, dtype=torch.float32, device="cpu")
    qforge.add_lora(model, r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
    qforge.save_adapter(model, tmp_path / "a", base_model_name_or_path="my/base")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    loaded = peft.LoraConfig.from_pretrained(str(tmp_path / "a"))
    assert loaded.r == 4 and loaded.lora_alpha == 8 and loaded.lora_dropout == 0.05
    assert set(loaded.target_modules) == {"q_proj", "v_proj"} and loaded.task_type == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == "my/base" and cfg["peft_type"] == "LORA"


def test_peft_saved_adapter_loads_in_qforge(base_dir, tmp_path):
    model = qforge.load(base_dir, dtype=torch.float32, device="cpu")
    ref = hf_dequantized(base_dir, model)
    lcfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "o_proj", "down_proj"],
                           task_type="CAUSAL_LM", use_rslora=True)
    pm = peft.get_peft_model(ref, lcfg)
    trained_like(pm)
    pm.save_pretrained(str(tmp_path / "peft-adapter"))
    pm.eval()
    qforge.load_adapter(model, tmp_path / "peft-adapter")
    assert model.qforge_lora["use_rslora"] and model.model.layers[0].self_attn.q_proj.scaling == 12 / 2
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, pm(IDS).logits, rtol=1e-5, atol=1e-5)


def test_round_trip_is_exact(base_dir, tmp_path):
    model = qforge.load(base_dir, dtype=torch.float32, device="cpu")
    qforge.add_lora(model, r=8, lora_alpha=16)
    trained_like(model).eval()
    qforge.save_adapter(model, tmp_path / "adapter")
    again = qforge.load(base_dir, dtype=torch.float32, device="cpu")
    qforge.load_adapter(again, tmp_path / "adapter")
    again.eval()
    for (n, p), (n2, p2) in zip(model.named_parameters(), again.named_parameters()):
        assert n == n2 and torch.equal(p, p2), n
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, again(IDS).logits)


def test_merge_and_save_loads_in_transformers(base_dir, tmp_path):
    model = qforge.load(base_dir, dtype=torch.float32, device="cpu")
    qforge.add_lora(model, r=8, lora_alpha=16)
    trained_like(model).eval()
    qforge.merge_and_save(model, tmp_path / "merged", dtype=torch.float32, max_shard_bytes=100_000)
    assert (tmp_path / "merged" / "model.safetensors.index.json").exists()
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, model(IDS).logits, rtol=1e-4, atol=1e-5)
    # bf16 merge: the default
    qforge.merge_and_save(model, tmp_path / "merged16")
    m16 = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged16"))
    assert m16.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


def test_adapter_errors(base_dir, tmp_path):
    model = qforge.load(base_dir, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="no LoRA adapter"):
        qforge.save_adapter(model, tmp_path / "x")
    with pytest.raises(ValueError, match=r"adapter_config\.json: missing"):
        qforge.load_adapter(model, tmp_path)
    other = qforge.load(base_dir, dtype=torch.float32, device="cpu")
    qforge.add_lora(other, r=4, lora_alpha=8)
    qforge.save_adapter(other, tmp_path / "r4")
    qforge.add_lora(model, r=8, lora_alpha=8)
    with pytest.raises(ValueError, match=r"lora_A\.weight. has shape \(4, \d+\), the model.s is \(8, \d+\)"):
        qforge.load_adapter(model, tmp_path / "r4")
