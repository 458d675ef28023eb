"""Hostile input on the training side: registered ops called directly with
wrong shapes, dtypes, devices and layouts; checkpoints with unused tensors,
damaged files, NaN optimizer state and step numbers past 10^6; malformed
quant states, configs, indexes and data files. Each must give a clear error
naming what is wrong (and the file), never a crash, a wrong result or lost
checkpoints."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import qforge.loss  # noqa: F401  (registers qforge::linear_cross_entropy*)
import qforge.nf4 as nf4
from qforge.ops import nf4 as nf4_ops  # registers the NF4 ops

LCE = torch.ops.qforge.linear_cross_entropy
LCE_BWD = torch.ops.qforge.linear_cross_entropy_backward


def lce_args(hidden, weight, labels, bias=None, class_weight=None, reduction=1, grads=False):
    """The op's full argument list: (..., ignore_index, label_smoothing, softcap, logit_scale,
    z_loss, reduction, chunk_size, validate, want_lse, grad_hidden, grad_weight, grad_bias,
    fp32_grad_weight)."""
    return (hidden, weight, labels, bias, class_weight, -100, 0.0, 0.0, 1.0, 0.0, reduction, 0, True, False,
            grads, grads, False, False)


def small(seed=0, n=6, d=8, v=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(v, d, generator=g), torch.randint(0, v, (n,), generator=g)


# ------------------------------------------------------------------ linear_cross_entropy op, called directly
@pytest.mark.parametrize("case, message", [
    ("short_labels", r"labels must be \[N\] = \[6\], got \[2\]"),
    ("narrow_weight", r"hidden \[6, 8\] and weight \[16, 4\] disagree on D"),
    ("hidden_3d", r"hidden must be 2-D \[N, D\]"),
    ("weight_1d", r"weight must be 2-D \[V, D\], got \[16\]"),
    ("int32_labels", r"labels must be int64, got int32"),
    ("float_labels", r"labels must be int64, got float32"),
    ("dtype_mismatch", r"weight \(hidden's dtype\) must be float32, got bfloat16"),
    ("int_hidden", r"hidden must be float32, float16 or bfloat16, got int64"),
    ("bias_shape", r"bias must be \[V\] = \[16\], got \[15\]"),
    ("class_weight_dtype", r"class_weight must be float32, got float64"),
    ("label_range", r"labels\[3\] = 16 is out of range \[0, 16\)"),
    ("ignore_index_only", r"labels\[0\] = -1 is out of range"),
    ("reduction", r"reduction must be 0 \(none\), 1 \(mean\) or 2 \(sum\), got 3"),
    ("meta_device", r"all tensors must be on one device: hidden on cpu, weight on cpu, labels on meta"),
])
def test_lce_op_rejects_bad_tensors_by_name(case, message):
    h, w, y = small()
    kw = {}
    if case == "short_labels":
        y = y[:2]
    elif case == "narrow_weight":
        w = w[:, :4].contiguous()
    elif case == "hidden_3d":
        h = h.reshape(2, 3, 8)
    elif case == "weight_1d":
        w = w[:, 0].contiguous()
    elif case == "int32_labels":
        y = y.int()
    elif case == "float_labels":
        y = y.float()
    elif case == "dtype_mismatch":
        w = w.bfloat16()
    elif case == "int_hidden":
        h, w = h.long(), w.long()
    elif case == "bias_shape":
        kw["bias"] = torch.zeros(15)
    elif case == "class_weight_dtype":
        kw["class_weight"] = torch.ones(16, dtype=torch.float64)
    elif case == "label_range":
        y = y.clone()
        y[3] = 16
    elif case == "ignore_index_only":
        y = torch.full_like(y, -1)
    elif case == "reduction":
        kw["reduction"] = 3
    elif case == "meta_device":
        y = y.to("meta")
    with pytest.raises(ValueError, match=message):
        LCE(*lce_args(h, w, y, **kw))


@pytest.mark.parametrize("which", ["hidden", "weight", "labels"])
def test_lce_op_rejects_non_contiguous_views(which):
    """A transposed or strided view used to be read as if contiguous: a wrong loss, silently."""
    h, w, y = small()
    views = dict(hidden=h, weight=w, labels=y)
    views[which] = {"hidden": h.t().contiguous().t(), "weight": w.t().contiguous().t(),
                    "labels": torch.stack([y, y], 1)[:, 0]}[which]
    assert not views[which].is_contiguous() and torch.equal(views[which], dict(hidden=h, weight=w, labels=y)[which])
    with pytest.raises(ValueError, match=f"{which} must be contiguous"):
        LCE(*lce_args(views["hidden"], views["weight"], views["labels"]))
    # the contiguous tensors give exactly what torch computes
    loss = LCE(*lce_args(h, w, y))[0]
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(h @ w.t(), y), rtol=1e-5, atol=1e-5)


def test_lce_backward_op_rejects_a_wrong_upstream_gradient():
    h, w, y = small()
    bwd = lambda g: LCE_BWD(h, w, y, None, None, g, -100, 0.0, 0.0, 1.0, 0.0, 0, 0, True, True, False, False)
    gh, gw, _ = bwd(torch.ones(6))
    assert gh.shape == (6, 8) and gw.shape == (16, 8)
    with pytest.raises(ValueError, match=r"grad_scale must be \[N\] = \[6\], got \[5\]"):
        bwd(torch.ones(5))
    with pytest.raises(ValueError, match=r"labels must be \[N\] = \[6\], got \[4\]"):
        LCE_BWD(h, w, y[:4], None, None, torch.ones(6), -100, 0.0, 0.0, 1.0, 0.0, 0, 0, True, True, False, False)


def run_isolated(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (a crash there cannot take the test run down)."""
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_lce_op_with_wrong_shapes_does_not_crash_the_process():
    """These read far out of bounds before (SIGSEGV): 1M tokens' hidden with 3 labels, a
    weight [V, 2] for D = 4096, a grad_hidden too small for the tokens."""
    r = run_isolated("""
        import torch, qforge.loss
        op = torch.ops.qforge.linear_cross_entropy
        def call(h, w, y, grads=False):
            try:
                op(h, w, y, None, None, -100, 0.0, 0.0, 1.0, 0.0, 1, 0, True, False, grads, grads, False, False)
            except ValueError as e:
                print("ValueError:", e)
        call(torch.randn(1 << 20, 4), torch.randn(8, 4), torch.zeros(3, dtype=torch.long))
        call(torch.randn(64, 4096), torch.randn(1 << 16, 2), torch.zeros(64, dtype=torch.long))
        call(torch.randn(64, 4096).t(), torch.randn(8, 64), torch.zeros(4096, dtype=torch.long))
        print("survived")
    """)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    lines = r.stdout.splitlines()
    assert lines[-1] == "survived"
    assert "labels must be [N] = [1048576], got [3]" in lines[0]
    assert "disagree on D" in lines[1]
    assert "hidden must be contiguous" in lines[2]


# ------------------------------------------------------------------ NF4 ops, called directly
@pytest.fixture(scope="module")
def quantized():
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    packed, state = nf4.quantize(w, blocksize=64, compress_statistics=False)
    return packed, state


@pytest.mark.parametrize("case, message", [
    ("shape_too_big", r"packed weight has 2048 bytes but 16384 elements need 8192"),
    ("negative_shape", r"shape \[-1, 64\] has a negative size"),
    ("blocksize_0", r"blocksize must be a power of two from 32 to 4096, got 0"),
    ("blocksize_wraps", r"blocksize 4294967360 does not fit in 32 bits"),
    ("int_dtype", r"output dtype must be one of float32, float16, bfloat16, got int32"),
    ("absmax_short", r"absmax has 63 entries"),
    ("absmax_strided", r"absmax must be contiguous"),
    ("packed_int32", r"packed NF4 weight must be uint8"),
    ("code_short", r"quant_map must be 16 float32 values"),
    ("meta_device", r"all tensors must be on one device: packed on cpu, absmax on meta"),
])
def test_dequantize_nf4_op_rejects_bad_arguments(quantized, case, message):
    packed, st = quantized
    absmax, code, blocksize, shape, dtype = st.absmax, st.code, 64, [64, 64], torch.float32
    if case == "shape_too_big":
        shape = [128, 128]
    elif case == "negative_shape":
        shape = [-1, 64]
    elif case == "blocksize_0":
        blocksize = 0
    elif case == "blocksize_wraps":
        blocksize = 2**32 + 64  # ctypes would have wrapped it to 64
    elif case == "int_dtype":
        dtype = torch.int32
    elif case == "absmax_short":
        absmax = absmax[:63]
    elif case == "absmax_strided":
        absmax = torch.stack([absmax, absmax], 1)[:, 0]
    elif case == "packed_int32":
        packed = packed.view(-1)[:2048].view(torch.int32).repeat(4)[:2048]
    elif case == "code_short":
        code = code[:8]
    elif case == "meta_device":
        absmax = absmax.to("meta")
    with pytest.raises(ValueError, match=message):
        torch.ops.qforge.dequantize_nf4(packed, absmax, code, blocksize, shape, dtype)


def test_dequantize_nf4_into_rejects_bad_outputs(quantized):
    packed, st = quantized
    ok = torch.empty(64, 64)
    torch.ops.qforge.dequantize_nf4_into(packed, st.absmax, st.code, 64, None, None, None, 256, ok)
    torch.testing.assert_close(ok, nf4.dequantize(packed, st), rtol=0, atol=0)
    for out, message in ((torch.empty(64, 64).t(), "out must be contiguous"),
                         (torch.empty(64, 63), "packed weight has 2048 bytes but 4032 elements need 2016"),
                         (torch.empty(64, 64, dtype=torch.int64), "got int64")):
        with pytest.raises(ValueError, match=message):
            torch.ops.qforge.dequantize_nf4_into(packed, st.absmax, st.code, 64, None, None, None, 256, out)
    with pytest.raises(ValueError, match="uint8 .double-quantized. absmax needs nested_absmax"):
        torch.ops.qforge.dequantize_nf4_into(packed, st.absmax.to(torch.uint8), st.code, 64, None, None, None, 256, ok)


@pytest.mark.parametrize("blocksize, message", [(0, "must be a positive power of two, got 0"),
                                                (-64, "must be a positive power of two, got -64"),
                                                (48, "power of two from 32 to 4096, got 48"),
                                                (2**31, "does not fit in 32 bits")])
def test_quantize_ops_reject_bad_blocksizes(blocksize, message):
    x = torch.randn(256)
    with pytest.raises(ValueError, match=message):
        torch.ops.qforge.quantize_nf4(x, blocksize)
    if blocksize != 48:  # the 8-bit quantizer allows any power of two
        with pytest.raises(ValueError, match=message):
            torch.ops.qforge.quantize_blockwise_8bit(x, nf4_ops.dynamic_map(), blocksize)


def test_quantize_ops_reject_bad_tensors():
    x = torch.randn(64, 64)
    with pytest.raises(ValueError, match="weight to quantize must be contiguous"):
        torch.ops.qforge.quantize_nf4(x.t(), 64)
    with pytest.raises(ValueError, match="weight to quantize must be one of float32, float16, bfloat16, got int64"):
        torch.ops.qforge.quantize_nf4(x.long(), 64)
    packed, absmax = torch.ops.qforge.quantize_nf4(x.to("meta"), 64)  # all meta: shapes only, as torch does
    assert packed.is_meta and packed.shape == (2048, 1) and absmax.shape == (64,)
    code = nf4_ops.dynamic_map()
    with pytest.raises(ValueError, match="code must have 256 entries, got 16"):
        torch.ops.qforge.quantize_blockwise_8bit(x, code[:16], 64)
    with pytest.raises(ValueError, match="offset must be one value, got 2"):
        torch.ops.qforge.quantize_blockwise_8bit(x, code, 64, torch.zeros(2))
    with pytest.raises(ValueError, match="x must be contiguous"):
        torch.ops.qforge.quantize_blockwise_8bit(x.t(), code, 64)
    with pytest.raises(ValueError, match="x must be float32, got torch.float16"):
        torch.ops.qforge.quantize_blockwise_8bit(x.half(), code, 64)
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        torch.ops.qforge.quantize_blockwise_8bit(x, code.to("meta"), 64)


def test_fake_kernels_reject_bad_blocksizes_and_shapes():
    """torch.compile runs the fake kernels first: they must not die of ZeroDivisionError."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(256)
        packed, absmax = torch.ops.qforge.quantize_nf4(x, 64)
        assert packed.shape == (128, 1) and absmax.shape == (4,)
        with pytest.raises(ValueError, match="blocksize must be a positive power of two, got 0"):
            torch.ops.qforge.quantize_nf4(x, 0)
        with pytest.raises(ValueError, match="blocksize must be a positive power of two, got 0"):
            torch.ops.qforge.quantize_blockwise_8bit(x, torch.empty(256), 0)
        with pytest.raises(ValueError, match="negative size"):
            torch.ops.qforge.dequantize_nf4(packed, absmax, torch.empty(16), 64, [-4, 64], torch.float32)


# ------------------------------------------------------------------ qforge.load: checkpoints that disagree
transformers = pytest.importorskip("transformers")

import json  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import qforge  # noqa: E402
from qforge import cli, train as T  # noqa: E402
from qforge.checkpoints import CheckpointDamaged, checkpoint_step, checkpoints, latest_checkpoint  # noqa: E402
from qforge.data import builtin_dataset, read_jsonl  # noqa: E402
from qforge.nn import lora_parameters  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64)


def save_llama(path: Path, layers: int) -> Path:
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, num_hidden_layers=layers)).save_pretrained(str(path))
    return path


def test_load_rejects_tensors_the_config_does_not_use(tmp_path):
    """config.json says 1 layer, the files hold 2: loading dropped layer 1 without a word."""
    path = save_llama(tmp_path / "m", layers=2)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"m: 9 tensors in model\.safetensors are not used by the model that "
                                         r"config\.json describes \(llama, num_hidden_layers=1\): model\.layers\.1\."):
        qforge.load(path, device="cpu", dtype=torch.float32)


def test_load_warns_about_rotary_caches_transformers_also_ignores(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_llama(tmp_path / "m", layers=1)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # what old checkpoints carry
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"ignoring 1 checkpoint tensors the model does not use "
                                         r"\(model\.layers\.0\.self_attn\.rotary_emb\.inv_freq\)"):
        model = qforge.load(path, device="cpu", dtype=torch.float32)
    assert len(model.model.layers) == 1


@pytest.mark.parametrize("doc, message", [
    ("[1, 2]", r"config\.json: expected a JSON object, got list"),
    ('"llama"', r"config\.json: expected a JSON object, got str"),
    ('{"model_type": "llama", "quantization_config": [4]}', r"config\.json: quantization_config must be a JSON object"),
    ('{"model_type": "qwen9", "architectures": "Qwen9"}', r"config\.json: unsupported architecture model_type='qwen9'"),
])
def test_config_json_of_the_wrong_type_is_named(tmp_path, doc, message):
    path = save_llama(tmp_path / "m", layers=1)
    (path / "config.json").write_text(doc)
    with pytest.raises(ValueError, match=message):
        qforge.load(path, device="cpu")


@pytest.mark.parametrize("index, message", [
    ({"weight_map": ["model.safetensors"]}, r"weight_map' must be a non-empty JSON object .* got list"),
    ({"weight_map": "model.safetensors"}, r"got str"),
    ([1], r"got NoneType"),
    ({"weight_map": {"a": 7}}, r"weight_map value 7 is not a \.safetensors file name"),
    ({"weight_map": {"a": "../../etc/passwd.safetensors"}}, r"weight_map value '\.\./\.\./etc/passwd\.safetensors'"),
])
def test_weight_map_of_the_wrong_type_is_named(tmp_path, index, message):
    path = save_llama(tmp_path / "m", layers=1)
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: .*" + message):
        qforge.load(path, device="cpu")


# ------------------------------------------------------------------ quant states of bnb-4bit files
def quant_state_with(field, value):
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    packed, state = nf4.quantize(w, blocksize=64, compress_statistics=True)
    tensors = nf4.state_dict_entries("layer.", packed, state)
    key = "layer.weight." + nf4.QUANT_STATE_KEY
    doc = json.loads(bytes(tensors[key].tolist()).decode())
    if field == "whole":
        doc = value
    else:
        doc[field] = value
    tensors[key] = torch.tensor(list(json.dumps(doc).encode()), dtype=torch.uint8)
    return tensors


@pytest.mark.parametrize("field, value, message", [
    ("blocksize", 0, r"'blocksize' must be a positive integer, got 0"),
    ("blocksize", "sixty-four", r"'blocksize' must be a positive integer, got 'sixty-four'"),
    ("blocksize", None, r"'blocksize' must be a positive integer, got None"),
    ("nested_blocksize", 0, r"'nested_blocksize' must be a positive integer, got 0"),
    ("shape", [-64, -64], r"'shape' must be a list of non-negative integers, got \[-64, -64\]"),
    ("shape", "64x64", r"'shape' must be a list of non-negative integers"),
    ("nested_offset", "x", r"nested_offset must be a finite number, got 'x'"),
    ("whole", [1, 2, 3], r"quant_state\.bitsandbytes__nf4 must hold a JSON object, got list"),
    ("whole", "nf4", r"quant_state\.bitsandbytes__nf4 must hold a JSON object, got str"),
])
def test_malformed_quant_state_is_named(field, value, message):
    tensors = quant_state_with(field, value)
    with pytest.raises(ValueError, match=r"^model-x\.safetensors: 'layer\.weight': " + message):
        nf4.from_state_dict(tensors, "layer.", where="model-x.safetensors")


def test_malformed_quant_state_in_a_checkpoint_names_the_file(tmp_path):
    model = qforge.load(save_llama(tmp_path / "m", layers=1), device="cpu", dtype=torch.float32)
    qforge.save_4bit(model, tmp_path / "q")
    from safetensors.torch import load_file, save_file

    f = tmp_path / "q" / "model.safetensors"
    tensors = load_file(str(f))
    key = "model.layers.0.mlp.down_proj.weight." + nf4.QUANT_STATE_KEY
    doc = json.loads(bytes(tensors[key].tolist()).decode())
    doc["blocksize"] = 0
    tensors[key] = torch.tensor(list(json.dumps(doc).encode()), dtype=torch.uint8)
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"q/model\.safetensors: 'model\.layers\.0\.mlp\.down_proj\.weight': "
                                         r"'blocksize' must be a positive integer, got 0"):
        qforge.load(tmp_path / "q", device="cpu", dtype=torch.float32)


# ------------------------------------------------------------------ data files
GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


def test_non_utf8_data_line_is_named(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_bytes((GOOD + "\n" + GOOD + "\n").encode() + b'{"messages": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl:3: not valid UTF-8 \(byte 0xe9 at byte offset 17"):
        read_jsonl(f)


def test_deeply_nested_data_line_is_named(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text(GOOD + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError, match=r"data\.jsonl:2: JSON nested too deeply"):
        read_jsonl(f)


def test_data_path_that_is_a_directory_is_named(tmp_path):
    with pytest.raises(ValueError, match="not a file"):
        read_jsonl(tmp_path)


# ------------------------------------------------------------------ checkpoints: order, damage, NaN
SMALL_RUN = dict(max_seq_length=1024, tokens_per_batch=512, lr=4e-3, warmup_steps=2, lora_r=4, lora_alpha=8.0,
                 progress=False, gradient_checkpointing=False)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("default")
    return T._prepare_default_model(out, builtin_dataset(seed=0), seed=0)


def test_checkpoints_are_ordered_by_step_number_past_a_million(tmp_path, base_dir, monkeypatch):
    """As text, step-1000000 sorts before step-999998: pruning deleted the newest
    checkpoint each time it was written, and --resume picked an old one."""
    root = tmp_path / "run" / "checkpoints"
    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        (root / f"step-{step:06d}").mkdir(parents=True)
        (root / f"step-{step:06d}" / "state.json").write_text(json.dumps({"step": step}))
    (root / ".step-1000002.tmp").mkdir()  # an interrupted save
    (root / "superseded-step-2000000").mkdir()
    assert [checkpoint_step(p) for p in checkpoints(tmp_path / "run")] == [999_998, 999_999, 1_000_000, 1_000_001]
    assert latest_checkpoint(tmp_path / "run").name == "step-1000001"
    as_text = sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))
    assert as_text[-1] == "step-999999"  # what sorting the names as text took for the newest

    # pruning keeps the newest by step: a real save at step 1,000,002 with keep_checkpoints=2
    model = qforge.load(base_dir, dtype=torch.float32, device="cpu")
    qforge.add_lora(model, r=2, lora_alpha=4.0)
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params)
    args = T.TrainArgs(keep_checkpoints=2)
    from qforge.peft_io import save_adapter

    final = T._save_checkpoint(tmp_path / "run", 1_000_002, model, opt, args, save_adapter)
    assert final.name == "step-1000002"
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["step-1000001", "step-1000002"]
    assert latest_checkpoint(tmp_path / "run") == final


def train_kw(base_dir, **kw):
    return {**dict(model=str(base_dir), max_steps=6, save_every=2, keep_checkpoints=3, **SMALL_RUN), **kw}


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, base_dir):
    """A run checkpointed at steps 2 and 4 and stopped there (copied by each test)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    s = T.train(output=str(out), stop_after=4, **train_kw(base_dir))
    assert s["stopped_early"] and [p.name for p in checkpoints(out)] == ["step-000002", "step-000004"]
    return out


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def snapshot(out: Path) -> dict:
    return {p.relative_to(out): p.read_bytes() for p in sorted((out / "checkpoints").rglob("*")) if p.is_file()}


def damage(path: Path, how: str) -> None:
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbage":
        path.write_bytes(b"\x00garbage" * 10)
    elif how == "flip":  # one byte inside the archive's data: caught by the CRC check
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, how, problem", [
    ("optimizer.pt", "truncate", r"optimizer\.pt: not a readable torch file"),
    ("optimizer.pt", "flip", r"optimizer\.pt: (corrupt|not a readable torch file)"),
    ("rng.pt", "garbage", r"rng\.pt: not a readable torch file"),
    ("state.json", "truncate", r"state\.json: not valid JSON"),
    ("state.json", "list", r"state\.json: expected a JSON object, got list"),
    ("adapter_model.safetensors", "truncate", r"adapter_model\.safetensors: not a readable safetensors file"),
    ("adapter_config.json", "garbage", r"adapter: .*adapter_config\.json: not valid JSON"),
    ("rng.pt", "tensor", r"rng\.pt: holds Tensor torch\.float32, not a torch RNG state"),
    ("optimizer.pt", "other_shape", r"optimizer\.pt: does not fit this run's LoRA parameters"),
])
def test_resume_from_a_damaged_file_names_it_and_the_previous_checkpoint(tmp_path, base_dir, stopped_run,
                                                                        name, how, problem):
    out = copy_run(stopped_run, tmp_path / "run")
    target = out / "checkpoints" / "step-000004" / name
    if how == "list":
        target.write_text("[4]")
    elif how == "tensor":
        torch.save(torch.zeros(5), target)
    elif how == "other_shape":
        torch.save({"state": {}, "param_groups": [{"params": [0, 1]}]}, target)
    else:
        damage(target, how)
    before = snapshot(out)
    with pytest.raises(CheckpointDamaged) as e:
        T.train(output=str(out), resume=True, **train_kw(base_dir))
    msg = str(e.value)
    assert msg.startswith("checkpoint step-000004 is damaged ("), msg
    assert __import__("re").search(problem, msg), msg
    previous = out / "checkpoints" / "step-000002"
    assert f"the previous complete one is step-000002: resume from it with the same arguments and " \
           f"--resume-from {previous}" in msg
    assert snapshot(out) == before  # nothing written, nothing pruned

    # ... and the command it names continues the run from step 2 to the end
    s = T.train(output=str(out), resume_from=str(previous), **train_kw(base_dir))
    assert s["steps"] == 6 and len(s["losses"]) == 4 and all(map(math.isfinite, s["losses"]))
    assert [p.name for p in checkpoints(out)] == ["step-000002", "step-000004", "step-000006"]
    assert (out / "checkpoints" / "superseded-step-000004" / name).exists()  # set aside, not deleted


def test_damaged_only_checkpoint_says_there_is_no_earlier_one(tmp_path, base_dir, stopped_run):
    out = copy_run(stopped_run, tmp_path / "run")
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-000002")
    damage(out / "checkpoints" / "step-000004" / "optimizer.pt", "truncate")
    with pytest.raises(CheckpointDamaged, match="there is no earlier complete checkpoint"):
        T.train(output=str(out), resume=True, **train_kw(base_dir))


def test_cli_reports_a_damaged_checkpoint(tmp_path, base_dir, stopped_run, capsys):
    out = copy_run(stopped_run, tmp_path / "run")
    (out / "checkpoints" / "step-000004" / "state.json").write_text("{")
    rc = cli.main(["train", "--model", str(base_dir), "--output", str(out), "--resume", "--max-steps", "6",
                   "--save-every", "2", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "checkpoint step-000004 is damaged (state.json: not valid JSON" in err and "step-000002" in err


def poison_optimizer_state(path: Path) -> None:
    state = torch.load(path / "optimizer.pt", weights_only=True)
    first = next(iter(state["state"].values()))
    first["exp_avg_sq"].view(-1)[0] = float("nan")
    torch.save(state, path / "optimizer.pt")


def test_resume_with_nan_optimizer_state_stops_before_saving(tmp_path, base_dir, stopped_run):
    """It trained to NaN and rotated the good checkpoints out."""
    out = copy_run(stopped_run, tmp_path / "run")
    poison_optimizer_state(out / "checkpoints" / "step-000004")
    before = snapshot(out)
    with pytest.raises(CheckpointDamaged, match=r"checkpoint step-000004 is damaged \(optimizer\.pt: holds "
                                                r"non-finite values \(exp_avg_sq of parameter 0\).*previous "
                                                r"complete one is step-000002"):
        T.train(output=str(out), resume=True, **train_kw(base_dir, keep_checkpoints=1))
    assert snapshot(out) == before


class Poison:
    """Makes the loss (a forward hook on the first decoder layer) or one LoRA
    gradient (a tensor hook) NaN on the given training steps."""

    def __init__(self, monkeypatch, what: str, steps: set[int]):
        import qforge.hf as hf

        self.what, self.steps, self.calls = what, steps, 0
        real = hf.patch_causal_lm

        def patch(model, *a, **k):
            real(model, *a, **k)
            if what == "loss":
                model.model.layers[0].register_forward_hook(self.forward_hook)
            else:
                lora_parameters(model)[0].register_hook(self.grad_hook)

        monkeypatch.setattr(hf, "patch_causal_lm", patch)

    def _hit(self) -> bool:
        self.calls += 1  # one forward (and one backward) per step: grad_accum 1, no recompute
        return self.calls in self.steps

    def forward_hook(self, module, inputs, output):
        if self._hit():
            if isinstance(output, tuple):
                return (output[0] * float("nan"),) + tuple(output[1:])
            return output * float("nan")
        return None

    def grad_hook(self, grad):
        return grad * float("nan") if self._hit() else grad


@pytest.mark.parametrize("what, reason", [("loss", "the loss is nan"), ("grad", "the gradient norm is nan")])
def test_nonfinite_step_stops_the_run_before_saving(tmp_path, base_dir, monkeypatch, what, reason):
    Poison(monkeypatch, what, {3})
    out = tmp_path / "run"
    with pytest.raises(T.NonFiniteTraining, match=f"step 3: {reason}; stopped before updating the adapter or "
                                                  f"saving anything; the last checkpoint is .*step-000002"):
        T.train(output=str(out), **train_kw(base_dir))
    assert [p.name for p in checkpoints(out)] == ["step-000002"]
    assert not (out / "adapter").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_nonfinite_steps_are_skipped_with_on_nonfinite_skip(tmp_path, base_dir, monkeypatch):
    clean = T.train(output=str(tmp_path / "clean"), **train_kw(base_dir, max_steps=2, save_every=0))
    Poison(monkeypatch, "grad", {3, 5})
    out = tmp_path / "run"
    s = T.train(output=str(out), on_nonfinite="skip", **train_kw(base_dir))
    assert s["steps"] == 6 and len(s["losses"]) == 4 and all(map(math.isfinite, s["losses"]))
    assert s["losses"][:2] == clean["losses"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in rows] == [None, None, "the gradient norm is nan", None,
                                                 "the gradient norm is nan", None]
    from safetensors.torch import load_file

    for ckpt in checkpoints(out):
        for k, v in load_file(str(ckpt / "adapter_model.safetensors")).items():
            assert torch.isfinite(v).all(), (ckpt.name, k)


def test_skipping_stops_after_too_many_nonfinite_steps_in_a_row(tmp_path, base_dir, monkeypatch):
    Poison(monkeypatch, "loss", set(range(1, 100)))
    with pytest.raises(T.NonFiniteTraining, match=r"step 11: the loss is nan, the 11th non-finite step in a row "
                                                  r"\(more than 10\); stopped before updating or saving anything; "
                                                  r"no checkpoint was written yet"):
        T.train(output=str(tmp_path / "run"), on_nonfinite="skip", **train_kw(base_dir, max_steps=20, save_every=0))


def test_no_progress_is_honoured(tmp_path, base_dir, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text((GOOD + "\n") * 4)
    argv = ["train", "--model", str(base_dir), "--data", str(data), "--max-steps", "2", "--lora-r", "2",
            "--no-gradient-checkpointing"]
    assert cli.main(argv + ["--output", str(tmp_path / "a"), "--no-progress"]) == 0
    assert "qforge train: 100%" not in capsys.readouterr().err  # it was shown anyway
    assert cli.main(argv + ["--output", str(tmp_path / "b")]) == 0
    assert "qforge train: 100%" in capsys.readouterr().err  # the bar, when not turned off


@pytest.mark.parametrize("cfg, message", [
    ([1, 2], r"adapter_config\.json: expected a JSON object, got list"),
    ({"peft_type": "LORA", "r": "8", "lora_alpha": 16, "target_modules": ["q_proj"]}, r"r must be a positive integer, got '8'"),
    ({"peft_type": "LORA", "r": 8, "lora_alpha": None, "target_modules": ["q_proj"]}, r"lora_alpha must be a number, got None"),
    ({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": {"q_proj": 1}}, r"target_modules must be a non-empty list"),
])
def test_adapter_config_of_the_wrong_type_is_named(tmp_path, base_dir, cfg, message):
    from safetensors.torch import save_file

    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    model = qforge.load(base_dir, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match=message):
        qforge.load_adapter(model, tmp_path)


@pytest.mark.cuda
def test_lce_op_on_cuda_checks_devices_and_layout():
    h, w, y = (t.cuda() for t in small())
    loss = LCE(*lce_args(h, w, y))[0]
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(h @ w.t(), y), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="labels is on cpu but hidden is on cuda:0"):
        LCE(*lce_args(h, w, y.cpu()))
    with pytest.raises(ValueError, match="hidden must be contiguous"):
        LCE(*lce_args(h.t().contiguous().t(), w, y))
    with pytest.raises(ValueError, match=r"labels must be \[N\] = \[6\], got \[2\]"):
        LCE(*lce_args(h, w, y[:2]))


def test_resume_and_pruning_past_step_a_million(tmp_path, base_dir, stopped_run):
    """A real run whose checkpoints are steps 999,999 and 1,000,000: --resume takes
    1,000,000 (text order said 999,999) and pruning keeps the two newest by number."""
    import shutil

    out = copy_run(stopped_run, tmp_path / "run")
    root = out / "checkpoints"
    for old, new in (("step-000002", 999_999), ("step-000004", 1_000_000)):
        shutil.move(root / old, root / f"step-{new:06d}")
        state = json.loads((root / f"step-{new:06d}" / "state.json").read_text())
        state["step"] = new
        (root / f"step-{new:06d}" / "state.json").write_text(json.dumps(state))
    s = T.train(output=str(out), resume=True, **train_kw(base_dir, max_steps=1_000_002, save_every=1,
                                                          keep_checkpoints=2))
    assert s["steps"] == 1_000_002 and len(s["losses"]) == 2
    assert [p.name for p in checkpoints(out)] == ["step-1000001", "step-1000002"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-2:] == [1_000_001, 1_000_002]
