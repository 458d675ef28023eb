"""NF4Linear + LoRA: forward and gradients equal F.linear with the dequantized
weight, storage is non-float, the dequantized weight lives only in the shared
workspace (never on the module, never saved for backward)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qforge import nf4
from qforge.nn import WORKSPACE, NF4Linear, add_lora, dequantize_stacked, lora_parameters, replace_linears


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_backward_equal_dequantized_linear(double_quant, bias, rng):
    lin = torch.nn.Linear(192, 80, bias=bias)
    q = NF4Linear.from_linear(lin, compress_statistics=double_quant)
    packed, state = nf4.quantize(lin.weight.detach(), 64, double_quant)
    assert torch.equal(q.weight.packed, packed.view(-1))
    w = nf4.dequantize(packed, state)
    assert torch.equal(q.dequantize(), w)
    x = torch.randn(3, 5, 192, generator=rng, requires_grad=True)
    y = q(x)
    ref = F.linear(x, w, lin.bias.detach() if bias else None)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    g = torch.randn(y.shape, generator=rng)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in q.parameters())


def test_storage_dtypes_and_state_dict():
    from qforge.nf4_weight import NF4Weight

    q = NF4Linear.from_linear(torch.nn.Linear(128, 64))
    w = q.weight
    assert isinstance(w, NF4Weight) and isinstance(w, torch.nn.Parameter) and not w.requires_grad
    assert w.shape == (64, 128) and w.dtype == torch.float32  # the logical weight: what nn.Linear holds
    assert w.packed.dtype == torch.uint8 and w.packed.shape == (128 * 64 // 2,)
    assert w.absmax.dtype == torch.uint8 and w.absmax.shape == (128 * 64 // 64,)
    assert q.packed_codes().shape == (128 * 64 // 2, 1)  # bitsandbytes' layout
    assert list(q.state_dict()) == ["weight", "bias"] and not list(q.buffers())
    floats = [t for t in w.constants() if t is not None]
    assert all(t.dtype == torch.float32 and t.numel() <= 256 for t in floats)  # nothing weight-sized is float
    with pytest.raises(NotImplementedError, match="NF4Weight does not support"):
        w + 1  # no arithmetic on codes
    single = NF4Linear.from_linear(torch.nn.Linear(128, 64), compress_statistics=False)
    assert single.weight.absmax.dtype == torch.uint8  # fp32 absmax kept as its raw bytes
    assert single.weight.absmax.numel() == 4 * 128
    assert single.quant_state().absmax.dtype == torch.float32


def test_nf4_weight_moves_slices_and_copies_only_codes():
    q = NF4Linear.from_linear(torch.nn.Linear(128, 64))
    w = q.weight
    halves = torch.chunk(w, 2, dim=0)  # what FSDP2 does to shard it
    assert [h.shape for h in halves] == [(32, 128), (32, 128)]
    assert torch.equal(torch.cat([h.packed for h in halves]), w.packed)
    assert torch.equal(torch.cat([h.absmax for h in halves]), w.absmax)
    assert halves[1].quant_map is w.quant_map  # constants stay whole
    padded = w.new_zeros((64, 128))
    padded.narrow(0, 32, 32).copy_(halves[1])
    assert torch.equal(padded.packed[2048:], w.packed[2048:]) and not padded.packed[:2048].any()
    flat = w.view(-1)
    assert flat.shape == (64 * 128,) and flat.packed is w.packed
    moved = w.to(torch.bfloat16)  # relabels the logical dtype, never converts codes
    assert moved.dtype == torch.bfloat16 and torch.equal(moved.packed, w.packed)
    assert torch.equal(w.clone(), w) and not torch.equal(padded, w)
    with pytest.raises(ValueError, match="do not split evenly"):
        torch.chunk(NF4Linear.from_linear(torch.nn.Linear(128, 63)).weight, 2, dim=0)
    with pytest.raises(ValueError, match="blocks of 64"):
        torch.chunk(NF4Linear.from_linear(torch.nn.Linear(96, 4)).weight, 4, dim=0)


def test_lora_matches_peft_formula(rng):
    lin = torch.nn.Linear(96, 64, bias=False)
    q = NF4Linear.from_linear(lin)
    q.add_lora(r=8, lora_alpha=32)
    assert q.scaling == 4.0
    torch.testing.assert_close(q.lora_B.weight, torch.zeros(64, 8))
    with torch.no_grad():
        q.lora_B.weight.normal_(generator=rng)
    x = torch.randn(7, 96, generator=rng, requires_grad=True)
    y = q(x)
    w = q.dequantize()
    A, B = q.lora_A.weight, q.lora_B.weight
    ref = x @ w.T + 4.0 * (x @ A.T) @ B.T
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    A2, B2 = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    (x2 @ w.T + 4.0 * (x2 @ A2.T) @ B2.T).square().sum().backward()
    torch.testing.assert_close(A.grad, A2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(B.grad, B2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.lora_delta(torch.float32), 4.0 * B.detach() @ A.detach())


def test_bf16_autocast_computes_in_bf16(rng):
    q = NF4Linear.from_linear(torch.nn.Linear(128, 64))
    q.add_lora(4, 8)
    x = torch.randn(4, 128, generator=rng, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x.bfloat16(), q.dequantize(torch.bfloat16), q.bias.bfloat16())
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and q.lora_A.weight.grad.dtype == torch.float32


def test_dequantized_weight_only_in_shared_workspace(rng):
    """Forward and backward dequantize into one reused buffer; nothing
    weight-sized is saved for backward or kept on the module."""
    WORKSPACE.clear()
    layers = torch.nn.Sequential(*[NF4Linear.from_linear(torch.nn.Linear(256, 256)) for _ in range(3)])
    x = torch.randn(2, 256, generator=rng, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layers(x)
    y.sum().backward()
    assert (256, 256) not in [s for s, d in saved if d.is_floating_point]
    # the frozen NF4 matmul saves nothing through saved-tensor hooks: grad_input needs only
    # the weight, which backward re-dequantizes (so save_on_cpu never copies 4-bit weights)
    assert saved == []
    bufs = list(WORKSPACE.buffers.values())
    assert len(bufs) == 1 and bufs[0].numel() == 256 * 256  # one workspace for all three layers, both passes
    for m in layers:
        stored = [t for w in m.state_dict().values()
                  for t in ((w.packed, w.absmax) + w.constants() if hasattr(w, "packed") else (w,)) if t is not None]
        assert not any(t.is_floating_point() and t.numel() >= 256 * 256 for t in stored)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_stacked_is_the_weights_one_below_the_other_in_the_workspace(dtype, rng):
    """Sibling weights (q/k/v, gate/up) dequantized into one [rows, in] workspace matrix: each
    block equals its weight's own dequantization; rows past them are the caller's."""
    WORKSPACE.clear()
    lins = [NF4Linear.from_linear(torch.nn.Linear(128, n), compress_statistics=dq)
            for n, dq in ((96, True), (32, False), (64, True))]
    stacked = dequantize_stacked([m.weight for m in lins], 200, dtype)
    assert stacked.shape == (200, 128) and stacked.dtype == dtype
    assert stacked.data_ptr() == next(iter(WORKSPACE.buffers.values())).data_ptr()
    torch.testing.assert_close(stacked[:192], torch.cat([m.dequantize(dtype) for m in lins]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not stack into 100 rows"):
        dequantize_stacked([m.weight for m in lins], 100, dtype)
    other = NF4Linear.from_linear(torch.nn.Linear(64, 32))
    with pytest.raises(ValueError, match="do not stack"):
        dequantize_stacked([lins[0].weight, other.weight], 200, dtype)


def test_add_lora_targets_and_freezing():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match="not NF4 layers"):
        add_lora(model, r=4, lora_alpha=8)
    replaced = replace_linears(model)
    assert len(replaced) == 14 and "lm_head" not in replaced
    add_lora(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all(("q_proj" in n or "v_proj" in n) and ".lora_" in n for n in trainable)
    assert len(lora_parameters(model)) == 8
    assert model.qforge_lora["target_modules"] == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="no module matches"):
        add_lora(model, r=4, lora_alpha=8, target_modules=["nonexistent"])
    with pytest.raises(ValueError, match="rank must be positive"):
        NF4Linear.from_linear(torch.nn.Linear(64, 64)).add_lora(0, 1)


def test_add_lora_takes_peft_names_and_the_old_ones_with_a_warning():
    """add_lora's lora_alpha / lora_dropout are peft.LoraConfig's; alpha / dropout still
    work (a FutureWarning), and both spellings with different values are an error."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)

    def model():
        m = transformers.LlamaForCausalLM(cfg)
        replace_linears(m)
        return m

    new = add_lora(model(), r=4, lora_alpha=12, lora_dropout=0.1, target_modules=["q_proj"], seed=0)
    with pytest.warns(FutureWarning, match="`alpha` is deprecated, pass `lora_alpha`"):
        with pytest.warns(FutureWarning, match="`dropout` is deprecated, pass `lora_dropout`"):
            old = add_lora(model(), r=4, alpha=12, dropout=0.1, target_modules=["q_proj"], seed=0)
    assert new.qforge_lora == old.qforge_lora
    assert new.qforge_lora["lora_alpha"] == 12 and new.qforge_lora["lora_dropout"] == 0.1
    q = new.model.layers[0].self_attn.q_proj
    assert q.scaling == 12 / 4 and q.lora_dropout.p == 0.1
    with pytest.raises(TypeError, match="both lora_alpha=8 and its deprecated name alpha=12"):
        with pytest.warns(FutureWarning):
            add_lora(model(), r=4, lora_alpha=8, alpha=12)
    layer = NF4Linear.from_linear(torch.nn.Linear(64, 64))
    with pytest.warns(FutureWarning, match="NF4Linear.add_lora: `alpha` is deprecated"):
        layer.add_lora(4, alpha=8)
    assert layer.scaling == 2.0
    with pytest.raises(TypeError, match="lora_alpha is required"):
        NF4Linear.from_linear(torch.nn.Linear(64, 64)).add_lora(4)
