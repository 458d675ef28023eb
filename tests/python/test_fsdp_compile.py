"""`qforge train --compile` under torchrun: FSDP2 over gloo, two CPU processes. Each decoder layer
is compiled on its own (fullgraph=True, its gradient checkpoint inside) with FSDP2's hooks left
outside, as torchtitan compiles under FSDP2: the losses over packed rows of varied lengths equal
the eager FSDP2 run and one process with the same global batch, the layers share at most 3
compilations, nothing breaks a graph, the default job's closing eval generates through the eager
layers, and an FSDP2 unit inside a decoder layer (its hooks would fall inside the graph) is refused
with a message naming it."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from conftest import run_ranks  # noqa: E402
from test_fsdp_train import STEPS, assert_close_losses  # noqa: E402

HERE = Path(__file__).resolve()
RUN = dict(max_steps=STEPS, gradient_checkpointing=True, max_seq_length=1024, tokens_per_batch=512, lr=4e-3,
           warmup_steps=2, lora_r=8, lora_alpha=16.0, progress=False)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The embedded default model + tokenizer, built once."""
    from qforge import train as T
    from qforge.data import builtin_dataset

    return T._prepare_default_model(tmp_path_factory.mktemp("default"), builtin_dataset(seed=0), seed=0)


def run_two(mode: str, base: Path, out: Path, timeout: int = 300) -> tuple[dict, str]:
    """Two ranks of this file's worker; rank 0's result and both ranks' output."""
    ranks = run_ranks([HERE, mode, base, out], 2, timeout)
    log = "\n".join(text for _, text in ranks)
    assert all(code == 0 for code, _ in ranks), log[-6000:]
    return json.loads((out / "result.json").read_text()), log


def test_compiled_layers_under_fsdp2_train_like_eager_and_compile_at_most_three_times(tmp_path, base_dir):
    from qforge import train as T

    compiled, log = run_two("compiled", base_dir, tmp_path / "compiled")
    eager, _ = run_two("eager", base_dir, tmp_path / "eager")
    one = T.train(model=str(base_dir), output=str(tmp_path / "one"), grad_accum=2, **RUN)  # the same global batch
    assert_close_losses(compiled["losses"], eager["losses"])
    assert_close_losses(compiled["losses"], one["losses"])
    assert len(set(compiled["tokens"])) >= 4  # the lengths did vary
    report = compiled["compile"]
    assert report["regions"] == "decoder layers"
    # both layers share one code object: the first layer's input needs no gradient, the second's
    # does, which is the one recompilation; lengths never recompile
    assert 1 <= report["compilations"] <= 3, report
    assert len(report["recompile_reasons"]) == report["compilations"] - 1
    assert all("requires_grad" in r for r in report["recompile_reasons"]), report["recompile_reasons"]
    assert compiled["graph_breaks"] == 0 and compiled["compiled_layers"] == 2
    assert eager["compile"] is None and eager["compiled_layers"] == 0
    assert log.count("--compile under FSDP2 compiles each decoder layer") == 1  # said once, by rank 0


def test_generation_after_compiled_layers_runs_the_eager_layers(tmp_path):
    """The default job under torchrun with --compile: every rank's closing eval compiles nothing
    (through the layers' graphs it recompiled them for no grad and the KV cache), and its replies
    are those of the saved adapter on one process's model, never compiled."""
    from qforge import evaluate as E, load, load_adapter, load_tokenizer
    from qforge import train as T
    from qforge.data import builtin_dataset, template_for

    out = tmp_path / "eval"
    r, _ = run_two("eval", out, out)
    assert r["regions"] == "decoder layers" and r["compilations"] >= 1  # training ran compiled
    assert r["eval_compilations"] == [[0], [0]], r  # one eval on each rank
    model = load(out / "base-model", dtype=torch.float32, device="cpu")
    load_adapter(model, out / "adapter")
    tokenizer = load_tokenizer(out / "base-model")
    eager = E.evaluate_model(model, tokenizer, template_for(tokenizer, "llama", with_tools=True),
                             builtin_dataset(8, seed=T.TrainArgs().seed + 1), max_new_tokens=48)
    replies = [t["reply"] for t in json.loads((out / "eval.json").read_text())["turns"]]
    assert len(replies) == 14 and any(replies)
    assert replies == [t["reply"] for t in eager["turns"]]


def test_an_fsdp_unit_inside_a_decoder_layer_is_refused(tmp_path, base_dir):
    r, _ = run_two("nested", base_dir, tmp_path / "nested")
    assert "compiles each decoder layer with FSDP2's hooks outside" in r["error"]
    assert "model.layers.0.mlp" in r["error"]


def _worker(mode: str, base: str, out: str) -> None:
    from torch._dynamo.utils import counters

    from qforge import train as T

    out = Path(out)
    if mode == "nested":
        out.mkdir(parents=True, exist_ok=True)
        result = {"error": _nested_error(base)}
    elif mode == "eval":
        result = _default_job_eval(out)
    else:
        counters.clear()
        s = T.train(model=base, output=str(out), compile=mode == "compiled", compile_backend="aot_eager", **RUN)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        layers = s["model"].model.layers
        result = {"losses": s["losses"], "tokens": [r["tokens"] for r in rows], "compile": s.get("compile"),
                  "graph_breaks": sum(counters["graph_break"].values()),
                  "compiled_layers": sum(1 for layer in layers if "forward" in vars(layer))}
    if int(os.environ["RANK"]) == 0:
        (out / "result.json").write_text(json.dumps(result))


def _default_job_eval(out: Path) -> dict:
    """The default job (its model built into ``out``), compiled, two steps: what training compiled,
    and how many compilations each rank's closing eval made."""
    import torch.distributed as dist

    from qforge import evaluate as E
    from qforge import train as T
    from qforge.compile import CompileWatch

    counts = []  # of each eval on this rank
    evaluate_model = E.evaluate_model

    def watched(*args, **kwargs):
        with CompileWatch() as watch:
            report = evaluate_model(*args, **kwargs)
        counts.append(watch.compilations + watch.backward_compilations)
        return report

    E.evaluate_model = watched
    s = T.train(output=str(out), compile=True, compile_backend="aot_eager", **{**RUN, "max_steps": 2})
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, counts)
    return {**s["compile"], "eval_compilations": per_rank}


def _nested_error(base: str) -> str:
    """compile_for_training on a model whose first layer's MLP is an FSDP2 unit of its own."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from qforge import distributed, load
    from qforge.compile import compile_for_training

    ctx = distributed.init_from_env("cpu")
    model = load(base, dtype=torch.float32, device="cpu")
    fully_shard(model.model.layers[0].mlp, mesh=ctx.mesh)
    distributed.shard_model(model, ctx)
    try:
        compile_for_training(model, "aot_eager")
    except ValueError as e:
        return str(e)
    finally:
        dist.destroy_process_group()
    return "no error"


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
    from qforge.distributed import exit_worker

    exit_worker()  # results written; skip the teardown that can abort on gloo
