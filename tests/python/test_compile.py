"""torch.compile of a QLoRA decoder layer: zero graph breaks, fullgraph=True,
results equal to eager, the NF4 dequantization traced as the registered op in
both the forward and the backward graph (the weight is re-dequantized, never
saved), and no recompilation per sequence length."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from qforge.nn import NF4Linear, add_lora, replace_linears  # noqa: E402


def make_layer(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    replace_linears(model)
    add_lora(model, r=4, lora_alpha=8, seed=seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    return model, model.model.layers[0]


def inputs(model, seq=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, seq, 64, generator=g).requires_grad_(True)
    pos = torch.arange(seq).expand(2, -1)
    return x, model.model.rotary_emb(x, pos), pos


def test_decoder_layer_has_zero_graph_breaks():
    torch._dynamo.reset()
    model, layer = make_layer()
    x, pe, pos = inputs(model)
    ex = torch._dynamo.explain(layer)(x, position_embeddings=pe, position_ids=pos)
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1


def test_fullgraph_inductor_matches_eager():
    torch._dynamo.reset()
    model, layer = make_layer()
    x, pe, pos = inputs(model)
    ref = layer(x, position_embeddings=pe, position_ids=pos)
    ref.square().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    ref_x = x.grad.clone()
    layer.zero_grad()
    x.grad = None
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x, position_embeddings=pe, position_ids=pos)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, ref_x, rtol=1e-4, atol=1e-5)
    assert len(ref_grads) == 14
    for n, p in layer.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)


def test_dequantize_op_in_forward_and_backward_graphs_and_weight_not_saved():
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    graphs = {"fw": [], "bw": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    backend = aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw"))
    model, layer = make_layer()
    x, pe, pos = inputs(model, seq=13)  # 26 token rows: no activation shares a weight's shape
    out = torch.compile(layer, fullgraph=True, backend=backend)(x, position_embeddings=pe, position_ids=pos)
    out.sum().backward()
    fw, bw = graphs["fw"][0], graphs["bw"][0]
    deq = torch.ops.qforge.dequantize_nf4.default

    def count(gm):
        return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == deq)

    assert count(fw) == 7 and count(bw) == 7  # the seven projections, re-dequantized in backward
    # what the forward graph hands to backward: no dequantized (out, in) float weight among it
    weight_shapes = {(m.out_features, m.in_features) for m in layer.modules() if isinstance(m, NF4Linear)}
    out_node = next(n for n in fw.graph.nodes if n.op == "output")
    saved = out_node.args[0][1:]  # after the layer output: saved tensors/symbols for backward
    assert any(n.meta.get("val") is not None and getattr(n.meta["val"], "dtype", None) == torch.uint8
               for n in saved if hasattr(n, "meta"))  # the packed codes are what backward gets
    for node in saved:
        val = node.meta.get("val") if hasattr(node, "meta") else None
        if isinstance(val, torch.Tensor) and val.is_floating_point() and val.dim() == 2:
            assert tuple(val.shape) not in weight_shapes, f"dequantized weight {tuple(val.shape)} saved for backward"


def test_varying_sequence_lengths_do_not_recompile_per_length():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, layer = make_layer()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for seq in (8, 12, 20, 28, 36, 44):
        x, pe, pos = inputs(model, seq)
        ref = layer(x, position_embeddings=pe, position_ids=pos)
        out = compiled(x, position_embeddings=pe, position_ids=pos)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] <= 2  # static first, then one dynamic-shape graph


def test_whole_training_forward_compiles_without_breaks():
    """The full causal LM on a packed batch, with the fused linear-cross-entropy
    loss (a registered op): one graph, and loss + LoRA gradients equal eager."""
    from qforge import hf

    torch._dynamo.reset()
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    replace_linears(model)
    add_lora(model, r=4, lora_alpha=8, seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    hf.patch_causal_lm(model)
    model.train()
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(2))
    pos = torch.cat([torch.arange(10), torch.arange(14)]).view(1, -1)  # two packed sequences

    def step(ids, pos, labels):
        return model(input_ids=ids, position_ids=pos, labels=labels, use_cache=False).loss

    ex = torch._dynamo.explain(step)(ids, pos, ids)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons
    torch._dynamo.reset()
    ref = step(ids, pos, ids)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(ids, pos, ids)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_compile_watch_counts_compilations_and_keeps_recompile_reasons():
    """qforge.compile.CompileWatch (what qforge train --compile reports): one count per Dynamo
    compilation, the time they took, each recompilation's guard failure, nothing after close()."""
    from qforge.compile import CompileWatch

    torch._dynamo.reset()

    @torch.compile(backend="eager")
    def scale(x, n):
        return x * n

    with CompileWatch() as watch:
        scale(torch.ones(2), 2)
        scale(torch.ones(2), 2)  # the same guards: no compilation
        scale(torch.ones(2), 3)  # n was specialized: a recompilation
    assert watch.compilations == 2 and watch.seconds > 0
    (reason,) = watch.recompile_reasons
    assert "Recompiling function scale" in reason and "n == 2" in reason
    scale(torch.ones(5), 7)  # after close: not counted
    assert watch.compilations == 2 and len(watch.recompile_reasons) == 1
    torch._dynamo.reset()
