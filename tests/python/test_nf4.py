"""NF4 against bitsandbytes itself: quantize and dequantize bit for bit, the
quant-state and safetensors layouts, the torch ops, and the errors."""
import math

import pytest
import torch

import qforge.nf4 as nf4
from qforge.ops import nf4 as nf4_ops  # registers torch.ops.qforge.*

bnb_F = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# odd element counts, partial last blocks, single elements, multi-nested-block sizes
SHAPES = [(1,), (7,), (63,), (64, 3), (129, 65), (300, 77), (256, 257), (1, 4097), (2, 70000)]


def bits(t):
    """Bit pattern view, so -0.0 != 0.0 and NaN payloads count."""
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def random_weight(shape, dtype, gen):
    return (torch.randn(shape, generator=gen) * torch.rand(1, generator=gen).item() * 3).to(dtype)


def bnb_dequantize(packed, state):
    """bitsandbytes' dequantize_4bit on the CPU. Its native CPU kernel (0.50.2) blocks
    each row separately, which is wrong when a row is not a whole number of blocks
    (a (2, 70000) weight comes back with error 2.06 instead of 0.53); there its own
    torch implementation of the format, which the CUDA kernel agrees with, is used."""
    if state.shape[-1] % state.blocksize == 0 or packed.is_cuda:
        return bnb_F.dequantize_4bit(packed, state)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.state2 is not None:
        absmax = bnb_F.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
    return _dequantize_4bit_compute(packed.reshape(-1), absmax, state.code, state.blocksize, state.shape, state.dtype)


def assert_same_state(ours, theirs):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype and ours.blocksize == theirs.blocksize
    assert torch.equal(bits(ours.absmax), bits(theirs.absmax))
    assert torch.equal(bits(ours.code), bits(theirs.code))
    assert (ours.state2 is None) == (theirs.state2 is None)
    if ours.state2 is not None:
        assert torch.equal(bits(ours.offset.reshape(1)), bits(theirs.offset.reshape(1)))
        assert torch.equal(bits(ours.state2.absmax), bits(theirs.state2.absmax))
        assert torch.equal(bits(ours.state2.code), bits(theirs.state2.code))


def assert_nested_codes_nearest(ours, theirs, x):
    """bitsandbytes' CPU backend rounds the 8-bit absmax codes with a binary search
    that is not round-to-nearest (its CUDA kernel, the format's reference, is).
    Where the two differ, qforge's code must be no farther (exact ties follow the CUDA
    kernel's rule, checked against it on the GPU)."""
    code = ours.state2.code
    finite = torch.isfinite(x)  # x is 0/0 = NaN where a nested block's values are all equal
    distance = (x[finite, None] - code[None, :]).abs()
    mine = distance.gather(1, ours.absmax[finite].long()[:, None]).squeeze(1)
    assert torch.all(mine <= distance.min(dim=1).values)
    differ = (ours.absmax != theirs.absmax).nonzero().flatten()
    for i in differ.tolist():
        mine, other = code[int(ours.absmax[i])], code[int(theirs.absmax[i])]
        assert abs(x[i] - mine) <= abs(x[i] - other), (i, x[i].item(), mine.item(), other.item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 32, 128, 256, 1024, 4096])
@pytest.mark.parametrize("compress", [True, False])
def test_quantize_and_dequantize_match_bitsandbytes(dtype, blocksize, compress, rng):
    for shape in SHAPES:
        w = random_weight(shape, dtype, rng)
        packed, state = nf4.quantize(w, blocksize=blocksize, compress_statistics=compress)
        ref_packed, ref_state = bnb_F.quantize_4bit(w, blocksize=blocksize, compress_statistics=compress, quant_type="nf4")
        assert torch.equal(packed, ref_packed.view(packed.shape)), (shape, "packed codes differ")
        if compress:
            _, absmax = torch.ops.qforge.quantize_nf4(w.contiguous(), blocksize)
            x = (absmax - state.offset) * (1 / state.state2.absmax.repeat_interleave(256)[: absmax.numel()])
            assert_nested_codes_nearest(state, ref_state, x)
            ref_state.absmax = state.absmax  # everything else must match to the bit
        assert_same_state(state, ref_state)
        out = nf4.dequantize(packed, state)
        assert out.dtype == dtype and out.shape == w.shape
        assert torch.equal(bits(out), bits(bnb_dequantize(ref_packed, ref_state))), (shape, "dequantized values differ")
        # and bitsandbytes' own state, dequantized by qforge
        _, bnb_state = bnb_F.quantize_4bit(w, blocksize=blocksize, compress_statistics=compress, quant_type="nf4")
        assert torch.equal(bits(nf4.dequantize(ref_packed, bnb_state)), bits(bnb_dequantize(ref_packed, bnb_state)))


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequantize_to_another_dtype_matches_bitsandbytes(out_dtype, rng):
    w = random_weight((97, 131), torch.float32, rng)
    ref_packed, ref_state = bnb_F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ref_state.dtype = out_dtype
    ours = nf4.dequantize(ref_packed, ref_state)  # a bitsandbytes QuantState, used as is
    assert torch.equal(bits(ours), bits(bnb_dequantize(ref_packed, ref_state)))


def test_all_zero_block_follows_bitsandbytes_cuda_rule(rng):
    # bitsandbytes' CUDA kernel (the format's reference) computes 0 * (1/0) = NaN
    # for an all-zero block, which its decision tree sends to level 0 (-1.0), and
    # stores absmax 0; its torch-only CPU fallback instead writes level 7 (0.0).
    # Both dequantize to zeros; qforge writes what the CUDA path (and so every
    # checkpoint made on a GPU) holds.
    w = random_weight((5, 64), torch.float16, rng)
    w[2] = 0
    packed, state = nf4.quantize(w, compress_statistics=False)
    assert torch.all(packed.view(5, 32)[2] == 0x00)
    assert state.absmax[2].item() == 0.0
    out = nf4.dequantize(packed, state)
    assert torch.all(out[2] == 0)
    ref_packed, ref_state = bnb_F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    other_rows = torch.tensor([0, 1, 3, 4])
    assert torch.equal(packed.view(5, 32)[other_rows], ref_packed.view(5, 32)[other_rows])
    assert torch.equal(out, bnb_F.dequantize_4bit(ref_packed, ref_state))  # -0.0 == 0.0 as values


def test_quant_state_dict_round_trips_through_bitsandbytes(rng):
    w = random_weight((130, 70), torch.bfloat16, rng)
    packed, state = nf4.quantize(w)
    bnb_state = bnb_F.QuantState.from_dict(state.as_dict(packed=True), device="cpu")
    assert torch.equal(bnb_dequantize(packed, bnb_state), nf4.dequantize(packed, state))
    back = nf4.QuantState.from_dict(bnb_state.as_dict(packed=True))
    assert_same_state(back, state)
    assert set(nf4.state_dict_entries("layer.", packed, state)) == {
        "layer.weight", "layer.weight.absmax", "layer.weight.quant_map", "layer.weight.nested_absmax",
        "layer.weight.nested_quant_map", "layer.weight.quant_state.bitsandbytes__nf4",
    }


def test_bitsandbytes_linear4bit_state_dict_loads_without_bitsandbytes(tmp_path, rng):
    bnb = pytest.importorskip("bitsandbytes")
    from safetensors.torch import save_file

    layer = bnb.nn.Linear4bit(96, 40, bias=True, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
    layer.load_state_dict({"weight": random_weight((40, 96), torch.bfloat16, rng), "bias": torch.zeros(40)})
    layer = layer.to("cpu")  # CPU quantizes through bitsandbytes' CPU backend
    if layer.weight.quant_state is None:
        layer.weight = bnb.nn.Params4bit(layer.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True)._quantize("cpu")
    sd = {f"model.proj.{k}": v for k, v in layer.state_dict().items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "bnb.safetensors"))
    weights, others = nf4.load_safetensors(tmp_path / "bnb.safetensors")
    packed, state = weights["model.proj."]
    assert list(others) == ["model.proj.bias"]
    ref = bnb_dequantize(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(bits(nf4.dequantize(packed, state)), bits(ref))


def test_safetensors_round_trip(tmp_path, rng):
    w = random_weight((33, 65), torch.float16, rng)
    packed, state = nf4.quantize(w, blocksize=128)
    path = tmp_path / "w.safetensors"
    nf4.save_safetensors(path, {"a.": (packed, state)}, others={"a.bias": torch.ones(3)})
    weights, others = nf4.load_safetensors(path)
    p2, s2 = weights["a."]
    assert torch.equal(p2, packed)
    assert_same_state(s2, state)
    assert torch.equal(others["a.bias"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # no temporary left


def test_truncated_and_inconsistent_checkpoints_are_named(tmp_path, rng):
    w = random_weight((64, 64), torch.float16, rng)
    packed, state = nf4.quantize(w)
    path = tmp_path / "w.safetensors"
    nf4.save_safetensors(path, {"x.": (packed, state)})
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors"):
        nf4.load_safetensors(tmp_path / "cut.safetensors")
    entries = nf4.state_dict_entries("x.", packed, state)
    entries["x.weight.absmax"] = entries["x.weight.absmax"][:-1]
    with pytest.raises(ValueError, match=r"x.weight': absmax has 63 entries but 4096 elements in blocks of 64 need 64"):
        nf4.from_state_dict(entries, "x.")
    entries = nf4.state_dict_entries("x.", packed, state)
    del entries["x.weight.nested_quant_map"]
    with pytest.raises(ValueError, match="nested_quant_map"):
        nf4.from_state_dict(entries, "x.")
    entries = nf4.state_dict_entries("x.", packed, state)
    entries["x.weight"] = entries["x.weight"][:100]
    with pytest.raises(ValueError, match="packed weight has 100 bytes but 4096 elements need 2048"):
        nf4.from_state_dict(entries, "x.")


def dq_args(packed, state):
    return (packed, state.absmax, state.code, state.blocksize, list(state.shape), state.dtype,
            state.state2.absmax, state.state2.code, state.offset.reshape(1), 256)


def test_bad_input_raises_clear_errors(rng):
    w = random_weight((64, 64), torch.float32, rng)
    with pytest.raises(ValueError, match="blocksize must be a power of two from 32 to 4096, got 48"):
        torch.ops.qforge.quantize_nf4(w, 48)
    with pytest.raises(ValueError, match="got 8192"):
        torch.ops.qforge.quantize_nf4(w, 8192)
    with pytest.raises(ValueError, match="must be one of float32, float16, bfloat16, got int32"):
        torch.ops.qforge.quantize_nf4(w.to(torch.int32), 64)
    with pytest.raises(ValueError, match="must be contiguous"):
        torch.ops.qforge.quantize_nf4(w.t(), 64)
    packed, state = nf4.quantize(w)
    args = list(dq_args(packed, state))
    args[1] = state.absmax[:-1]
    with pytest.raises(ValueError, match="absmax has 63 entries but 4096 elements in blocks of 64 need 64"):
        torch.ops.qforge.dequantize_nf4(*args)
    args = list(dq_args(packed, state))
    args[0] = packed[:-1]
    with pytest.raises(ValueError, match="packed weight has 2047 bytes but 4096 elements need 2048"):
        torch.ops.qforge.dequantize_nf4(*args)
    args = list(dq_args(packed, state))
    args[7] = None
    with pytest.raises(ValueError, match="needs nested_absmax, nested_quant_map and nested_offset"):
        torch.ops.qforge.dequantize_nf4(*args)
    args = list(dq_args(packed, state))
    args[5] = torch.int8
    with pytest.raises(ValueError, match="output dtype must be one of"):
        torch.ops.qforge.dequantize_nf4(*args)
    args = list(dq_args(packed, state))
    args[3] = 100
    with pytest.raises(ValueError, match="blocksize must be a power of two"):
        torch.ops.qforge.dequantize_nf4(*args)


def test_dequantize_into_workspace(rng):
    w = random_weight((50, 90), torch.bfloat16, rng)
    packed, state = nf4.quantize(w)
    out = torch.full((50 * 90,), float("nan"), dtype=torch.bfloat16)
    assert nf4.dequantize(packed, state, out=out) is out
    assert torch.equal(out.view(50, 90), nf4.dequantize(packed, state))


def test_opcheck(rng):
    w = random_weight((40, 66), torch.float16, rng)
    packed, state = nf4.quantize(w)
    torch.library.opcheck(torch.ops.qforge.quantize_nf4, (w, 64))
    torch.library.opcheck(torch.ops.qforge.quantize_blockwise_8bit,
                          (torch.rand(300), state.state2.code, 256, torch.tensor([0.5])))
    torch.library.opcheck(torch.ops.qforge.dequantize_nf4, dq_args(packed, state))
    out = torch.empty(40 * 66, dtype=torch.float16)
    torch.library.opcheck(torch.ops.qforge.dequantize_nf4_into, dq_args(packed, state)[:4] + dq_args(packed, state)[6:] + (out,))


def test_compiles_fullgraph_without_graph_breaks(rng):
    w = random_weight((64, 96), torch.bfloat16, rng)
    packed, state = nf4.quantize(w)
    x = torch.randn(5, 96, dtype=torch.bfloat16, generator=rng)

    def linear(x):
        return x @ nf4.dequantize(packed, state).t()

    explanation = torch._dynamo.explain(linear)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(linear, fullgraph=True)
    assert torch.equal(compiled(x), linear(x))


def unpack_levels(packed, n):
    p = packed.reshape(-1).long()
    return torch.stack([p >> 4, p & 15], dim=1).reshape(-1)[:n]


def assert_differ_only_at_midpoints(ours, theirs, scaled, levels):
    """Codes from the GPU (bitsandbytes' fast-math reciprocal) and the CPU twin (exact
    reciprocal) may differ only where the scaled value sits on a midpoint between two
    levels, to within the reciprocal's one-ulp difference; and then by one level."""
    differ = (ours != theirs).nonzero().flatten()
    if differ.numel() == 0:
        return
    assert torch.all((ours[differ] - theirs[differ]).abs() == 1)
    levels = levels.double()
    midpoints = (levels[:-1] + levels[1:]) / 2
    s = scaled[differ].double()
    gap = (s[:, None] - midpoints[None, :]).abs().min(dim=1).values
    assert torch.all(gap <= 4 * torch.finfo(torch.float32).eps * s.abs().clamp(min=1e-30)), gap.max()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compress", [True, False])
def test_cuda_matches_bitsandbytes_and_cpu_twin(dtype, compress, rng):
    for shape in SHAPES + [(4096, 4096 + 32)]:
        for blocksize in (64, 32, 256, 4096):
            w = random_weight(shape, dtype, rng)
            packed, state = nf4.quantize(w.cuda(), blocksize=blocksize, compress_statistics=compress)
            ref_packed, ref_state = bnb_F.quantize_4bit(w.cuda(), blocksize=blocksize, compress_statistics=compress, quant_type="nf4")
            # the GPU writes exactly bitsandbytes' bytes
            assert torch.equal(packed, ref_packed.view(packed.shape)), (shape, blocksize)
            assert_same_state(state, ref_state)
            out = nf4.dequantize(packed, state)
            assert torch.equal(bits(out), bits(bnb_F.dequantize_4bit(ref_packed, ref_state))), (shape, blocksize)
            # the CPU twin dequantizes the GPU's state to the same bits
            cpu_state = nf4.QuantState.from_dict(state.as_dict(packed=True), device="cpu")
            assert torch.equal(bits(out.cpu()), bits(nf4.dequantize(packed.cpu(), cpu_state)))
            # and quantizes to the same codes but at level midpoints
            _, absmax = torch.ops.qforge.quantize_nf4(w, blocksize)
            cpu_packed, cpu_q = nf4.quantize(w, blocksize=blocksize, compress_statistics=compress)
            n = w.numel()
            scaled = w.reshape(-1).float() * (1 / absmax).repeat_interleave(blocksize)[:n]
            assert_differ_only_at_midpoints(unpack_levels(packed.cpu(), n), unpack_levels(cpu_packed, n), scaled, nf4_ops.nf4_code())
            if compress:
                # the same offset as the GPU's (torch's mean on another device may differ by an ulp)
                offset = state.offset.cpu().reshape(1)
                cpu_codes, cpu_absmax2 = torch.ops.qforge.quantize_blockwise_8bit(absmax, cpu_q.state2.code, 256, offset)
                assert torch.equal(cpu_absmax2, state.state2.absmax.cpu())
                x = (absmax - offset) * (1 / cpu_absmax2).repeat_interleave(256)[: absmax.numel()]
                assert_differ_only_at_midpoints(state.absmax.cpu().long(), cpu_codes.long(), x, cpu_q.state2.code)


@pytest.mark.cuda
def test_cuda_unaligned_buffers_and_streams(rng):
    w = random_weight((33, 96), torch.float16, rng).cuda()
    packed, state = nf4.quantize(w)
    ref = nf4.dequantize(packed, state)
    storage = torch.empty(w.numel() + 1, dtype=torch.float16, device="cuda")
    out = storage[1:]  # 2-byte aligned, not 16: the scalar path
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        nf4.dequantize(packed, state, out=out)
    side.synchronize()
    assert torch.equal(out.view(33, 96), ref)


@pytest.mark.cuda
def test_cuda_more_than_2_pow_31_elements():
    n = 2**31 + 4096 + 40
    free, _ = torch.cuda.mem_get_info()
    assert free > 6 * n, "GPU too small for the > 2^31 element test"
    gen = torch.Generator(device="cuda").manual_seed(0)
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8, device="cuda", generator=gen)
    blocks = math.ceil(n / 64)
    absmax = torch.rand(blocks, device="cuda", generator=gen)
    state = nf4.QuantState(absmax=absmax, shape=(n,), dtype=torch.bfloat16, blocksize=64)
    out = nf4.dequantize(packed, state)
    # the last `tail` elements start on a block boundary, so they form a weight of their own
    tail = n % 64 + 64 * 1500
    first_block = (n - tail) // 64
    assert (n - tail) % 64 == 0 and n - tail < 2**31 < n  # the tail crosses element 2^31
    tail_packed = packed.view(-1)[(n - tail) // 2:]
    tail_state = nf4.QuantState(absmax=absmax[first_block:], shape=(tail,), dtype=torch.bfloat16, blocksize=64)
    assert torch.equal(bits(out[n - tail:].cpu()), bits(nf4.dequantize(tail_packed.cpu(), tail_state.to("cpu"))))
    # and a slice from the middle, across the 2^31 boundary
    start = (2**31 // 64 - 10) * 64
    mid_state = nf4.QuantState(absmax=absmax[start // 64: start // 64 + 20], shape=(1280,), dtype=torch.bfloat16, blocksize=64)
    mid = nf4.dequantize(packed.view(-1)[start // 2: start // 2 + 640].cpu(), mid_state.to("cpu"))
    assert torch.equal(bits(out[start: start + 1280].cpu()), bits(mid))
