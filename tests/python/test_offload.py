"""qforge.offload: per-layer checkpoints in host memory and the MLP in token tiles give the same
losses and LoRA gradients as training without them (tiny NF4 + LoRA Llama on the CPU)."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from conftest import make_qlora  # noqa: E402
from qforge import offload  # noqa: E402
from qforge.nn import lora_parameters  # noqa: E402
from qforge.nf4_weight import NF4Weight  # noqa: E402


def tiny_qlora(seed=0, layers=3):
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float()
    return make_qlora(model, seed)


def batch(seed, b=2, t=40, v=97):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, v, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :7] = -100
    return ids, labels


def grads_after_step(model, ids, labels, dropout_seed=None):
    model.zero_grad(set_to_none=True)
    if dropout_seed is not None:
        torch.manual_seed(dropout_seed)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(ref, got, rtol=1e-5, atol=1e-6):
    (l_ref, g_ref), (l_got, g_got) = ref, got
    torch.testing.assert_close(l_got, l_ref, rtol=rtol, atol=atol)
    assert g_ref.keys() == g_got.keys() and len(g_ref) > 0
    for n in g_ref:
        torch.testing.assert_close(g_got[n], g_ref[n], rtol=rtol, atol=atol, msg=n)


@pytest.mark.parametrize("do_offload,tile", [(True, None), (True, 16), (False, 16), (True, 7)])
def test_same_loss_and_lora_gradients_as_plain_training(do_offload, tile):
    ref = tiny_qlora()
    ours = copy.deepcopy(ref)
    off = offload.enable(ours, offload=do_offload, tile_tokens=tile)
    ids, labels = batch(1)
    expected = grads_after_step(ref, ids, labels)
    got = grads_after_step(ours, ids, labels)
    assert_same(expected, got)
    n_layers = len(ours.model.layers)
    layer_input_bytes = ids.numel() * 64 * 4
    if do_offload:  # every layer's input went to the host and came back exactly once
        assert off.bytes_to_host == n_layers * layer_input_bytes
        assert off.bytes_to_device == n_layers * layer_input_bytes
    else:
        assert off.bytes_to_host == off.bytes_to_device == 0


def test_several_steps_with_optimizer_follow_the_plain_run():
    ref = tiny_qlora(seed=3)
    ours = copy.deepcopy(ref)
    offload.enable(ours, tile_tokens=8)
    opt_r = torch.optim.AdamW(lora_parameters(ref), lr=1e-2)
    opt_o = torch.optim.AdamW(lora_parameters(ours), lr=1e-2)
    for step in range(3):
        ids, labels = batch(10 + step)
        for m, opt in ((ref, opt_r), (ours, opt_o)):
            opt.zero_grad(set_to_none=True)
            m(input_ids=ids, labels=labels).loss.backward()
            opt.step()
    for (n, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters()):
        if isinstance(a, NF4Weight):  # the frozen 4-bit codes (no elementwise arithmetic): bit for bit
            assert torch.equal(b, a), n
        else:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("tile", [None, 16])
def test_dropout_recompute_replays_the_forward_rng(tile):
    """With LoRA dropout the recomputed layer (and each recomputed MLP tile) must draw the same
    masks as its forward did. The reference runs without checkpointing; with tiles, its MLPs run
    the same tiles through plain autograd, so the masks are drawn in the same order."""
    ref = tiny_qlora(seed=5)
    for m in ref.modules():
        if getattr(m, "lora_dropout", None) is not None:
            m.lora_dropout = torch.nn.Dropout(0.3)
    ours = copy.deepcopy(ref)
    if tile is not None:
        for layer in ref.model.layers:
            run = layer.mlp.forward
            layer.mlp.forward = lambda x, run=run: offload._run_tiles(run, x, tile)
    offload.enable(ours, tile_tokens=tile)
    ids, labels = batch(2)
    assert_same(grads_after_step(ref, ids, labels, dropout_seed=7),
                grads_after_step(ours, ids, labels, dropout_seed=7))


def test_tiles_match_untiled_under_autocast():
    ref = tiny_qlora(seed=2)
    ours = copy.deepcopy(ref)
    offload.enable(ours, offload=False, tile_tokens=9)
    ids, labels = batch(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = grads_after_step(ref, ids, labels)
        got = grads_after_step(ours, ids, labels)
    assert_same(expected, got, rtol=2e-2, atol=2e-3)


def test_enable_tiles_mlps_and_norms_and_disable_restores_them():
    model = tiny_qlora()
    layer = model.model.layers[0]
    modules = [layer.mlp, layer.input_layernorm, layer.post_attention_layernorm, model.model.norm]
    forwards = [m.forward for m in modules]
    offload.enable(model, tile_tokens=4)
    assert all(m.forward != f for m, f in zip(modules, forwards))
    offload.enable(model, tile_tokens=8)  # again: re-tiled, not tiled twice
    assert layer.mlp._qforge_untiled_forward == forwards[0]
    offload.disable(model)
    assert all(m.forward == f for m, f in zip(modules, forwards))
    assert not model.model.layers[0].gradient_checkpointing


def test_loading_twice_is_a_clear_error():
    off = offload.HostOffloader()
    handle = off.save(torch.arange(6.0))
    torch.testing.assert_close(off.load(handle), torch.arange(6.0))
    with pytest.raises(RuntimeError, match="already loaded"):
        off.load(handle)


def test_load_prefetches_the_tensor_saved_before():
    off = offload.HostOffloader()
    first, second = off.save(torch.ones(3)), off.save(torch.full((3,), 2.0))
    torch.testing.assert_close(off.load(second), torch.full((3,), 2.0))
    assert first.device_copy is not None and first.host is None  # already brought back
    torch.testing.assert_close(off.load(first), torch.ones(3))


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_tile_size_is_rejected(bad):
    with pytest.raises(ValueError, match="tile_tokens"):
        offload.enable(tiny_qlora(), tile_tokens=bad)


def test_model_without_decoder_layers_is_rejected():
    with pytest.raises(ValueError, match="GradientCheckpointingLayer"):
        offload.enable(torch.nn.Linear(3, 3))


@pytest.mark.cuda
def test_cuda_offload_matches_plain_training():
    ref = tiny_qlora().cuda()
    ours = copy.deepcopy(ref)
    off = offload.enable(ours, tile_tokens=16)
    ids, labels = (t.cuda() for t in batch(1))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = grads_after_step(ref, ids, labels)
        got = grads_after_step(ours, ids, labels)
    assert_same(expected, got, rtol=1e-2, atol=1e-3)
    assert off.bytes_to_host > 0 and off.bytes_to_host == off.bytes_to_device
