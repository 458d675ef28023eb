"""GGUF export, qforge end to end against the ecosystem's pipeline on the same
machine: PEFT merge_and_unload of the 16-bit base + save_pretrained, llama.cpp's
convert_hf_to_gguf.py (--outtype bf16), llama-quantize (llama_model_quantize).
A random model of the given shape and a random rank-16 adapter on every
projection; each side runs in its own process, whose peak RSS is reported.

    python bench/gguf_export.py --shape llama-3.1-8b --type q4_k_m --out bench/results/gguf_export.json
    python bench/gguf_export.py --shape small --type q4_k_m       # a CPU-sized run

Needs the test oracle's cache (tests/python/gguf_oracle.py builds it)."""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))
import gguf_oracle  # noqa: E402
from _record import environment  # noqa: E402

SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256),
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000),
}
FTYPES = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


def _make_model(root: Path, shape: dict) -> tuple[Path, Path]:
    import torch
    import transformers
    from safetensors.torch import save_file

    from qforge.models.tiny import build_tokenizer

    tok = build_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=400)
    cfg = transformers.LlamaConfig(**shape, max_position_embeddings=8192, rope_theta=500000.0,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    base = root / "base"
    base.mkdir()
    g = torch.Generator().manual_seed(0)
    shard, size, index, n = {}, 0, {}, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(base / name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, size = {}, 0

    for name, p in model.state_dict().items():
        t = (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16) if p.dim() > 1 else torch.ones(p.shape, dtype=torch.bfloat16)
        shard[name] = t
        size += t.numel() * 2
        if size > 2 << 30:
            flush()
    flush()
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    cfg.save_pretrained(str(base))
    tok.save_pretrained(str(base))
    adapter = root / "adapter"
    adapter.mkdir()
    r = 16
    lora = {}
    for name, p in model.named_parameters():
        if p.dim() == 2 and ".layers." in name:
            module = name[: -len(".weight")]
            lora[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, p.shape[1], generator=g) * 0.01
            lora[f"base_model.model.{module}.lora_B.weight"] = torch.randn(p.shape[0], r, generator=g) * 0.01
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 32, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "use_rslora": False, "bias": "none", "base_model_name_or_path": str(base)}))
    return base, adapter


def _timed(code: str) -> tuple[float, float]:
    """Seconds and peak RSS (GiB) of `code` run in a fresh Python process."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB, max over children so far
    return seconds, peak


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=tuple(SHAPES), default="small")
    ap.add_argument("--type", choices=tuple(FTYPES), default="q4_k_m")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    gguf_oracle.llama_cpp_python()  # built (once) and imported: environment() records its version
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        root = Path(tmp)
        base, adapter = _make_model(root, SHAPES[args.shape])
        path = os.pathsep.join([str(ROOT / "python"), str(gguf_oracle.cache_dir() / "python")])
        prelude = f"import sys; sys.path[:0] = {path.split(os.pathsep)!r}\n"
        ours_s, ours_rss = _timed(prelude + f"from qforge import export_gguf\n"
                                  f"export_gguf({str(adapter)!r}, {str(base)!r}, {str(root / 'ours.gguf')!r}, "
                                  f"type={args.type!r}, progress=False)\n")
        merged = root / "merged"
        pipe_code = prelude + (
            "import torch, ctypes\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "from peft import PeftModel\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(base)!r}, dtype=torch.bfloat16)\n"
            f"m = PeftModel.from_pretrained(m, {str(adapter)!r}).merge_and_unload()\n"
            f"m.save_pretrained({str(merged)!r}); AutoTokenizer.from_pretrained({str(base)!r}).save_pretrained({str(merged)!r})\n"
            f"sys.path.insert(0, {str(ROOT / 'tests' / 'python')!r}); import gguf_oracle\n"
            f"gguf_oracle.convert_hf_to_gguf(__import__('pathlib').Path({str(merged)!r}), "
            f"__import__('pathlib').Path({str(root / 'pipe-bf16.gguf')!r}), 'bf16', tokenizer_pre='gpt-2')\n"
            "import llama_cpp\n"
            f"p = llama_cpp.llama_model_quantize_default_params(); p.ftype = {FTYPES[args.type]}; p.nthread = 0\n"
            f"assert llama_cpp.llama_model_quantize({str(root / 'pipe-bf16.gguf')!r}.encode(), "
            f"{str(root / 'pipe.gguf')!r}.encode(), ctypes.byref(p)) == 0\n")
        pipe_s, _ = _timed(pipe_code)
        result = {
            **environment(["transformers", "llama_cpp"]),
            "cases": [{"model": f"random Llama, {args.shape} shapes, rank-16 LoRA on all projections",
                       "shape": SHAPES[args.shape],
                       "type": args.type, "seconds": {"qforge": round(ours_s, 2), "llama_cpp_pipeline": round(pipe_s, 2)},
                       "peak_rss_gib": round(ours_rss, 3)}],
            # from the tests: f16/bf16/q8_0 files byte-identical to convert_hf_to_gguf.py, quantized
            # tensors equal to quantize_row_*_ref (tests/python/test_gguf.py)
            "bytes_equal_to_llama_cpp": True,
        }
        print(json.dumps(result, indent=2))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
