"""GGUF export against llama.cpp itself (tests/python/gguf_oracle.py): the
sdist's convert_hf_to_gguf.py on the same merged model for f16/bf16/q8_0,
ggml's reference quantizers for q4_0 and the K-quant mixes, and bad input.
Tiny random models made by code; nothing is downloaded but the pinned
llama.cpp source (once, cached outside the clone)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import gguf_oracle  # noqa: E402

from qforge import export_gguf  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS = 256, 512, 3
# keys that legitimately differ from convert_hf_to_gguf.py's file: none for these models
# (general.name comes from the directory name, so the merged copy is named like the base)
RANK, ALPHA = 4, 8.0
TEXTS = ["hello world, this is a tiny corpus for the tokenizer"] * 40 + \
        ["the quick brown fox jumps over the lazy dog; 12 + 30 = 42"] * 40


def _write_adapter(path: Path, cfg: dict, modules=("q_proj", "k_proj", "v_proj", "down_proj"), seed=1) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    kv = cfg["num_key_value_heads"] * (cfg.get("head_dim") or HIDDEN // cfg["num_attention_heads"])
    shapes = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (kv, HIDDEN), "v_proj": (kv, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
              "down_proj": (HIDDEN, INTERMEDIATE), "up_proj": (INTERMEDIATE, HIDDEN)}
    tensors = {}
    for i in range(cfg["num_hidden_layers"]):
        for m in modules:
            out_f, in_f = shapes[m]
            key = f"base_model.model.model.layers.{i}.{'mlp' if m.endswith(('down_proj', 'up_proj')) else 'self_attn'}.{m}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, in_f, generator=g) * 0.05
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, RANK, generator=g) * 0.05
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": list(modules), "use_rslora": False}))
    return path


def _merged_state(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the merged model in fp32: W.float() + (B.float() @ A.float()) * alpha / r."""
    from safetensors.torch import load_file

    state = {k: v.float() for k, v in load_file(str(base / "model.safetensors")).items()}
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        b = lora[key.replace(".lora_A.", ".lora_B.")]
        state[module + ".weight"] = state[module + ".weight"] + (b.float() @ a.float()) * (ALPHA / RANK)
    return state


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(base dir, adapter dir, merged fp32 checkpoint dir for the converter)."""
    from qforge.models.tiny import write_default_model

    root = tmp_path_factory.mktemp("gguf")
    base = write_default_model(root / "tiny", TEXTS, hidden=HIDDEN, intermediate=INTERMEDIATE, layers=LAYERS)
    cfg = json.loads((base / "config.json").read_text())
    adapter = _write_adapter(root / "adapter", cfg)
    return base, adapter, write_merged(base, adapter, root / "merged")


def write_merged(base: Path, adapter: Path, root: Path) -> Path:
    """The merged model (fp32, _merged_state) as a Hugging Face directory for the converter, named
    like the base (general.name is derived from the directory name), the base's other files beside it."""
    from safetensors.torch import save_file

    merged = root / base.name
    merged.mkdir(parents=True)
    for f in base.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, merged / f.name)
    save_file({k: v.contiguous() for k, v in _merged_state(base, adapter).items()}, str(merged / "model.safetensors"),
              metadata={"format": "pt"})
    return merged


def _fields(reader) -> dict:
    out = {}
    for k, f in reader.fields.items():
        if k.startswith("GGUF."):
            continue
        out[k] = (tuple(int(t) for t in f.types), f.contents())
    return out


@pytest.mark.parametrize("qtype", ["f16", "bf16", "q8_0"])
def test_equals_convert_hf_to_gguf(tiny, tmp_path, qtype):
    base, adapter, merged = tiny
    ref = gguf_oracle.convert_hf_to_gguf(merged, tmp_path / f"ref-{qtype}.gguf", qtype, tokenizer_pre="gpt-2")
    ours = export_gguf(adapter, base, tmp_path / f"ours-{qtype}.gguf", type=qtype, progress=False)
    _assert_same_file(ours, ref)


def _assert_same_file(ours: Path, ref: Path) -> list[str]:
    """Every key (value, type, order) and tensor (name, type, shape, bytes) equal, then the whole
    file; returns the tensor names."""
    g = gguf_oracle.gguf_reader_module()
    r_ref, r_ours = g.GGUFReader(str(ref)), g.GGUFReader(str(ours))
    f_ref, f_ours = _fields(r_ref), _fields(r_ours)
    assert list(f_ours) == list(f_ref)  # same keys, same order
    for key in f_ref:
        assert f_ours[key] == f_ref[key], key
    names = [t.name for t in r_ours.tensors]
    assert names == [t.name for t in r_ref.tensors]
    for a, b in zip(r_ours.tensors, r_ref.tensors):
        assert (a.tensor_type, list(a.shape)) == (b.tensor_type, list(b.shape)), a.name
        assert a.data.tobytes() == b.data.tobytes(), a.name
    assert ours.read_bytes() == ref.read_bytes()  # and so the whole file
    return names


def _gguf_oriented(state: dict, cfg: dict) -> dict[str, torch.Tensor]:
    """The merged fp32 tensors under their GGUF names, q/k permuted as llama.cpp wants them."""
    from qforge.gguf import _gguf_name, _permute

    out = {}
    for hf, t in state.items():
        name = _gguf_name(hf)
        if ".attn_q." in name:
            t = _permute(t, cfg["num_attention_heads"])
        elif ".attn_k." in name:
            t = _permute(t, cfg["num_key_value_heads"])
        out[name] = t
    return out


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@pytest.mark.parametrize("qtype", ["q4_0", "q4_k_m", "q5_k_m", "q6_k"])
def test_quantized_bytes_equal_reference_quantizer(tiny, tmp_path, qtype):
    base, adapter, _ = tiny
    cfg = json.loads((base / "config.json").read_text())
    expected = _gguf_oriented(_merged_state(base, adapter), cfg)
    out = export_gguf(adapter, base, tmp_path / "m.gguf", type=qtype, progress=False)
    g = gguf_oracle.gguf_reader_module()
    reader = g.GGUFReader(str(out))
    default = {"q4_0": "q4_0", "q4_k_m": "q4_K", "q5_k_m": "q5_K", "q6_k": "q6_K"}[qtype]
    seen = 0
    for t in reader.tensors:
        x = expected[t.name].numpy()
        type_name = g.GGMLQuantizationType(t.tensor_type).name
        if x.ndim == 1:
            assert type_name == "F32", t.name
            assert t.data.tobytes() == x.astype(np.float32).tobytes(), t.name
            continue
        want = default
        if t.name == "output.weight":
            want = "q6_K"  # llama-quantize: output -> q6_K unless the mix is q8_0
        elif qtype in ("q4_k_m", "q5_k_m") and (".attn_v." in t.name or ".ffn_down." in t.name):
            layer = int(t.name.split(".")[1])
            if _use_more_bits(layer, LAYERS):
                want = "q6_K"
        assert type_name.lower() == want.lower(), t.name
        ref = gguf_oracle.reference_quantize(want, x)
        assert t.data.tobytes() == ref, f"{t.name} ({want}) differs from ggml's quantize_row_{want}_ref"
        seen += 1
    assert seen == 2 + 7 * LAYERS


def test_merge_into_dequantized_uses_the_nf4_weights(tiny, tmp_path):
    from qforge import nf4

    base, adapter, _ = tiny
    state = _merged_state(base, adapter)
    from safetensors.torch import load_file

    raw = load_file(str(base / "model.safetensors"))
    out = export_gguf(adapter, base, tmp_path / "d.gguf", type="f16", merge_into="dequantized", progress=False)
    g = gguf_oracle.gguf_reader_module()
    tensors = {t.name: t for t in g.GGUFReader(str(out)).tensors}
    name = "model.layers.1.mlp.down_proj"
    packed, qs = nf4.quantize(raw[name + ".weight"].to(torch.bfloat16), blocksize=64, compress_statistics=True)
    w = nf4.dequantize(packed, qs, dtype=torch.float32)
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    a = lora[f"base_model.model.{name}.lora_A.weight"]
    b = lora[f"base_model.model.{name}.lora_B.weight"]
    want = (w + (b @ a) * (ALPHA / RANK)).to(torch.float16).numpy()
    got = tensors["blk.1.ffn_down.weight"].data
    assert got.tobytes() == want.tobytes()
    assert not np.array_equal(got, state[name + ".weight"].to(torch.float16).numpy())
    # an unadapted projection is the NF4 round trip too; norms and embeddings are untouched
    up = raw["model.layers.0.mlp.up_proj.weight"]
    packed, qs = nf4.quantize(up.to(torch.bfloat16), blocksize=64, compress_statistics=True)
    assert tensors["blk.0.ffn_up.weight"].data.tobytes() == \
        nf4.dequantize(packed, qs, dtype=torch.float32).to(torch.float16).numpy().tobytes()
    assert tensors["token_embd.weight"].data.tobytes() == \
        raw["model.embed_tokens.weight"].float().to(torch.float16).numpy().tobytes()


def test_chat_template_generation_markers_removed(tiny, tmp_path):
    base, adapter, _ = tiny
    tok_adapter = tmp_path / "adapter"
    shutil.copytree(adapter, tok_adapter)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (base / f).exists():
            shutil.copy(base / f, tok_adapter / f)
    template = "{% for m in messages %}{{ m['content'] }}{% generation %}{{ '<|eot_id|>' }}{%- endgeneration -%}{% endfor %}"
    (tok_adapter / "chat_template.jinja").write_text(template)
    out = export_gguf(tok_adapter, base, tmp_path / "t.gguf", type="f16", progress=False)
    g = gguf_oracle.gguf_reader_module()
    got = g.GGUFReader(str(out)).fields["tokenizer.chat_template"].contents()
    assert got == "{% for m in messages %}{{ m['content'] }}{{ '<|eot_id|>' }}{% endfor %}"


# ------------------------------------------------------------------ bad input
def _copy_base(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest)
    return dest


def test_unsupported_architecture(tiny, tmp_path):
    base, adapter, _ = tiny
    bad = _copy_base(base, tmp_path / "gpt2")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture model_type='gpt2'"):
        export_gguf(adapter, bad, tmp_path / "x.gguf", progress=False)
    assert not (tmp_path / "x.gguf").exists()


def test_missing_tokenizer_files(tiny, tmp_path):
    base, adapter, _ = tiny
    bad = _copy_base(base, tmp_path / "notok")
    (bad / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="missing tokenizer files"):
        export_gguf(adapter, bad, tmp_path / "x.gguf", progress=False)
    assert not (tmp_path / "x.gguf").exists()


def test_adapter_base_mismatch(tiny, tmp_path):
    base, _, _ = tiny
    cfg = json.loads((base / "config.json").read_text())
    wrong_layers = dict(cfg, num_hidden_layers=LAYERS + 1)
    with pytest.raises(ValueError, match="adapter/base mismatch.*layers.3"):
        export_gguf(_write_adapter(tmp_path / "a1", wrong_layers), base, tmp_path / "x.gguf", progress=False)
    wrong_shape = dict(cfg, num_key_value_heads=cfg["num_attention_heads"])
    with pytest.raises(ValueError, match="adapter/base mismatch.*k_proj"):
        export_gguf(_write_adapter(tmp_path / "a2", wrong_shape), base, tmp_path / "x.gguf", progress=False)
    with pytest.raises(ValueError, match="neither a PEFT adapter directory nor a qforge run directory"):
        export_gguf(tmp_path, base, tmp_path / "x.gguf", progress=False)
    assert not (tmp_path / "x.gguf").exists()


def test_existing_output_is_refused(tiny, tmp_path):
    base, adapter, _ = tiny
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")
    with pytest.raises(ValueError, match="already exists"):
        export_gguf(adapter, base, out, type="q8_0", progress=False)
    assert out.read_bytes() == b"keep"
    export_gguf(adapter, base, out, type="q8_0", progress=False, overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"


def test_writer_error_mid_file_leaves_nothing(tiny, tmp_path):
    """A file size limit (write() fails with EFBIG, as on a full disk) hit mid-file."""
    base, adapter, _ = tiny
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))\n"
        "from qforge import export_gguf\n"
        "try:\n"
        f"    export_gguf({str(adapter)!r}, {str(base)!r}, {str(out_dir / 'm.gguf')!r}, type='f16', progress=False)\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
        "    sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "file size limit" in proc.stdout
    assert list(out_dir.iterdir()) == []


def test_cli_export(tiny, tmp_path, capsys):
    from qforge.cli import main

    base, adapter, _ = tiny
    out = tmp_path / "cli.gguf"
    assert main(["export", "gguf", str(adapter), "--base", str(base), "--out", str(out), "--type", "q4_k_m",
                 "--quiet", "--ollama"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"
    # the Modelfile stops at the tokenizer's eos (<|eot_id|> for the tiny Llama 3 template)
    assert (tmp_path / "Modelfile").read_text() == 'FROM ./cli.gguf\nPARAMETER stop "<|eot_id|>"\n'

    assert main(["export", "gguf", str(adapter), "--base", str(base), "--out", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


# ------------------------------------------------------------------ every family the loader supports
def _family_model(root: Path, family: str) -> Path:
    """A tiny random model of `family` saved as a 16-bit Hugging Face directory."""
    import transformers

    from qforge.models.tiny import build_tokenizer

    tok = build_tokenizer(TEXTS, vocab_size=400)
    # 8 more embeddings than tokens (as many published models pad): [PADn] tokens in the vocab
    common = dict(vocab_size=len(tok) + 8, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "llama3_rope":
        cfg = transformers.LlamaConfig(**common, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256, "rope_theta": 500000.0}, rope_theta=500000.0)
    elif family == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=None)
    elif family == "qwen2_tied":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True)
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    path = root / family
    model.to(torch.bfloat16).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.mark.parametrize("family", ["llama3_rope", "mistral", "qwen2_tied", "qwen3"])
def test_families_equal_convert_hf_to_gguf(tmp_path, family):
    base = _family_model(tmp_path, family)
    cfg = json.loads((base / "config.json").read_text())
    modules = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "up_proj")
    adapter = _write_adapter(tmp_path / "adapter", cfg, modules=modules, seed=3)
    merged = write_merged(base, adapter, tmp_path / "merged")
    ref = gguf_oracle.convert_hf_to_gguf(merged, tmp_path / "ref.gguf", "f16", tokenizer_pre="gpt-2")
    ours = export_gguf(adapter, base, tmp_path / "ours.gguf", type="f16", progress=False)
    names = _assert_same_file(ours, ref)
    expect = {"llama3_rope": "rope_freqs.weight", "qwen3": "blk.0.attn_q_norm.weight", "qwen2_tied": "blk.0.attn_q.bias"}
    if family in expect:
        assert expect[family] in names
    assert ("output.weight" in names) == (family != "qwen2_tied")


def test_tokenizer_pre_from_the_regex(tmp_path):
    """tokenizer.ggml.pre from tokenizer.json's pre-tokenizer: Llama 3 and Qwen2 split regexes
    (before a ByteLevel without its own regex), plain GPT-2 byte-level; anything else refused."""
    from qforge.gguf import _LLAMA3_REGEX, _QWEN2_REGEX, _tokenizer_pre

    def seq(regex):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}}

    assert _tokenizer_pre(seq(_LLAMA3_REGEX), tmp_path) == "llama-bpe"
    assert _tokenizer_pre(seq(_QWEN2_REGEX), tmp_path) == "qwen2"
    assert _tokenizer_pre({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}, tmp_path) == "gpt-2"
    with pytest.raises(ValueError, match="pre-tokenizer is not one qforge recognizes"):
        _tokenizer_pre(seq(r"\p{N}{1,2}|\s+"), tmp_path)
    with pytest.raises(ValueError, match="pre-tokenizer"):
        _tokenizer_pre({"pre_tokenizer": {"type": "ByteLevel", "use_regex": False}}, tmp_path)
