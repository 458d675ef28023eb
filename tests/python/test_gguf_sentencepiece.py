"""GGUF export of models with a SentencePiece tokenizer.model (Llama 2 / Mistral
v0.1 style: tokenizer.ggml.model "llama", scores and token types). Oracles: the
sdist's convert_hf_to_gguf.py on the same merged model, byte for byte; llama.cpp
(the llama_cpp package built from the sdist) tokenizing strings as the
sentencepiece library and transformers' tokenizer do. The tokenizer is trained
here by the sentencepiece package; nothing is downloaded."""
from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import gguf_oracle  # noqa: E402
from test_gguf import HIDDEN, INTERMEDIATE, _assert_same_file, _write_adapter, write_merged  # noqa: E402

from qforge import export_gguf  # noqa: E402

CORPUS = ["hello world, this is a tiny corpus for the tokenizer",
          "the quick brown fox jumps over the lazy dog; 12 + 30 = 42",
          "Ünïcödé — naïve café 日本語 テキスト", "  leading spaces and\ttabs\nnewlines"] * 30
# strings llama.cpp must tokenize as transformers does (byte fallback, digits, unicode, added tokens;
# text right after an added token is left out: llama.cpp's SPM tokenizer gives it its own space
# prefix, transformers does not, whatever the vocabulary)
STRINGS = ["hello world  12345 café", "日本語 テキスト", "the lazy dog;\n\ttabs", "emoji 🦙 ok",
           "[INST] hi [/INST]", "call <tool>", "a <custom>"]
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
                    "[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


def _train_sentencepiece(path: Path) -> Path:
    """A 400-piece BPE SentencePiece model as Llama 2 / Mistral ship them (byte fallback, digits split,
    <unk> <s> </s> = 0 1 2), with transformers' tokenizer files beside it."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    path.mkdir(parents=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2)
    (path / "tokenizer.model").write_bytes(model.getvalue())
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    tok = AutoTokenizer.from_pretrained(str(path))  # converted from tokenizer.model by transformers
    tok.add_special_tokens({"additional_special_tokens": ["<tool>"]})  # a control token
    tok.add_tokens(["<custom>"])  # a user-defined one
    tok.chat_template = MISTRAL_TEMPLATE
    tok.save_pretrained(str(path))
    # the published Llama 2 / Mistral repositories list the added tokens in tokenizer_config.json
    # (as transformers 4 wrote it), where convert_hf_to_gguf reads them
    config = json.loads((path / "tokenizer_config.json").read_text())
    added = json.loads((path / "tokenizer.json").read_text())["added_tokens"]
    config["added_tokens_decoder"] = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module", params=["llama", "mistral"])
def spm_model(request, tmp_path_factory):
    """(base dir, adapter dir, merged fp32 checkpoint dir) of a tiny model with a SentencePiece tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp(f"gguf_spm_{request.param}")
    tok_dir = _train_sentencepiece(root / "tokenizer")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    config = AutoConfig.for_model(
        request.param, vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
        tie_word_embeddings=False, initializer_range=0.08, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    base = root / "tiny"
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(str(base))
    for f in tok_dir.iterdir():
        shutil.copy(f, base / f.name)
    adapter = _write_adapter(root / "adapter", json.loads((base / "config.json").read_text()))
    merged = write_merged(base, adapter, root / "merged")
    return base, adapter, merged


def test_equals_convert_hf_to_gguf(spm_model, tmp_path):
    base, adapter, merged = spm_model
    ref = gguf_oracle.convert_hf_to_gguf(merged, tmp_path / "ref.gguf", "f16")
    ours = export_gguf(adapter, base, tmp_path / "ours.gguf", type="f16", progress=False)
    _assert_same_file(ours, ref)
    fields = gguf_oracle.gguf_reader_module().GGUFReader(str(ours)).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    types = fields["tokenizer.ggml.token_type"].contents()
    # <unk> <s> </s> control (listed special in added_tokens_decoder, as the converter types them),
    # <0x00> a byte piece, the trained pieces normal
    assert types[:4] == [3, 3, 3, 6] and types[399] == 1
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert types[tokens.index("<tool>")] == 3 and types[tokens.index("<custom>")] == 4


def test_llama_cpp_tokenizes_like_sentencepiece_and_transformers(spm_model, tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    base, adapter, _ = spm_model
    out = export_gguf(adapter, base, tmp_path / "ours.gguf", type="q8_0", progress=False)
    llm = gguf_oracle.llama_cpp_python().Llama(model_path=str(out), vocab_only=True, verbose=False)
    try:
        hf = AutoTokenizer.from_pretrained(str(base))
        sp = spm.SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
        for text in STRINGS:
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf.encode(text), text
        # the sentencepiece library itself, leading spaces included (transformers' non-legacy Llama
        # tokenizer drops the dummy prefix of a text that starts with a space; llama.cpp and
        # sentencepiece keep it)
        for text in STRINGS[:5] + ["  two leading spaces", " one"]:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == sp.encode(text), text
    finally:
        llm.close()


def test_bad_sentencepiece_model(spm_model, tmp_path):
    base, adapter, _ = spm_model
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    (broken / "tokenizer.model").write_bytes(b"not a protobuf")
    with pytest.raises(ValueError, match="tokenizer.model: not a readable SentencePiece model"):
        export_gguf(adapter, broken, tmp_path / "x.gguf", type="f16", progress=False)
    assert not (tmp_path / "x.gguf").exists()

    small = tmp_path / "small-vocab"
    shutil.copytree(base, small)
    cfg = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps(dict(cfg, vocab_size=300)))
    with pytest.raises(ValueError, match="400 pieces, the model only 300 embeddings"):
        export_gguf(adapter, small, tmp_path / "y.gguf", type="f16", progress=False)
    assert not (tmp_path / "y.gguf").exists()


def test_added_tokens_only_in_tokenizer_json(spm_model, tmp_path):
    """transformers 5 saves added tokens in tokenizer.json only: the converter's file then lacks them
    ([PAD400]); qforge reads them there (a documented difference from the converter)."""
    base, adapter, _ = spm_model
    v5 = tmp_path / "v5"
    shutil.copytree(base, v5)
    config = json.loads((v5 / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]
    (v5 / "tokenizer_config.json").write_text(json.dumps(config))
    ours = export_gguf(adapter, v5, tmp_path / "ours.gguf", type="f16", progress=False)
    fields = gguf_oracle.gguf_reader_module().GGUFReader(str(ours)).fields
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    assert tokens[400:402] == ["<tool>", "<custom>"] and types[400:402] == [3, 4]
    scores = fields["tokenizer.ggml.scores"].contents()
    assert scores[400] == scores[401] == -1000.0
