"""bench/train_step.py's longest-context search (probe_max_seq) against fake attempts."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))  # as when the bench runs: its helpers (_record) sit beside it
_spec = importlib.util.spec_from_file_location("train_step_bench", BENCH / "train_step.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def fake(memory_limit=None, time_limit=None):
    tried = []

    def attempt(seq):
        tried.append(seq)
        if time_limit is not None and seq > time_limit:
            return "time"
        if memory_limit is not None and seq > memory_limit:
            return "memory"
        return None

    return attempt, tried


@pytest.mark.parametrize("memory_limit", [140000, 300001, 777777])
def test_memory_bound_is_found_within_the_resolution(memory_limit):
    attempt, tried = fake(memory_limit=memory_limit)
    r = bench.probe_max_seq(attempt, 131072, 1 << 20, 8192)
    assert r["limit"] == "memory"
    assert memory_limit - 8192 - 256 <= r["tokens"] <= memory_limit
    assert len(tried) == len(set(tried)) <= math.log2((1 << 20) / 131072) + math.log2((1 << 20) / 8192) + 2
    assert [a["seq"] for a in r["attempts"]] == tried


def test_time_limit_stops_the_search_at_once():
    attempt, tried = fake(memory_limit=900000, time_limit=200000)
    r = bench.probe_max_seq(attempt, 131072, 1 << 20, 8192)
    assert r == dict(tokens=131072, limit="time", attempts=[dict(seq=131072, ok=True, limit=None),
                                                           dict(seq=262144, ok=False, limit="time")])


def test_reaching_the_maximum_and_failing_at_the_start():
    attempt, _ = fake()
    assert bench.probe_max_seq(attempt, 4096, 65536, 1024)["tokens"] == 65536
    attempt, tried = fake(memory_limit=1000)
    r = bench.probe_max_seq(attempt, 4096, 65536, 1024)
    assert r["tokens"] is None and r["limit"] == "memory" and tried == [4096]


@pytest.mark.parametrize("args", [(0, 10, 1), (20, 10, 1), (4, 10, 0)])
def test_bad_arguments_are_rejected(args):
    with pytest.raises(ValueError, match="probe_max_seq"):
        bench.probe_max_seq(lambda s: None, *args)


def test_a_missing_unsloth_bundle_is_reported_and_the_other_runs_still_run(tmp_path):
    """Without the Unsloth bundle its entry says why; qforge's run and the JSON still come out."""
    import json
    import subprocess

    pytest.importorskip("transformers")
    from conftest import child_env

    out = tmp_path / "train_step.json"
    argv = [sys.executable, str(BENCH / "train_step.py"), "--device", "cpu", "--layers", "1", "--hidden", "32",
            "--intermediate", "48", "--heads", "2", "--kv-heads", "1", "--vocab", "64", "--seq", "16", "--batch", "1",
            "--steps", "1", "--warmup", "0", "--impls", "qforge,unsloth", "--fused-layers", "on",
            "--unsloth-anchor", str(tmp_path / "no-bundle"), "--workdir", str(tmp_path), "--out", str(out)]
    subprocess.run(argv, env=child_env(), check=True, timeout=300, capture_output=True)
    record = json.loads(out.read_text())
    assert record["qforge"]["tokens_per_s"] > 0 and "error" not in record["qforge"]
    assert "site is missing" in record["unsloth"]["error"] and "tokens_per_s" not in record["unsloth"]
