"""qforge.load: tiny random Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 checkpoints (16-bit
safetensors quantized on load, or bitsandbytes "bnb-4bit" files) give the logits
and the loss of transformers' own model holding the dequantized weights; bad
directories get clear errors."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import qforge  # noqa: E402
from qforge import hf, nf4  # noqa: E402
from qforge.nn import NF4Linear  # noqa: E402

SMALL = dict(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.05)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "mistral": lambda: transformers.MistralConfig(**SMALL, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=True),  # q/k/v biases, tied head
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=16),  # q/k norms
    # sliding window, attention and final-logit softcaps, tied head
    "gemma2": lambda: transformers.Gemma2Config(**SMALL, head_dim=16, sliding_window=8),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**SMALL, head_dim=16, sliding_window=8),  # + q/k norms
}


def save_random(tmp_path, family, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]())
    path = tmp_path / family
    model.to(dtype).save_pretrained(str(path))
    return path


def reference_with_dequantized(path, qmodel):
    """transformers' model from the same directory with every quantized projection
    replaced by qforge's dequantization of it (what the NF4 model computes with)."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    n = 0
    for name, m in qmodel.named_modules():
        if isinstance(m, NF4Linear):
            target = ref.get_submodule(name)
            assert isinstance(target, torch.nn.Linear)
            target.weight.data = m.dequantize(torch.float32)
            n += 1
    assert n == 7 * SMALL["num_hidden_layers"]
    return ref.eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_loss_equal_transformers_with_dequantized_weights(tmp_path, family):
    path = save_random(tmp_path, family)
    model = qforge.load(path, dtype=torch.float32, device="cpu")
    assert type(model).__name__ == type(transformers.AutoModelForCausalLM.from_config(FAMILIES[family]())).__name__
    layer = model.model.layers[0]
    for proj in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
        assert isinstance(proj, NF4Linear) and proj.weight.packed.dtype == torch.uint8
    assert not any(p.requires_grad for p in model.parameters())
    ref = reference_with_dequantized(path, model)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, want = model(ids, labels=ids), ref(ids, labels=ids)
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-5)
    # training loss through the fused linear-cross-entropy: no logits, same value
    hf.patch_causal_lm(model)
    model.train()
    fused = model(ids, labels=ids)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, want.loss, rtol=1e-5, atol=1e-5)


def test_quantized_on_load_equals_qforge_quantizer(tmp_path):
    path = save_random(tmp_path, "llama", dtype=torch.bfloat16)
    model = qforge.load(path, dtype=torch.bfloat16, device="cpu")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
    w = ref.model.layers[1].mlp.up_proj.weight.data
    packed, state = nf4.quantize(w, blocksize=64, compress_statistics=True)
    q = model.model.layers[1].mlp.up_proj
    assert torch.equal(q.weight.packed, packed.view(-1))
    assert torch.equal(q.weight.absmax, state.absmax)
    assert torch.equal(q.dequantize(), nf4.dequantize(packed, state))
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)


def test_generate_works(tmp_path):
    path = save_random(tmp_path, "llama")
    model = qforge.load(path, dtype=torch.float32, device="cpu")
    ref = reference_with_dequantized(path, model)
    ids = torch.tensor([[1, 5, 9, 42]])
    a = model.generate(ids, max_new_tokens=6, do_sample=False)
    b = ref.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b) and a.shape[1] == 10


@pytest.mark.parametrize("double_quant", [True, False])
def test_bnb_4bit_checkpoint_round_trip(tmp_path, double_quant):
    path = save_random(tmp_path, "qwen2")
    q16 = qforge.load(path, dtype=torch.float32, device="cpu", compress_statistics=double_quant)
    out = tmp_path / "bnb"
    qforge.save_4bit(q16, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "bitsandbytes"
    assert cfg["quantization_config"]["bnb_4bit_use_double_quant"] is double_quant
    weights, others = nf4.load_safetensors(out / "model.safetensors")
    assert len(weights) == 14 and "model.layers.0.self_attn.q_proj.bias" in others
    q4 = qforge.load(out, dtype=torch.float32, device="cpu")
    for name, m in q4.named_modules():
        if isinstance(m, NF4Linear):
            src = q16.get_submodule(name)
            assert torch.equal(m.weight, src.weight), name
            assert m.float_absmax is (not double_quant)
    ids = torch.randint(0, SMALL["vocab_size"], (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(q4(ids).logits, q16(ids).logits, rtol=0, atol=0)


def test_sharded_bnb_4bit_checkpoint_loads(tmp_path):
    """A bnb-4bit checkpoint split into shards + model.safetensors.index.json."""
    path = save_random(tmp_path, "llama")
    q16 = qforge.load(path, dtype=torch.float32, device="cpu")
    out = tmp_path / "bnb-sharded"
    qforge.save_4bit(q16, out, max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    q4 = qforge.load(out, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, SMALL["vocab_size"], (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(q4(ids).logits, q16(ids).logits, rtol=0, atol=0)


def test_checkpoint_quantized_by_bitsandbytes_loads(tmp_path):
    """Every projection quantized by bitsandbytes itself (quantize_4bit, its
    QuantState.as_dict(packed=True) keys): qforge's model equals transformers'
    with bitsandbytes' own dequantization of the same codes."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    from safetensors.torch import load_file, save_file

    path = save_random(tmp_path, "llama")
    tensors = load_file(str(path / "model.safetensors"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    out = {}
    for key, t in tensors.items():
        if any(f".{p}.weight" in key for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj")):
            packed, state = bnb_f.quantize_4bit(t.float(), blocksize=64, compress_statistics=True, quant_type="nf4")
            out[key] = packed
            out.update({f"{key}.{k}": v for k, v in state.as_dict(packed=True).items()})
            ref.get_submodule(key[: -len(".weight")]).weight.data = bnb_f.dequantize_4bit(packed, state).float()
        else:
            out[key] = t
    bnb_dir = tmp_path / "bnb-made"
    bnb_dir.mkdir()
    save_file(out, str(bnb_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                  "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    (bnb_dir / "config.json").write_text(json.dumps(cfg))
    model = qforge.load(bnb_dir, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, SMALL["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ errors
def test_missing_directory_and_config(tmp_path):
    with pytest.raises(ValueError, match="no such model directory"):
        qforge.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"config\.json: missing"):
        qforge.load(tmp_path / "empty")


def test_unsupported_architecture(tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match=r"unsupported architecture model_type='gpt2' \(GPT2LMHeadModel\)"):
        qforge.load(d)


def test_partial_checkpoint_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_random(tmp_path, "llama")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"partial checkpoint: 1 tensors missing \(model\.layers\.1\.mlp\.down_proj"):
        qforge.load(path, device="cpu")


def test_partial_checkpoint_missing_shard(tmp_path):
    path = save_random(tmp_path, "llama")
    (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"partial checkpoint: 1 of 2 shards .* missing \(model-00002-of-00002"):
        qforge.load(path, device="cpu")


def test_truncated_safetensors(tmp_path):
    path = save_random(tmp_path, "llama")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        qforge.load(path, device="cpu")


def test_wrong_shape_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_random(tmp_path, "llama")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 64)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj\.weight' has shape \(32, 64\)"):
        qforge.load(path, device="cpu")


def test_unsupported_quantization(tmp_path):
    path = save_random(tmp_path, "llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quantization_config 'gptq'"):
        qforge.load(path, device="cpu")
