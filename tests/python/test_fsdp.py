"""FSDP2 (torch.distributed.fsdp.fully_shard) on a QLoRA model, two CPU processes
over gloo: per-decoder-layer sharding of the NF4 storage, the sharded run's loss
and LoRA gradients equal to one process on the whole batch (also with
qforge.decoder's fused layers, which FSDP2 unshards before their forward and
their hand-written backward), and a MixedPrecisionPolicy that casts the float
parameters but leaves the packed 4-bit codes and their statistics untouched
(uint8, bit-identical)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_ranks

transformers = pytest.importorskip("transformers")

WORLD = 2
HERE = Path(__file__).resolve()


def build_model(seed=0):
    from qforge import hf
    from qforge.nn import add_lora, replace_linears

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   initializer_range=0.05, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    replace_linears(model)  # every q/k/v/o/gate/up/down -> NF4
    add_lora(model, r=4, lora_alpha=8, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero B so that A gets gradients too
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    hf.patch_causal_lm(model)
    model.train()
    return model


def batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 128, (WORLD, 24), generator=g)
    return ids, ids.clone()


def lora_grads(model):
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


# qforge.decoder's fused layers under FSDP2: "fused" as qforge train does it (enable() between the
# layers' fully_shard and the root's; layers resharded after forward; MLP in token tiles), and
# "fused-offload" with the saves in host memory, enable() before any fully_shard, layers kept gathered.
FUSED = {"fused": dict(offload=False, tile_tokens=16, early=False, reshard=True),
         "fused-offload": dict(offload=True, tile_tokens=None, early=True, reshard=False)}


def record_fused_layers(seen: dict, describe) -> None:
    """Record, as each fused layer's forward and hand-written backward start, what its seven
    projections hold (describe(stage, module) -> (key, dict))."""
    from qforge import decoder

    fn = decoder._DecoderLayer
    forward, backward = fn.forward, fn.backward

    def check(stage, lay):
        for lin in lay.projections:
            key, value = describe(stage, lin)
            seen[key] = value

    def recorded_forward(ctx, lay, *args):
        check("fused forward", lay)
        return forward(ctx, lay, *args)

    def recorded_backward(ctx, dy):
        check("fused backward", ctx.lay)
        return backward(ctx, dy)

    fn.forward, fn.backward = staticmethod(recorded_forward), staticmethod(recorded_backward)


def worker(out: str, mode: str) -> None:
    import warnings

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from qforge import decoder
    from qforge.nn import NF4Linear

    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    ids, labels = batch()

    # single-process reference on the whole batch (every rank computes it)
    ref = build_model()
    ref_loss = ref(input_ids=ids, labels=labels).loss
    ref_loss.backward()
    ref_grads = lora_grads(ref)
    originals = {n: (m.weight.packed.clone(), m.weight.absmax.clone())
                 for n, m in ref.named_modules() if isinstance(m, NF4Linear)}

    model = build_model()
    if mode == "ckpt":  # activation checkpointing under FSDP2: recompute re-gathers and re-dequantizes
        model.activation_checkpointing_enable({"use_reentrant": False})
    mesh = init_device_mesh("cpu", (WORLD,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mode == "bf16" \
        else MixedPrecisionPolicy()
    fused = FUSED.get(mode)
    status = None
    if fused and fused["early"]:
        status = decoder.enable(model, offload=fused["offload"], tile_tokens=fused["tile_tokens"])
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=not fused or fused["reshard"])
    if fused and not fused["early"]:
        status = decoder.enable(model, offload=fused["offload"], tile_tokens=fused["tile_tokens"])
    fully_shard(model, mesh=mesh, mp_policy=mp)

    seen = {}
    names = {m: n for n, m in model.named_modules()}

    def describe(mod, x_dtype):
        name, w = names[mod], mod.weight
        return {"weight_dtype": w.packed.dtype, "absmax_dtype": w.absmax.dtype,
                "weight_equal": torch.equal(w.packed, originals[name][0]),
                "absmax_equal": torch.equal(w.absmax, originals[name][1]),
                "lora_dtype": mod.lora_A.weight.dtype, "x_dtype": x_dtype,
                "nested_dtype": w.nested_absmax.dtype, "lora_shape": tuple(mod.lora_A.weight.shape)}

    def record(name):
        def hook(mod, args):
            seen[name] = describe(mod, args[0].dtype)
        return hook

    for n, m in model.named_modules():
        if isinstance(m, NF4Linear):
            m.register_forward_pre_hook(record(n))
    if fused:
        record_fused_layers(seen, lambda stage, mod: (f"{stage} {names[mod]}", describe(mod, None)))
    q = model.model.layers[0].self_attn.q_proj
    local = q.weight.to_local()
    shard_info = {"type": type(q.weight).__name__, "local_type": type(local).__name__,
                  "packed_dtype": local.packed.dtype, "absmax_dtype": local.absmax.dtype,
                  "local_rows": local.shape[0], "global_rows": q.weight.shape[0],
                  "local_bytes": local.packed.numel(), "global_bytes": originals["model.layers.0.self_attn.q_proj"][0].numel(),
                  "lm_head": type(model.lm_head.weight).__name__, "embed": type(model.model.embed_tokens.weight).__name__}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = model(input_ids=ids[rank:rank + 1], labels=labels[rank:rank + 1]).loss
        loss.backward()
    grads = lora_grads(model)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= WORLD
    if rank == 0:
        torch.save({"ref_loss": ref_loss.detach(), "loss": mean_loss, "ref_grads": ref_grads, "grads": grads,
                    "seen": seen, "shard": shard_info, "status": str(status), "nf4": sorted(originals),
                    "lora_shapes": {n: tuple(m.lora_A.weight.shape) for n, m in ref.named_modules()
                                    if isinstance(m, NF4Linear)},
                    "warnings": [str(w.message) for w in caught]}, out)
    dist.barrier()
    dist.destroy_process_group()


def run_fsdp(tmp_path, mode):
    out = tmp_path / f"fsdp-{mode}.pt"
    ranks = run_ranks([HERE, out, mode], WORLD, timeout=240)
    assert all(code == 0 for code, _ in ranks), "\n".join(text for _, text in ranks)[-4000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("mode", ["fp32", "ckpt"])
def test_fsdp2_sharded_equals_single_process(tmp_path, mode):
    r = run_fsdp(tmp_path, mode)
    # the NF4 storage is sharded per decoder layer, as uint8 codes inside an NF4Weight shard
    s = r["shard"]
    assert s["type"] == "DTensor" and s["local_type"] == "NF4Weight"
    assert s["packed_dtype"] == torch.uint8 and s["absmax_dtype"] == torch.uint8
    assert s["local_rows"] * WORLD == s["global_rows"] and s["local_bytes"] * WORLD == s["global_bytes"]
    assert s["lm_head"] == "DTensor" and s["embed"] == "DTensor"  # the root shards embeddings and lm_head
    # unsharded for compute: bit-identical to the unsharded model's storage
    assert len(r["seen"]) == 14 and all(s["weight_equal"] and s["absmax_equal"] for s in r["seen"].values())
    torch.testing.assert_close(r["loss"], r["ref_loss"], rtol=1e-6, atol=1e-6)
    assert set(r["grads"]) == set(r["ref_grads"]) and len(r["grads"]) == 28
    for name, g in r["grads"].items():
        torch.testing.assert_close(g, r["ref_grads"][name], rtol=1e-5, atol=1e-6, msg=name)
        assert g.abs().sum() > 0, name


@pytest.mark.parametrize("mode", sorted(FUSED))
def test_fused_decoder_layers_under_fsdp2_equal_one_unfused_process(tmp_path, mode):
    r = run_fsdp(tmp_path, mode)
    assert r["status"] == "fused decoder layers: on (2 layers, hand-written backward)"
    # no projection ran as a module (transformers' layer): all ran inside the fused layers, whose
    # forward and backward each found every NF4 weight and LoRA weight gathered by FSDP2
    assert set(r["seen"]) == {f"fused {stage} {name}" for stage in ("forward", "backward") for name in r["nf4"]}
    for key, s in r["seen"].items():
        name = key.split()[-1]
        assert s["weight_dtype"] == torch.uint8 and s["absmax_dtype"] == torch.uint8, key
        assert s["weight_equal"] and s["absmax_equal"], key  # the whole codes, bit for bit
        assert s["lora_shape"] == r["lora_shapes"][name] and s["lora_dtype"] == torch.float32, key
    assert not [w for w in r["warnings"] if "FSDP" in w], r["warnings"]  # e.g. a layer output that is a view
    torch.testing.assert_close(r["loss"], r["ref_loss"], rtol=1e-6, atol=1e-6)
    assert set(r["grads"]) == set(r["ref_grads"]) and len(r["grads"]) == 28
    for name, g in r["grads"].items():  # reduce-scattered over the ranks' halves of the batch
        torch.testing.assert_close(g, r["ref_grads"][name], rtol=1e-5, atol=1e-6, msg=name)
        assert g.abs().sum() > 0, name


def test_fsdp2_mixed_precision_never_casts_nf4_storage(tmp_path):
    r = run_fsdp(tmp_path, "bf16")
    for name, s in r["seen"].items():
        assert s["weight_dtype"] == torch.uint8 and s["absmax_dtype"] == torch.uint8, name
        assert s["weight_equal"] and s["absmax_equal"], name  # no bit of the codes changed
        assert s["nested_dtype"] == torch.float32, name  # statistics buffers are never cast
        assert s["lora_dtype"] == torch.bfloat16, name  # the policy is active on float parameters
    torch.testing.assert_close(r["loss"], r["ref_loss"], rtol=2e-2, atol=2e-2)
    for name, g in r["grads"].items():
        assert g.dtype == torch.float32  # sharded grads keep the fp32 master dtype
        rel = (g - r["ref_grads"][name]).norm() / r["ref_grads"][name].norm()
        assert rel < 0.1, (name, float(rel))


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
    from qforge.distributed import exit_worker

    exit_worker()  # results written; skip the teardown that can abort on gloo
