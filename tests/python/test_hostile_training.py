"""Hostile input on the training side: registered ops called directly with
wrong shapes, dtypes, devices and layouts; checkpoints with unused tensors,
damaged files, NaN optimizer state and step numbers past 10^6; malformed
quant states, configs, indexes and data files. Each must give a clear error
naming what is wrong (and the file), never a crash, a wrong result or lost
checkpoints."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import qforge.loss  # noqa: F401  (registers qforge::linear_cross_entropy*)
import qforge.nf4 as nf4
from qforge import ops  # noqa: F401  (registers the NF4 ops)

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
    ("shape_too_big", r"packed weight has 2048 bytes but 16384 elements need 8192 \(shape \[128, 128\]\)"),
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
            torch.ops.qforge.quantize_blockwise_8bit(x, ops.dynamic_map(), blocksize)


def test_quantize_ops_reject_bad_tensors():
    x = torch.randn(64, 64)
    with pytest.raises(ValueError, match="weight to quantize must be contiguous"):
        torch.ops.qforge.quantize_nf4(x.t(), 64)
    with pytest.raises(ValueError, match="weight to quantize must be one of float32, float16, bfloat16, got int64"):
        torch.ops.qforge.quantize_nf4(x.long(), 64)
    packed, absmax = torch.ops.qforge.quantize_nf4(x.to("meta"), 64)  # all meta: shapes only, as torch does
    assert packed.is_meta and packed.shape == (2048, 1) and absmax.shape == (64,)
    code = ops.dynamic_map()
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
