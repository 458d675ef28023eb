"""bench/chat_render_engine (the C++ side of bench/chat_render.py, built with
the tests) renders what jinja2 renders, byte for byte, and refuses bad input
with a clear message. Its speed is measured by the benchmark, not here."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ctu = pytest.importorskip("transformers.utils.chat_template_utils")

sys.path.insert(0, str(ROOT / "bench"))  # as when the bench runs: its helpers (_record) sit beside it
spec = importlib.util.spec_from_file_location("chat_render_bench", ROOT / "bench" / "chat_render.py")
bench = importlib.util.module_from_spec(spec)
sys.modules["chat_render_bench"] = bench
spec.loader.exec_module(bench)

TEMPLATES = ["meta-llama-Llama-3.1-8B-Instruct.jinja", "Qwen-Qwen3-0.6B.jinja"]


@pytest.mark.parametrize("template", TEMPLATES)
def test_engine_program_equals_jinja2(template):
    program = bench.engine_program()
    convs = bench.conversations(40, seed=7)
    kwargs = dict(bench.SPECIAL, date_string="15 Jan 2026")
    shared = dict(tools=bench.TOOLS, add_generation_prompt=True, **kwargs)
    got = bench.run_engine_program(program, template, shared, convs, repeats=2)
    source = (bench.CHAT / "templates" / template).read_text(encoding="utf-8")
    py_tmpl = ctu._compile_jinja_template(source)
    expected = [py_tmpl.render(messages=m, documents=None, **shared) for m in convs]
    assert got["conversations"] == len(convs)
    assert got["outputs"] == expected
    assert got["rendered_bytes"] == sum(len(s.encode()) for s in expected)
    assert len(got["seconds_runs"]) == 2 and got["seconds_best"] == min(got["seconds_runs"]) > 0


def test_engine_program_refuses_bad_input(tmp_path):
    program = bench.engine_program()
    template = bench.CHAT / "templates" / TEMPLATES[0]
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps({"shared": {}, "conversations": {"not": "a list"}}))
    run = subprocess.run([str(program), str(template), str(requests), str(tmp_path / "out.json")],
                         capture_output=True, text=True)
    assert run.returncode == 1
    assert "expected {\"shared\": {...}, \"conversations\": [...]}" in run.stderr
    assert not (tmp_path / "out.json").exists()

    requests.write_text('{"shared": {}, "conversations": [[{"role": "user"')
    run = subprocess.run([str(program), str(template), str(requests), str(tmp_path / "out.json")],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "chat_render_engine:" in run.stderr

    run = subprocess.run([str(program)], capture_output=True, text=True)
    assert run.returncode == 2 and "usage:" in run.stderr
