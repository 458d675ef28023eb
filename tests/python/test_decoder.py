"""qforge.decoder: the decoder layer with a hand-written backward equals transformers' layer with
qforge's NF4 + LoRA under autograd (outputs, input gradient, every LoRA gradient), on the CPU.
Llama, Mistral (sliding window), Qwen2 (q/k/v bias) and Qwen3 (q_norm/k_norm); grouped-query
heads; odd sizes; packed rows against per-document runs; offload and token tiles on and off."""
import copy
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")
from conftest import make_qlora  # noqa: E402
from qforge import decoder, offload  # noqa: E402
from qforge.nn import lora_parameters  # noqa: E402

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": 9}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 12}),
}


def tiny(family="llama", seed=0, layers=2, hidden=48, heads=4, kv_heads=2, intermediate=83, dropout=0.0,
         targets=None, **extra):
    config_cls, model_cls, defaults = FAMILIES[family]
    cfg = config_cls(vocab_size=101, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                     attn_implementation="sdpa", **{**defaults, **extra})
    torch.manual_seed(seed)
    model = model_cls(cfg).float()
    with torch.no_grad():  # norms and biases away from their init values, so their use is checked
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return make_qlora(model, seed, targets, dropout)


def packed_positions(lengths_per_row):
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row])


def random_lengths(gen, rows, tokens):
    out = []
    for r in range(rows):
        row, left = [1] if r == 0 else [], tokens - (1 if r == 0 else 0)  # a document of one token
        while left:
            n = min(left, int(torch.randint(1, tokens // 2 + 1, (1,), generator=gen)))
            row.append(n)
            left -= n
        out.append(row)
    return out


def window_mask(length, window):
    i = torch.arange(length)
    d = i[:, None] - i[None, :]
    allowed = d >= 0
    if window is not None:
        allowed &= d < window
    return allowed[None, None]


def layer_io(model, layer_idx, hidden, position_ids):
    rotary = model.model.rotary_emb
    cos, sin = rotary(hidden, position_ids)
    return dict(position_ids=position_ids, position_embeddings=(cos, sin))


def reference_per_document(ref, layer_idx, x, lengths):
    """transformers' layer (plain autograd) on each document alone; outputs concatenated."""
    layer = ref.model.layers[layer_idx]
    window = getattr(ref.config, "sliding_window", None) if isinstance(ref, transformers.MistralForCausalLM) else None
    outs = []
    for b, row in enumerate(lengths):
        start = 0
        for n in row:
            xd = x[b:b + 1, start:start + n]
            pos = torch.arange(n)[None]
            kw = layer_io(ref, layer_idx, xd, pos)
            outs.append((b, start, layer(xd, attention_mask=window_mask(n, window), **kw)))
            start += n
    y = torch.empty_like(x)
    for b, start, o in outs:
        y[b, start:start + o.shape[1]] = o[0]
    return y


def lora_grads(model, layer_idx=None):
    prefix = "" if layer_idx is None else f"model.layers.{layer_idx}."
    return {n: p.grad.clone() for n, p in model.named_parameters()
            if p.requires_grad and n.startswith(prefix) and p.grad is not None}


def assert_same_training(ref, ours, **inputs):
    """One forward + backward of each model: the same loss and every LoRA gradient."""
    losses = []
    for m in (ref, ours):
        loss = m(**inputs).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    g_ref, g_ours = lora_grads(ref), lora_grads(ours)
    assert len(g_ref) == 14 * len(ref.model.layers) and g_ref.keys() == g_ours.keys()
    for n in g_ref:
        torch.testing.assert_close(g_ours[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("do_offload,tile", [(True, None), (False, 7), (True, 5)])
def test_layer_equals_transformers_layer_on_packed_rows(family, do_offload, tile):
    ref = tiny(family)
    ours = copy.deepcopy(ref)
    status = decoder.enable(ours, offload=do_offload, tile_tokens=tile)
    assert (status.fused, status.layers) == (2, 2), str(status)
    gen = torch.Generator().manual_seed(5)
    B, T, H = 2, 29, ref.config.hidden_size
    lengths = random_lengths(gen, B, T)
    pos = packed_positions(lengths)
    x = torch.randn(B, T, H, generator=gen)
    dy = torch.randn(B, T, H, generator=gen)

    x_ref = x.clone().requires_grad_(True)
    y_ref = reference_per_document(ref, 1, x_ref, lengths)
    (y_ref * dy).sum().backward()

    x_ours = x.clone().requires_grad_(True)
    layer = ours.model.layers[1]
    y = layer(x_ours, attention_mask=None, **layer_io(ours, 1, x_ours, pos))
    (y * dy).sum().backward()

    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    g_ref, g_ours = lora_grads(ref, 1), lora_grads(ours, 1)
    assert len(g_ref) == 14 and g_ref.keys() == g_ours.keys()
    for n in g_ref:
        torch.testing.assert_close(g_ours[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("family,heads,kv_heads,hidden,intermediate", [
    ("llama", 6, 1, 36, 50),    # multi-query, head_dim 6
    ("qwen2", 3, 3, 30, 61),    # no grouping, head_dim 10
    ("qwen3", 5, 1, 35, 37),    # head_dim 12 (Qwen3's own), hidden 35
])
def test_whole_model_odd_sizes_equals_plain_training(family, heads, kv_heads, hidden, intermediate):
    ref = tiny(family, heads=heads, kv_heads=kv_heads, hidden=hidden, intermediate=intermediate, layers=3)
    ours = copy.deepcopy(ref)
    decoder.enable(ours, tile_tokens=11)
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 101, (3, 23), generator=gen)
    labels = ids.clone()
    labels[:, :4] = -100
    pos = packed_positions(random_lengths(gen, 3, 23))
    assert_same_training(ref, ours, input_ids=ids, labels=labels, position_ids=pos)


def test_padding_mask_equals_plain_training():
    ref = tiny("llama")
    ours = copy.deepcopy(ref)
    decoder.enable(ours)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 101, (2, 17), generator=gen)
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, 11:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    assert_same_training(ref, ours, input_ids=ids, attention_mask=mask, labels=labels)


def test_training_steps_follow_todays_checkpointed_path():
    ref = tiny("llama", seed=3, layers=3)
    ours = copy.deepcopy(ref)
    offload.enable(ref, tile_tokens=8)
    decoder.enable(ours, tile_tokens=8)
    opt_r = torch.optim.AdamW(lora_parameters(ref), lr=1e-2)
    opt_o = torch.optim.AdamW(lora_parameters(ours), lr=1e-2)
    gen = torch.Generator().manual_seed(4)
    for step in range(4):
        ids = torch.randint(0, 101, (2, 31), generator=gen)
        pos = packed_positions(random_lengths(gen, 2, 31))
        losses = []
        for m, opt in ((ref, opt_r), (ours, opt_o)):
            loss = m(input_ids=ids, labels=ids, position_ids=pos).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-5), step
    for a, b in zip(lora_parameters(ref), lora_parameters(ours)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_backward_recomputes_only_norms_qkv_and_gate_up(monkeypatch):
    """o_proj, down_proj and the attention forward run once per layer (in forward), never in backward;
    q/k/v and gate/up are recomputed once, each group as one GEMM (decoder._Stack)."""
    model = tiny("llama", layers=3)
    off = decoder.enable(model, tile_tokens=None)
    forward_calls = []
    linear, stacked, attn = decoder._linear, decoder._stack_matmul, decoder.attention_forward
    monkeypatch.setattr(decoder, "_linear", lambda lin, *a, **k: forward_calls.append(lin) or linear(lin, *a, **k))
    monkeypatch.setattr(decoder, "_stack_matmul",
                        lambda stack, *a, **k: forward_calls.append(stack.lins) or stacked(stack, *a, **k))
    monkeypatch.setattr(decoder, "attention_forward",
                        lambda *a, **k: forward_calls.append("attention") or attn(*a, **k))
    ids = torch.randint(0, 101, (2, 13))
    loss = model(input_ids=ids, labels=ids).loss
    in_forward = list(forward_calls)
    forward_calls.clear()
    loss.backward()
    layers = model.model.layers
    assert in_forward.count("attention") == 3 and forward_calls.count("attention") == 0
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        assert in_forward.count((a.q_proj, a.k_proj, a.v_proj)) == 1 and in_forward.count((m.gate_proj, m.up_proj)) == 1
        assert in_forward.count(a.o_proj) == 1 and in_forward.count(m.down_proj) == 1
        assert [c for c in forward_calls if c in (a.o_proj, m.down_proj)] == []
        assert forward_calls.count((a.q_proj, a.k_proj, a.v_proj)) == 1
        assert forward_calls.count((m.gate_proj, m.up_proj)) == 1
    assert len(forward_calls) == 2 * len(layers)
    assert off.fused == 3


def test_stacks_with_mixed_lora_ranks_and_biases_equal_plain_training():
    """q/k/v and gate/up each run as one GEMM over stacked weights and LoRA A's (decoder._Stack):
    projections without LoRA, different odd ranks (the stack's rows padded) and biases on every
    projection keep the loss and every LoRA gradient of plain training."""
    ref = tiny("llama", attention_bias=True, mlp_bias=True, intermediate=45)
    gen = torch.Generator().manual_seed(4)
    for layer in ref.model.layers:
        for lin in (layer.self_attn.k_proj, layer.mlp.gate_proj):  # NF4 without LoRA
            lin.lora_A = lin.lora_B = None
            lin.r = 0
        for lin, r in ((layer.self_attn.v_proj, 3), (layer.mlp.up_proj, 5)):
            lin.add_lora(r, lora_alpha=7.0, generator=gen)
            with torch.no_grad():
                lin.lora_B.weight.normal_(0, 0.05, generator=gen)
    stack = decoder._Stack(ref.model.layers[0].self_attn.q_proj, ref.model.layers[0].self_attn.k_proj,
                           ref.model.layers[0].self_attn.v_proj)
    assert (stack.rank, stack.rows % decoder.STACK_ROW_ALIGN) == (4 + 3, 0) and stack.rows > stack.out + stack.rank
    ours = copy.deepcopy(ref)
    assert decoder.enable(ours, tile_tokens=7).fused == 2
    ids = torch.randint(0, 101, (2, 19), generator=gen)
    losses = []
    for m in (ref, ours):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    g_ref, g_ours = lora_grads(ref), lora_grads(ours)
    assert len(g_ref) == 2 * 5 * 2 and g_ref.keys() == g_ours.keys()
    for n in g_ref:
        torch.testing.assert_close(g_ours[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_offloaded_bytes_are_x_o_lse_and_h():
    model = tiny("llama", layers=2, heads=4, kv_heads=2)
    decoder.enable(model)
    ids = torch.randint(0, 101, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    off = model._qforge_offloader
    tokens, hidden, heads = 20, 48, 4
    per_layer = 3 * tokens * hidden * 4 + heads * tokens * 4  # x, o, h (fp32) and lse [heads, tokens]
    assert off.bytes_to_host == off.bytes_to_device == 2 * per_layer


# One layer's saves at 2 x 10 tokens, fp32: x and h (hidden 48), o (4 heads of 16 on Qwen3: 64
# features; 48 on Llama) and lse (4 heads).
X_BYTES, LSE_BYTES = 2 * 10 * 48 * 4, 4 * 2 * 10 * 4


def saves(o_features):
    o = 2 * 10 * o_features * 4
    return 2 * X_BYTES + o + LSE_BYTES, X_BYTES + o + LSE_BYTES  # all, no_h


@pytest.mark.parametrize("family,o_features", [("llama", 48), ("qwen3", 64)])
@pytest.mark.parametrize("case", ["all, no_h, no_h", "no_h, no_h, x", "no_h x 3"])
def test_host_budget_keeps_less_layer_by_layer(family, o_features, case):
    every, no_h = saves(o_features)
    budget, expected = {
        "all, no_h, no_h": (every + 2 * no_h, every + 2 * no_h),  # then h recomputed
        "no_h, no_h, x": (2 * no_h + X_BYTES, 2 * no_h + X_BYTES),  # the last layer checkpointed
        "no_h x 3": (every + 2 * no_h - 1, 3 * no_h),
    }[case]
    ref = tiny(family, layers=3, **({"head_dim": 16} if family == "qwen3" else {}))
    ours = copy.deepcopy(ref)
    decoder.enable(ours, host_budget_gib=budget / 2**30)
    ids = torch.randint(0, 101, (2, 10))
    assert_same_training(ref, ours, input_ids=ids, labels=ids)
    off = ours._qforge_offloader
    assert off.bytes_to_host == off.bytes_to_device == expected
    with pytest.raises(ValueError, match="host_budget_gib must be > 0"):
        decoder.enable(ours, host_budget_gib=0)


def test_unsupported_layers_keep_checkpointing_with_a_reason(caplog):
    ref = tiny("llama", dropout=0.1, seed=1)
    ours = copy.deepcopy(ref)
    with caplog.at_level(logging.WARNING, logger="qforge.decoder"):
        status = decoder.enable(ours)
    assert status.fused == 0 and "LoRA dropout 0.1" in status.reason
    assert "LoRA dropout" in caplog.text
    offload.enable(ref)
    ids = torch.randint(0, 101, (2, 12))
    for m in (ref, ours):
        torch.manual_seed(7)  # same dropout masks
        m(input_ids=ids, labels=ids).loss.backward()
    for n, g in lora_grads(ref).items():
        torch.testing.assert_close(lora_grads(ours)[n], g, msg=n)

    plain_o = tiny("llama", targets=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    status = decoder.enable(plain_o)
    assert status.fused == 0 and "self_attn.o_proj is a Linear" in status.reason


def test_a_call_it_cannot_take_runs_checkpointed(caplog):
    ref = tiny("llama")
    ours = copy.deepcopy(ref)
    decoder.enable(ours)
    x = torch.randn(1, 9, 48)
    pos = torch.arange(9)[None]
    mask4d = torch.zeros(1, 1, 9, 9).masked_fill(~window_mask(9, None), float("-inf"))
    outs = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_(True)
        with caplog.at_level(logging.WARNING, logger="qforge.decoder"):
            y = m.model.layers[0](xi, attention_mask=mask4d, **layer_io(m, 0, xi, pos))
        y.sum().backward()
        outs.append((y, xi.grad))
    assert "attention mask of shape (1, 1, 9, 9)" in caplog.text
    torch.testing.assert_close(outs[1][0], outs[0][0])
    torch.testing.assert_close(outs[1][1], outs[0][1])


def test_a_fused_layer_runs_inside_its_module_hooks():
    """FSDP2 unshards a layer in its forward pre-hook and hooks its output for backward: the fused
    layer must run between the layer's hooks, whichever of __call__ or forward transformers checkpoints."""
    model = tiny("llama")
    decoder.enable(model)
    events = []
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: events.append(("pre", i)))
        layer.register_forward_hook(lambda m, a, out, i=i: events.append(("post", i, type(out).__name__,
                                                                          out.grad_fn.name())))
        layer.self_attn.register_forward_pre_hook(lambda m, a: events.append("transformers' attention"))
    ids = torch.randint(0, 101, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert events == [("pre", 0), ("post", 0, "Tensor", "_DecoderLayerBackward"),
                      ("pre", 1), ("post", 1, "Tensor", "_DecoderLayerBackward")]


def test_disable_restores_transformers_layers():
    model = tiny("llama")
    decoder.enable(model)
    assert all("forward" in layer.__dict__ for layer in model.model.layers)  # the fused forward
    decoder.disable(model)
    assert model._qforge_decoder is None and not model.model.layers[0].gradient_checkpointing
    assert not any("forward" in layer.__dict__ for layer in model.model.layers)  # the class's again
    ids = torch.randint(0, 101, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()  # plain autograd, no hooks left
    assert all(p.grad is not None for p in lora_parameters(model))


# ------------------------------------------------------------------ the pieces, in fp64
@pytest.mark.parametrize("window", [None, 4])
def test_math_attention_and_its_lse_backward_equal_fp64_sdpa(window):
    g = torch.Generator().manual_seed(1)
    B, T, Hq, Hkv, D = 2, 19, 6, 2, 8
    lengths = random_lengths(g, B, T)
    docs = decoder.packed_documents(packed_positions(lengths), None, B, T, "cpu")
    assert not docs.dense and docs.longest == max(max(r) for r in lengths)
    q = torch.randn(B * T, Hq, D, dtype=torch.float64, generator=g, requires_grad=True)
    k, v = (torch.randn(B * T, Hkv, D, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    do = torch.randn(B * T, Hq, D, dtype=torch.float64, generator=g)
    outs = []
    for a, b in zip(docs.bounds[:-1], docs.bounds[1:]):
        qd, kd, vd = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
        allowed = window_mask(b - a, window)[0]
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            qd, kd, vd, attn_mask=allowed, scale=0.3, enable_gqa=True)[0].transpose(0, 1))
    ref = torch.cat(outs)
    want = torch.autograd.grad(ref, (q, k, v), do)
    o, state = decoder.attention_forward(q.detach(), k.detach(), v.detach(), docs, 0.3, window, "math")
    torch.testing.assert_close(o, ref)
    got = decoder.attention_backward(do, q.detach(), k.detach(), v.detach(), o, state, docs, 0.3, window, "math")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("takes_gqa", [True, False])
def test_cudnn_kernel_gets_grouped_query_kv_or_repeated_heads(monkeypatch, takes_gqa):
    """The cuDNN path on the CPU, cuDNN's kernels stood in for by SDPA: K/V reach them as they are
    where cuDNN takes grouped-query inputs (qforge.attention.cudnn_takes_gqa, asked once), else with
    their heads repeated and the copies' gradients summed; either way the math path's results."""
    from qforge import attention

    calls = []

    def sdpa(q, k, v, scale):
        if k.shape[1] != q.shape[1] and not takes_gqa:
            raise RuntimeError("cuDNN Frontend error: no grouped-query attention here")
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                enable_gqa=True)

    def forward(q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal, return_debug_mask, scale=None):
        calls.append(("forward", q.shape[1], k.shape[1]))
        out, unused = sdpa(q, k, v, scale), torch.empty(0)
        return out, torch.zeros(q.shape[:3]), unused, unused, 0, 0, unused, unused, unused

    def backward(do, q, k, v, o, lse, seed, offset, attn_bias, cum_q, cum_k, max_q, max_k, dropout_p, is_causal,
                 scale=None):
        calls.append(("backward", q.shape[1], k.shape[1]))
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        return torch.autograd.grad(sdpa(q, k, v, scale), (q, k, v), do)

    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", forward)
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention_backward", backward)
    monkeypatch.setattr(attention, "_cudnn_gqa", {})
    g = torch.Generator().manual_seed(3)
    B, T, Hq, Hkv, D = 2, 7, 6, 2, 8
    docs = decoder.packed_documents(None, None, B, T, "cpu")
    q, do = (torch.randn(B * T, Hq, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B * T, Hkv, D, generator=g) for _ in range(2))
    o, state = decoder.attention_forward(q, k, v, docs, 0.3, None, "cudnn")
    grads = decoder.attention_backward(do, q, k, v, o, state, docs, 0.3, None, "cudnn")
    ref, ref_state = decoder.attention_forward(q, k, v, docs, 0.3, None, "math")
    torch.testing.assert_close(o, ref)
    for got, want in zip(grads, decoder.attention_backward(do, q, k, v, ref, ref_state, docs, 0.3, None, "math")):
        torch.testing.assert_close(got, want)
    kv_heads = Hkv if takes_gqa else Hq
    assert calls == [("forward", 4, 2), ("forward", Hq, kv_heads), ("backward", Hq, kv_heads)]  # the probe first


def test_documents_of_position_ids_and_padding():
    docs = decoder.packed_documents(packed_positions([[3, 1, 2], [6]]), None, 2, 6, "cpu")
    assert docs.bounds == [0, 3, 4, 6, 12] and docs.longest == 6 and not docs.dense
    dense = decoder.packed_documents(None, None, 2, 6, "cpu")
    assert dense.bounds == [0, 6, 12] and dense.dense
    pad = torch.tensor([[1, 1, 1, 1, 0, 0]])
    padded = decoder.packed_documents(torch.arange(6)[None], pad, 1, 6, "cpu")
    assert padded.bounds == [0, 4, 5, 6]


def test_qforge_train_with_fused_layers_trains_like_checkpointing(tmp_path, capsys, caplog):
    from qforge import train as T
    from qforge.data import builtin_dataset

    base = T._prepare_default_model(tmp_path / "base", builtin_dataset(seed=0), seed=0)
    kw = dict(model=str(base), max_steps=3, max_seq_length=1024, tokens_per_batch=512, lr=4e-3, warmup_steps=2,
              lora_r=8, lora_alpha=16.0, progress=False, gradient_checkpointing=True)
    plain = T.train(output=str(tmp_path / "plain"), fused_layers="off", **kw)
    fused = T.train(output=str(tmp_path / "fused"), fused_layers="on", offload_activations=True, tile_tokens=100,
                    **kw)
    assert "fused decoder layers: on" in capsys.readouterr().err
    assert "checkpointed recompute instead" not in caplog.text  # every layer call ran fused
    torch.testing.assert_close(torch.tensor(fused["losses"]), torch.tensor(plain["losses"]), rtol=1e-5, atol=1e-5)


def test_when_training_uses_fused_layers():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert decoder.wanted("auto", cuda, True, False) == (True, "auto")  # one process
    assert not decoder.wanted("auto", cuda, True, False, distributed=True)[0]  # torchrun: on, not auto, until measured
    assert decoder.wanted("on", cuda, True, False, distributed=True)[0]
    assert not decoder.wanted("auto", cpu, True, False)[0]
    assert not decoder.wanted("auto", cuda, False, False)[0]
    assert "compile" in decoder.wanted("auto", cuda, True, True)[1]
    assert decoder.wanted("on", cpu, False, False)[0]
    assert not decoder.wanted("off", cuda, True, False)[0]
    with pytest.raises(ValueError, match="does not combine with --compile"):
        decoder.wanted("on", cuda, True, True)
    with pytest.raises(ValueError, match="expected one of auto, on, off"):
        decoder.wanted("yes", cuda, True, False)
