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
        if expected["error"]["type"] == "TemplateError":  # raise_exception(...): same message
            assert isinstance(info.value, TemplateError)
            assert info.value.message == expected["error"]["message"]
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
