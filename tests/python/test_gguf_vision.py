"""Vision-language GGUF export (Idefics3 / SmolVLM): qforge loads the model (language
model NF4 + LoRA, vision tower and projector frozen 16-bit), fine-tunes the language
part on the CPU, and writes the language model GGUF plus the mmproj GGUF. Oracles:
the sdist's convert_hf_to_gguf.py (with and without --mmproj) on the same merged
model, byte for byte; llama.cpp's mtmd (libmtmd) encoding one image through our
mmproj and through the converter's, and transformers' vision tower + connector on
the same pixels. A tiny random model made by code; nothing downloaded."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import gguf_oracle  # noqa: E402
from test_gguf import ALPHA, RANK, TEXTS, _assert_same_file, write_merged  # noqa: E402

from qforge import export_gguf  # noqa: E402

IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]


def _write_tiny_idefics3(path: Path) -> Path:
    """A random Idefics3 (SigLIP-style ViT 2 x 48 wide on 64 x 64 images in 16 x 16 patches,
    pixel-shuffle x2 projector, 2-layer Llama language model) with a trained byte-level BPE
    tokenizer and an image processor config, saved as a 16-bit Hugging Face directory."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, LlamaConfig

    from qforge.models.tiny import build_tokenizer

    # mtmd frames Idefics3 images with "\n\n" and "\n" tokens: the corpus has them
    tok = build_tokenizer(TEXTS + ["an image\n\nrow one\nrow two\n\n"] * 20, vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                       rope_theta=10000.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, architectures=["LlamaForCausalLM"],
                       tie_word_embeddings=False, initializer_range=0.08)
    config = Idefics3Config(
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=16, layer_norm_eps=1e-6, initializer_range=0.05),
        text_config=text.to_dict(), scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 64},
                              do_image_splitting=False).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """(base dir, trained adapter dir, merged fp32 checkpoint dir for the converter, losses)."""
    import qforge
    from qforge import peft_io
    from qforge.models import load, load_tokenizer
    from qforge.nn import NF4Linear

    root = tmp_path_factory.mktemp("gguf_vision")
    base = _write_tiny_idefics3(root / "tiny")
    model = load(base, device="cpu", dtype=torch.bfloat16)
    vision_before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(
        model.qforge_frozen_prefixes)}
    qforge.add_lora(model, r=RANK, lora_alpha=ALPHA, seed=0)
    tok = load_tokenizer(base)
    ids = torch.tensor([tok.encode(TEXTS[0] + " " + TEXTS[-1])])
    opt = torch.optim.AdamW(qforge.nn.lora_parameters(model), lr=2e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    adapter = peft_io.save_adapter(model, root / "adapter")

    merged = write_merged(base, adapter, root / "merged")
    state = {"losses": losses, "vision_before": vision_before,
             "vision_after": {n: p.detach() for n, p in model.named_parameters() if n in vision_before},
             "text_q_proj": type(model.get_submodule("model.text_model.layers.0.self_attn.q_proj")),
             "vision_q_proj": type(model.get_submodule("model.vision_model.encoder.layers.0.self_attn.q_proj")),
             "nf4": NF4Linear}
    return base, adapter, merged, state


@pytest.fixture(scope="module")
def exported(vlm, tmp_path_factory):
    """(our f16 language file, our mmproj, the converter's mmproj) of the trained model."""
    base, adapter, merged, _ = vlm
    root = tmp_path_factory.mktemp("gguf_vision_f16")
    out, mmproj = root / "ours.gguf", root / "ours-mmproj.gguf"
    export_gguf(adapter, base, out, type="f16", progress=False, mmproj=mmproj)
    ref_mmproj = gguf_oracle.convert_hf_to_gguf(merged, root / "ref-mmproj.gguf", "f16", mmproj=True)
    return out, mmproj, ref_mmproj


def test_language_part_is_fine_tuned_vision_frozen(vlm):
    base, adapter, _, state = vlm
    assert state["text_q_proj"] is state["nf4"]  # the language model is NF4 + LoRA
    assert state["vision_q_proj"] is torch.nn.Linear  # the vision tower is a plain frozen 16-bit linear
    assert state["vision_before"], "no vision parameters found"
    for name, before in state["vision_before"].items():
        assert before.dtype == torch.bfloat16, name
        assert torch.equal(before, state["vision_after"][name]), name
    losses = state["losses"]
    assert losses[-1] < 0.7 * losses[0], losses
    keys = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    # full names, so PEFT adapts the language model's projections only, not the vision tower's q_proj
    assert {k.rsplit(".", 1)[-1] for k in keys} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"}
    assert all(".text_model." in k for k in keys), keys
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all(".text_model." in k for k in names)


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_both_files_equal_convert_hf_to_gguf(vlm, tmp_path, qtype):
    base, adapter, merged, _ = vlm
    ref_text = gguf_oracle.convert_hf_to_gguf(merged, tmp_path / "ref.gguf", qtype, tokenizer_pre="gpt-2")
    ref_mmproj = gguf_oracle.convert_hf_to_gguf(merged, tmp_path / "ref-mmproj.gguf", qtype, mmproj=True)
    out, mmproj = tmp_path / "ours.gguf", tmp_path / "ours-mmproj.gguf"
    export_gguf(adapter, base, out, type=qtype, progress=False, mmproj=mmproj)
    text_names = _assert_same_file(out, ref_text)
    names = _assert_same_file(mmproj, ref_mmproj)
    assert "mm.model.fc.weight" in names and "v.blk.1.attn_q.weight" in names
    assert "blk.1.attn_q.weight" in text_names and not any(n.startswith(("v.", "mm.")) for n in text_names)


def test_mtmd_encodes_an_image_like_the_reference_and_transformers(vlm, exported):
    from transformers import Idefics3ForConditionalGeneration

    base = vlm[0]
    out, mmproj, ref_mmproj = exported
    image = np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    ours = [e for kind, e in gguf_oracle.mtmd_run(out, mmproj, image)[0] if kind == "image"]
    ref = [e for kind, e in gguf_oracle.mtmd_run(out, ref_mmproj, image)[0] if kind == "image"]
    # a 64 x 64 image with longest_edge 64: the overview and one tile, each 16 patches -> 4 tokens
    assert [e.shape for e in ours] == [(4, 64), (4, 64)]
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)

    model = Idefics3ForConditionalGeneration.from_pretrained(str(base), dtype=torch.float32)
    pixels = (torch.from_numpy(image).float().permute(2, 0, 1)[None] / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        want = model.model.connector(model.model.vision_model(pixel_values=pixels).last_hidden_state)[0].numpy()
    scale = np.abs(want).max()
    assert scale > 0.1
    for got in ours:  # f16 weights and activations in ggml: within 0.5% of the scale
        assert np.abs(got - want).max() <= 5e-3 * scale


def test_quality_gate_runs_on_the_language_file(vlm, exported):
    from qforge.gguf import check_export

    base, adapter, _, _ = vlm
    assert check_export(exported[0], adapter, base, "f16") <= 0.01  # KL(adapter model || f16 file), text prompts


def test_mmproj_bad_input(vlm, tmp_path):
    from test_gguf import _write_adapter

    base, adapter, _, _ = vlm
    existing = tmp_path / "exists-mmproj.gguf"
    existing.write_bytes(b"keep")
    with pytest.raises(ValueError, match="mmproj output file already exists"):
        export_gguf(adapter, base, tmp_path / "a.gguf", type="f16", progress=False, mmproj=existing)
    assert existing.read_bytes() == b"keep" and not (tmp_path / "a.gguf").exists()

    # no image processor config: refused before either file is written
    broken = tmp_path / "no-preprocessor"
    shutil.copytree(base, broken)
    (broken / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="image_mean"):
        export_gguf(adapter, broken, tmp_path / "b.gguf", type="f16", progress=False, mmproj=tmp_path / "b-mm.gguf")
    assert not (tmp_path / "b.gguf").exists() and not (tmp_path / "b-mm.gguf").exists()

    # an adapter on the vision tower
    vision_adapter = tmp_path / "vision-adapter"
    shutil.copytree(adapter, vision_adapter)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(vision_adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.vision_model.encoder.layers.0.self_attn.q_proj.lora_{}.weight"
    tensors[key.format("A")], tensors[key.format("B")] = torch.zeros(RANK, 48), torch.zeros(48, RANK)
    save_file(tensors, str(vision_adapter / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="vision tower"):
        export_gguf(vision_adapter, base, tmp_path / "c.gguf", type="f16", progress=False)
    assert not (tmp_path / "c.gguf").exists()

    # a text-only model has no projector
    from qforge.models.tiny import write_default_model

    text_only = write_default_model(tmp_path / "text", TEXTS[:4], hidden=64, intermediate=128, layers=1)
    cfg = json.loads((text_only / "config.json").read_text())
    text_adapter = _write_adapter(tmp_path / "text-adapter", cfg, modules=())
    with pytest.raises(ValueError, match="not a vision-language model"):
        export_gguf(text_adapter, text_only, tmp_path / "d.gguf", type="f16", progress=False,
                    mmproj=tmp_path / "d-mm.gguf")
    assert not (tmp_path / "d.gguf").exists()


def test_qforge_train_then_cli_export(vlm, tmp_path):
    """`qforge train` on the vision-language model (text conversations: the language model's LoRA
    only), then `qforge export gguf RUN_DIR ... --mmproj`."""
    from qforge import train as T
    from qforge.cli import main

    base = vlm[0]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": TEXTS[0]},
                                                     {"role": "assistant", "content": TEXTS[-1]}]}) + "\n"
                            for _ in range(4)))
    summary = T.train(model=str(base), data=str(data), output=str(tmp_path / "run"), max_steps=2, save_every=0,
                      device="cpu", lora_r=RANK, lora_alpha=ALPHA, progress=False)
    assert summary["steps"] == 2 and all(np.isfinite(summary["losses"]))
    out, mmproj = tmp_path / "cli.gguf", tmp_path / "cli-mmproj.gguf"
    assert main(["export", "gguf", str(tmp_path / "run"), "--base", str(base), "--out", str(out), "--type",
                 "q4_k_m", "--quiet", "--mmproj", str(mmproj)]) == 0
    reader = gguf_oracle.gguf_reader_module().GGUFReader(str(mmproj))
    assert reader.fields["general.file_type"].contents() == 1  # the 4-bit mixes ship an f16 mmproj
    assert reader.fields["clip.projector_type"].contents() == "idefics3"
    assert out.exists()


def test_image_prompt_generates_like_transformers(vlm, exported):
    """llama.cpp (language GGUF + mmproj, f16) generates the same 16 greedy tokens after an
    image+text prompt as transformers' merged model (weights rounded to f16 as in the files) fed
    the same sequence: mtmd's text tokens embedded, its image slots filled with transformers' own
    vision tower + connector output."""
    from transformers import Idefics3ForConditionalGeneration

    merged = vlm[2]
    out, mmproj, _ = exported
    image = np.random.default_rng(11).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    chunks, generated = gguf_oracle.mtmd_run(out, mmproj, image, prompt="<|begin_of_text|>the image shows <__media__> a",
                                             n_generate=16)

    model = Idefics3ForConditionalGeneration.from_pretrained(str(merged), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
        pixels = (torch.from_numpy(image).float().permute(2, 0, 1)[None] / 255.0 - 0.5) / 0.5
        features = model.model.connector(model.model.vision_model(pixel_values=pixels).last_hidden_state)[0]
        embed = model.model.text_model.embed_tokens
        parts = [embed(torch.tensor(ids)) if kind == "text" else features for kind, ids in chunks]
        assert [kind for kind, _ in chunks].count("image") == 2  # overview + one tile
        assert all(i >= 0 for kind, ids in chunks if kind == "text" for i in ids)  # every framing token found
        seq = torch.cat(parts)[None]
        want = []
        for _ in range(16):
            hidden = model.model.text_model(inputs_embeds=seq).last_hidden_state
            token = int(model.lm_head(hidden[:, -1]).argmax())
            want.append(token)
            seq = torch.cat([seq, embed(torch.tensor([[token]]))], dim=1)
    assert generated == want, (generated, want)
    assert len(set(want)) > 2, want  # not a degenerate repetition
