"""bench/_record.py: every results-writing bench records `device` and
`versions` the same way."""
import re
import sys
import types
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import _record  # noqa: E402


def test_environment_names_the_machine_and_the_versions(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    env = _record.environment(["torch", "surely_not_a_package_qf"])
    assert set(env) == {"device", "versions", "date"}
    assert env["device"]["cores"] >= 1 and env["device"]["cpu"]
    assert "gpu" not in env["device"]
    v = env["versions"]
    assert v["python"] == ".".join(map(str, sys.version_info[:3]))
    assert v["torch"] == torch.__version__
    assert v["surely_not_a_package_qf"] == _record.NOT_INSTALLED
    import qforge

    assert v["qforge"] == qforge.__version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", env["date"])


def test_an_imported_module_shadowing_the_installed_one_reports_its_own_version(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_shadow_qf", types.SimpleNamespace(__version__="9.9.9"))
    assert _record.package_version("torch_shadow_qf") == "9.9.9"


def test_gpu_described_by_name_sms_memory_and_driver(monkeypatch):
    props = types.SimpleNamespace(name="Fake GPU", multi_processor_count=132, total_memory=3 * 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(_record, "_run", lambda cmd: "555.42" if cmd[0] == "nvidia-smi" else None)
    d = _record.device()
    assert d["gpu"] == "Fake GPU, 132 SMs, 3.0 GiB" and d["gpu_count"] == 2 and d["driver"] == "555.42"


def test_a_missing_command_is_recorded_as_none():
    assert _record._run(["surely-not-a-command-qf"]) is None


def test_every_results_writing_bench_records_through_record():
    writers = [p for p in BENCH.glob("*.py") if p.name != "_record.py"
               and re.search(r"json\.dump\(|write_text\(json", p.read_text())]  # a file written, not json printed
    assert len(writers) >= 7, writers
    for path in writers:
        src = path.read_text()
        assert "from _record import" in src and "environment(" in src, path.name
        # no hand-made fields beside it
        assert not re.search(r"""(["']device["']\s*:|\bdevice=torch|versions=dict|["']versions["']\s*:\s*\{)""", src), path.name
