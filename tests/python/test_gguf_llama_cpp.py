"""Exported GGUF files run in llama.cpp itself (the llama_cpp package built from
the pinned llama-cpp-python sdist, cached outside the clone by gguf_oracle):
logits for a prompt against transformers' merged model, quantized files no
worse than llama.cpp's own pipeline (convert_hf_to_gguf.py f16 ->
llama_model_quantize), greedy generation, and the KL quality gate."""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import gguf_oracle  # noqa: E402
from test_gguf import _merged_state, tiny  # noqa: E402,F401  (the module fixture)

from qforge import export_gguf  # noqa: E402

PROMPT = [0, 25, 87, 140, 33, 201, 9, 64, 120, 77, 5, 300, 44, 12, 250, 180]
# llama-quantize's ftype numbers (LlamaFileType)
FTYPES = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


@pytest.fixture(scope="module")
def llama_cpp():
    return gguf_oracle.llama_cpp_python()


def _gguf_logits(llama_cpp, path: Path, tokens: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def _gguf_greedy(llama_cpp, path: Path, tokens: list[int], n: int) -> list[int]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2)
    try:
        out = list(tokens)
        llm.eval(out)
        for _ in range(n):
            nxt = int(np.argmax(llm.scores[len(out) - 1]))
            out.append(nxt)
            llm.eval([nxt])
        return out[len(tokens):]
    finally:
        llm.close()


def _hf_model(base: Path, state: dict, dtype_round=None):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    sd = {k: (v.to(dtype_round).float() if dtype_round is not None else v) for k, v in state.items()}
    model.load_state_dict(sd, strict=False)
    return model


def _hf_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


def _mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    p = torch.log_softmax(torch.from_numpy(p_logits), -1)
    q = torch.log_softmax(torch.from_numpy(q_logits), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_f16_logits_and_greedy_match_transformers(tiny, tmp_path, llama_cpp):
    base, adapter, _ = tiny
    state = _merged_state(base, adapter)
    out = export_gguf(adapter, base, tmp_path / "m.gguf", type="f16", progress=False)
    hf = _hf_model(base, state, torch.float16)  # the same f16-rounded weights, fp32 arithmetic
    ref = _hf_logits(hf, PROMPT)
    got = _gguf_logits(llama_cpp, out, PROMPT)
    # llama.cpp's CPU f16 matmuls round their activations to f16 as well: allow 4 f16 ulps at the
    # logits' scale (measured: 0.0074 at a scale of 4.4, i.e. 2 ulps of 2^-8)
    ulp = 2.0 ** (np.floor(np.log2(np.abs(ref).max())) - 10)
    assert np.abs(got - ref).max() <= 4 * ulp, (np.abs(got - ref).max(), ulp)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    # greedy generation of 32 tokens
    hf_gen = list(PROMPT[:4])
    for _ in range(32):
        hf_gen.append(int(_hf_logits(hf, hf_gen)[-1].argmax()))
    assert _gguf_greedy(llama_cpp, out, PROMPT[:4], 32) == hf_gen[4:]


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"])
def test_quantized_error_no_worse_than_llama_cpp_pipeline(tiny, tmp_path, llama_cpp, qtype):
    base, adapter, merged = tiny
    state = _merged_state(base, adapter)
    ref = _hf_logits(_hf_model(base, state), PROMPT)  # the merged model in fp32
    ours = export_gguf(adapter, base, tmp_path / "ours.gguf", type=qtype, progress=False)
    f16 = gguf_oracle.convert_hf_to_gguf(merged, tmp_path / "pipe-f16.gguf", "f16", tokenizer_pre="gpt-2")
    theirs = tmp_path / "pipe.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[qtype]
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    err_ours = np.abs(_gguf_logits(llama_cpp, ours, PROMPT) - ref).mean()
    err_theirs = np.abs(_gguf_logits(llama_cpp, theirs, PROMPT) - ref).mean()
    assert err_ours <= 1.1 * err_theirs, (err_ours, err_theirs)
    # same per-tensor types as llama-quantize chose
    g = gguf_oracle.gguf_reader_module()
    t_ours = {t.name: int(t.tensor_type) for t in g.GGUFReader(str(ours)).tensors}
    t_theirs = {t.name: int(t.tensor_type) for t in g.GGUFReader(str(theirs)).tensors}
    assert t_ours == t_theirs


def test_kl_quality_gate(tiny, tmp_path, llama_cpp):
    """export_gguf(check=True): mean per-token KL(adapter model || exported file) over the fixed
    prompts, <= 0.01 for q8_0; the same number as computed here; a failed gate deletes the file."""
    from qforge.gguf import check_export

    base, adapter, _ = tiny
    out = export_gguf(adapter, base, tmp_path / "q8.gguf", type="q8_0", progress=False, check=True)
    kl = check_export(out, adapter, base, "q8_0")
    assert 0 < kl <= 0.01
    hf = _hf_model(base, _merged_state(base, adapter))
    prompts = [PROMPT, PROMPT[::-1], [0] + list(range(40, 70))]
    own = np.mean([_mean_kl(_hf_logits(hf, p), _gguf_logits(llama_cpp, out, p)) for p in prompts])
    assert own <= 0.01, own
    q4 = export_gguf(adapter, base, tmp_path / "q4.gguf", type="q4_0", progress=False)
    kl4 = check_export(q4, adapter, base, "q4_0")
    assert kl4 > kl  # 4 bits lose more than 8
    with pytest.raises(ValueError, match="quality check failed"):
        check_export(q4, adapter, base, "q4_0", max_kl=kl4 / 2)
    assert not q4.exists()
