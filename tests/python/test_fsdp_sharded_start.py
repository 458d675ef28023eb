"""Sharded start and any world size (issues 10 and 15) on the CPU over gloo:

* ``qforge.load(..., prepare_layer=distributed.layer_sharder(...))`` reads one
  decoder layer at a time and shards it at once: each rank's host memory
  grows by its shard of the 4-bit model plus about one layer, never by the
  whole model (measured as the growth of the process's peak RSS during the
  load (VmHWM, reset just before), against a whole-model load measured the
  same way);
* ``qforge train`` on 4 processes equals one process with the same global
  batch, and its sharded checkpoint resumes on 2 processes (DCP reshards).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from conftest import run_ranks  # noqa: E402
from test_fsdp_train import STEPS, adapter, assert_close_losses, losses, qforge_train  # noqa: E402

HERE = Path(__file__).resolve()
LAYERS, HIDDEN, INTERMEDIATE = 24, 512, 2048
MIB = 2**20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A Llama of 24 layers: 100M parameters, a 200 MB bf16 checkpoint, 52 MB in 4 bits."""
    out = tmp_path_factory.mktemp("sharded-start") / "model"
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                   num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=8,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(out))
    return out


def _load_in_children(model_dir: Path, world: int, sharded: bool) -> list[dict]:
    results = []
    for code, text in run_ranks([HERE, model_dir, "sharded" if sharded else "whole"], world, timeout=300):
        assert code == 0, text[-4000:]
        results.append(json.loads(text.strip().splitlines()[-1]))
    return results


def _rss(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _child(model_dir: str, mode: str) -> None:
    """Load the model (sharded: layer by layer with FSDP2 over all ranks; whole:
    one plain load) and print the growth of this process's peak RSS and what
    the model holds."""
    from qforge import distributed
    from qforge.models import load
    from qforge.models.loader import frozen_bytes
    from qforge.nn import NF4Linear

    ctx = distributed.init_from_env("cpu", timeout_s=120) if mode == "sharded" else None
    # before the baseline: what any load imports and sets up once (the model's code, the quantizer, FSDP2)
    with torch.device("meta"):
        transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(model_dir))
    NF4Linear.from_weight(torch.randn(64, 64, dtype=torch.bfloat16))
    if ctx is not None:
        distributed.shard_module(torch.nn.Linear(8 * ctx.world, 8), ctx)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak RSS (VmHWM) restarts from the current RSS
    before = _rss("VmRSS")
    lora = dict(r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules=("q_proj", "v_proj"))
    if ctx is not None:
        model = load(model_dir, device="cpu", prepare_layer=distributed.layer_sharder(ctx, False, lora, seed=0))
        distributed.finish_sharding(model, ctx)
    else:
        model = load(model_dir, device="cpu")
    peak = _rss("VmHWM") - before
    local = 0
    for p in model.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        parts = (t.packed, t.absmax) if hasattr(t, "packed") else (t,)
        local += sum(x.numel() * x.element_size() for x in parts)
    print(json.dumps({"peak_growth": peak, "local_bytes": local, "frozen_bytes": frozen_bytes(model_dir)}), flush=True)
    if ctx is not None:
        ctx.close()


def test_a_sharded_start_never_holds_the_whole_model_on_a_rank(model_dir):
    world = 2
    whole = _load_in_children(model_dir, 1, sharded=False)[0]
    ranks = _load_in_children(model_dir, world, sharded=True)
    nf4_layers = whole["frozen_bytes"] - 2 * 256 * HIDDEN * 2  # the 4-bit layers (embeddings and lm_head aside)
    layer_16bit = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE) * 2
    # what the model keeps: the whole 4-bit model on one process, about half of its layers on each rank
    assert abs(whole["local_bytes"] - whole["frozen_bytes"]) < 0.02 * whole["frozen_bytes"], whole
    for r in ranks:
        assert r["local_bytes"] < whole["local_bytes"] / world + 4 * MIB, (r, whole)
    # host memory while loading: the whole load grows by the 4-bit model; a rank by its shard + ~one layer
    assert whole["peak_growth"] > nf4_layers, whole
    for r in ranks:
        assert r["peak_growth"] < nf4_layers / world + 2 * layer_16bit + 16 * MIB, (r, nf4_layers, layer_16bit)
        assert r["peak_growth"] < whole["peak_growth"] - nf4_layers / (2 * world), (r, whole)


@pytest.fixture(scope="module")
def one_process_accum4(tmp_path_factory):
    out = tmp_path_factory.mktemp("one4") / "run"
    qforge_train(out, "--grad-accum", "4")
    return out


def test_four_processes_equal_one_with_the_same_global_batch(tmp_path, one_process_accum4):
    four = tmp_path / "four"
    r = qforge_train(four, "--save-every", "10", nproc=4, timeout=900)
    assert r.stderr.count("qforge train: FSDP2 over 4 ranks") == 1
    assert_close_losses(losses(four), losses(one_process_accum4))
    a, b = adapter(four), adapter(one_process_accum4)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    rows = [json.loads(line) for line in (four / "metrics.jsonl").read_text().splitlines()]
    assert all(len(row["mem_gib_per_rank"]) == 4 for row in rows)

    # a checkpoint of 4 processes resumes on 2 (twice the accumulation: the same global batch)
    stopped = tmp_path / "stopped"
    qforge_train(stopped, "--save-every", "10", "--stop-after", "10", nproc=4, timeout=900)
    assert (stopped / "checkpoints" / "step-000010" / "dcp" / ".metadata").exists()
    qforge_train(stopped, "--save-every", "10", "--resume", "--grad-accum", "2", nproc=2, timeout=900)
    assert_close_losses(losses(stopped), losses(one_process_accum4))
    assert len(losses(stopped)) == STEPS


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
    from qforge.distributed import exit_worker

    exit_worker()  # results written; skip the teardown that can abort on gloo
