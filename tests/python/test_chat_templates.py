"""Every template x every conversation: qforge's C++ engine against the goldens
that tests/chat/make_goldens.py made with transformers + jinja2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from qforge.chat import ChatTemplate, TemplateError

CHAT = Path(__file__).resolve().parents[1] / "chat"
REQUESTS = json.loads((CHAT / "conversations.json").read_text(encoding="utf-8"))
GOLDENS = sorted((CHAT / "goldens").glob("*.json"))
_compiled: dict[str, ChatTemplate | Exception] = {}


def compiled(name: str):
    if name not in _compiled:
        try:
            _compiled[name] = ChatTemplate((CHAT / "templates" / name).read_text(encoding="utf-8"))
        except TemplateError as e:
            _compiled[name] = e
    return _compiled[name]


def qforge_render(name: str, req: dict, now: int):
    tmpl = compiled(name)
    if isinstance(tmpl, Exception):
        raise tmpl
    req = dict(req)
    messages = req.pop("messages")
    track = "generation" in tmpl.source
    return tmpl.apply(messages, now=now, return_assistant_spans=track, **req)


def cases():
    for path in GOLDENS:
        golden = json.loads(path.read_text(encoding="utf-8"))
        for conv, expected in golden["cases"].items():
            yield pytest.param(golden["template"], conv, expected, golden["now"], id=f"{path.stem}-{conv}")


@pytest.mark.parametrize("template,conv,expected,now", list(cases()))
def test_template_matches_jinja2(template, conv, expected, now):
    req = REQUESTS[conv]
    if "error" in expected:
        with pytest.raises((TemplateError, ValueError, TypeError)) as info:
            qforge_render(template, req, now)
        if isinstance(info.value, TemplateError):  # same exception class and message as Python
            assert (info.value.kind, info.value.message) == (expected["error"]["type"], expected["error"]["message"])
        else:  # apply_chat_template's own checks (continue_final_message, ...): ValueError in both
            assert expected["error"]["type"] == "ValueError"
        return
    got = qforge_render(template, req, now)
    if "generation" in expected:
        text, spans = got
        assert [list(s) for s in spans] == expected["generation"]
        got = text
    assert got == expected["output"]


def test_every_template_has_goldens():
    names = {p.name for p in (CHAT / "templates").glob("*.jinja")}
    assert len(names) >= 60
    assert {json.loads(p.read_text())["template"] for p in GOLDENS} == names


@pytest.mark.parametrize("template", ["meta-llama-Llama-3.1-8B-Instruct.jinja", "Qwen-Qwen3-0.6B.jinja",
                                      "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja"])
def test_batch_equals_single_renders(template):
    golden = json.loads((CHAT / "goldens" / (template[: -len(".jinja")] + ".json")).read_text(encoding="utf-8"))
    shared = dict(REQUESTS["tool_result"])
    del shared["messages"]
    names = [c for c in ("tool_result", "one_tool_call", "several_tool_calls", "unicode", "nested_json_args",
                         "tools_mid_history") if "output" in golden["cases"][c]]  # those the template accepts
    assert len(names) >= 4
    convs = [REQUESTS[c]["messages"] for c in names]
    tmpl = compiled(template)
    for threads in (1, 3):
        batch = tmpl.apply_batch(convs, now=golden["now"], threads=threads, **shared)
        single = [tmpl.apply(m, now=golden["now"], **shared) for m in convs]
        assert batch == single
    assert batch[0] == golden["cases"]["tool_result"]["output"]


def test_batch_reports_the_failing_conversation():
    tmpl = compiled("google-gemma-2-2b-it.jinja")
    ok = [{"role": "user", "content": "hi"}]
    bad = [{"role": "system", "content": "no system role here"}, {"role": "user", "content": "hi"}]
    with pytest.raises(TemplateError, match="conversation 2: System role not supported"):
        tmpl.apply_batch([ok, ok, bad, ok], threads=2)
