"""The tool-call parse goldens (tests/chat/make_tool_call_goldens.py): texts
that transformers + jinja2 render for assistant turns with 1-3 calls, parsed
now as when the goldens were made, equal to the calls put in, and rendered
identically by qforge."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from qforge.chat import ChatTemplate, parse_tool_calls
from test_tool_calls_roundtrip import AMBIGUOUS, EXPECTED_FORMAT
from tool_call_roundtrip import calls_of, generated_text

CHAT = Path(__file__).resolve().parents[1] / "chat"
CASES = []
for _path in sorted((CHAT / "goldens").glob("*.json")):
    _golden = json.loads(_path.read_text(encoding="utf-8"))
    for _n, _case in _golden.get("tool_call_parses", {}).items():
        CASES.append((_golden["template"], int(_n), _golden["tool_call_format"], _case))


def test_goldens_cover_the_templates_that_render_calls():
    assert len({c[0] for c in CASES}) >= 47 and len(CASES) >= 120


@pytest.mark.parametrize("name,n,fmt,case", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_golden_parse(name, n, fmt, case):
    assert fmt == EXPECTED_FORMAT[name]
    result = parse_tool_calls(case["text"], fmt)
    assert result == case["parse"]
    keep = AMBIGUOUS.get((name, n), n)
    assert calls_of(result) == case["calls"][:keep]
    # qforge renders the same turn text as jinja2
    template = ChatTemplate((CHAT / "templates" / name).read_text(encoding="utf-8"))
    assert generated_text(template, n)[0] == case["text"]
