"""`qforge train` under torchrun (FSDP2 over gloo, two CPU processes) against
one process with the same global batch: per-step losses, the adapter, CPU
offload, fused decoder layers (qforge.decoder), sharded checkpoints (torch.distributed.checkpoint) resumed on two
processes and on one, per-rank memory in metrics.jsonl, and the collective
timeout and disagreement check that keep a broken run from hanging."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import qforge
from conftest import run_ranks

pytest.importorskip("transformers")

STEPS = 20
HERE = Path(__file__).resolve()


def _env():
    root = str(Path(qforge.__file__).resolve().parents[1])
    return dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1")


def qforge_train(out: Path, *extra: str, nproc: int = 1, timeout: int = 420) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "qforge", "train", "--output", str(out), "--max-steps", str(STEPS), "--no-progress",
           *extra]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    return r


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


def adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_close_losses(a, b, rtol=1e-5):
    assert len(a) == len(b) == STEPS
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    assert worst <= rtol, (worst, a, b)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    qforge_train(out, "--grad-accum", "2")
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    r = qforge_train(out, "--save-every", "5", nproc=2)
    return out, r


def test_two_processes_equal_one_with_the_same_global_batch(one_process, two_processes):
    two, r = two_processes
    assert_close_losses(losses(two), losses(one_process))
    a, b = adapter(two), adapter(one_process)
    assert set(a) == set(b) and len(a) == 2 * 7 * 2  # lora_A and lora_B of 7 projections in 2 layers
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert all(len(row["mem_gib_per_rank"]) == 2 and all(m > 0 for m in row["mem_gib_per_rank"]) for row in rows)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and len(summary["peak_mem_gib_per_rank"]) == 2
    # rank 0 alone prints: one start line, one loss line
    assert r.stderr.count("qforge train: FSDP2 over 2 ranks") == 1 and r.stdout.count("(mean of first/last") == 1
    assert json.loads((two / "train_args.json").read_text())["world_size"] == 2


def test_adapter_of_a_sharded_run_loads_in_peft(two_processes):
    peft = pytest.importorskip("peft")
    import transformers

    two, _ = two_processes
    base = transformers.AutoModelForCausalLM.from_pretrained(str(two / "base-model"))
    model = peft.PeftModel.from_pretrained(base, str(two / "adapter"))
    ours = adapter(two)
    theirs = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(theirs) == len(ours)
    for k, v in ours.items():
        peft_key = k.replace(".weight", ".default.weight")
        assert torch.equal(theirs[peft_key], v), k


def test_cpu_offload_trains_the_same_job(tmp_path, one_process):
    out = tmp_path / "offload"
    r = qforge_train(out, "--offload", "on", nproc=2)
    assert "CPU offload on (--offload on)" in r.stderr
    assert_close_losses(losses(out), losses(one_process))


def test_fused_layers_under_fsdp2_train_the_same_job(tmp_path, one_process):
    out = tmp_path / "fused"
    r = qforge_train(out, "--fused-layers", "on", nproc=2)
    assert r.stderr.count("qforge train: fused decoder layers: on (2 layers, hand-written backward)") == 1
    assert "checkpointed recompute instead" not in r.stderr  # every layer call ran fused
    assert_close_losses(losses(out), losses(one_process))  # one process, checkpointing off
    a, b = adapter(out), adapter(one_process)
    for k in a:  # AdamW's normalized steps make the fused layers' fp32 rounding ~1e-6 after 20 steps
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_sharded_checkpoint_resumes_on_two_and_on_one(tmp_path, two_processes, one_process):
    two, _ = two_processes
    stopped = tmp_path / "stopped"
    qforge_train(stopped, "--save-every", "5", "--stop-after", "10", nproc=2)
    ckpt = stopped / "checkpoints" / "step-000010"
    assert (ckpt / "dcp" / ".metadata").exists() and (ckpt / "rng-1.pt").exists()
    assert not list((stopped / "checkpoints").glob(".*"))  # complete or absent: no temporary left
    assert not (stopped / "adapter").exists()
    on_two, on_one = tmp_path / "on_two", tmp_path / "on_one"
    subprocess.run(["cp", "-r", str(stopped), str(on_two)], check=True)
    subprocess.run(["cp", "-r", str(stopped), str(on_one)], check=True)
    qforge_train(on_two, "--save-every", "5", "--resume", nproc=2)
    # same world size: bit for bit the uninterrupted run
    assert losses(on_two) == losses(two)
    a, b = adapter(on_two), adapter(two)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # another world size (one process, twice the accumulation: the same global batch)
    qforge_train(on_one, "--save-every", "5", "--resume", "--grad-accum", "2")
    assert_close_losses(losses(on_one), losses(one_process))


# ------------------------------------------------------------------ failures stop, never hang
def _run_workers(mode: str, timeout: int = 120) -> list[tuple[int, str]]:
    return run_ranks([HERE, mode], 2, timeout)


def test_ranks_that_disagree_stop_with_the_difference_named():
    results = _run_workers("disagree")
    for code, text in results:
        assert code == 3, text[-3000:]
        assert "the 2 ranks disagree on data" in text and "rank 0='a'" in text and "rank 1='b'" in text, text[-3000:]


def test_a_missing_rank_fails_the_collective_within_the_timeout():
    t0 = time.monotonic()
    results = _run_workers("absent")
    code, text = results[0]
    assert code == 4, text[-3000:]  # rank 0's all-reduce raised instead of waiting for ever
    assert time.monotonic() - t0 < 60


def _worker(mode: str) -> None:
    from qforge import distributed

    ctx = distributed.init_from_env("cpu", timeout_s=5)
    if mode == "disagree":
        try:
            distributed.check_same_on_all_ranks(ctx, {"data": "ab"[ctx.rank], "lr": 1})
        except ValueError as e:
            print(e, flush=True)
            ctx.close()
            distributed.exit_worker(3)
    elif mode == "absent":
        if ctx.rank == 1:
            time.sleep(20)  # stuck elsewhere: never joins the all-reduce
            os._exit(0)
        try:
            ctx.sum(1.0)
        except RuntimeError as e:
            print(f"collective failed: {e}", flush=True)
            os._exit(4)
    sys.exit(0)


if __name__ == "__main__":
    _worker(sys.argv[1])
