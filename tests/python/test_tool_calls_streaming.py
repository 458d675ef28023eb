"""Incremental tool-call parsing: every round-trip text of every template fed
in random chunk sizes ends in the one-shot result, and no call is reported
before its text is complete."""
from __future__ import annotations

import random

import pytest

from qforge.chat import ChatTemplate, ToolCallStream, parse_tool_calls
from tool_call_roundtrip import TEMPLATES, generated_text

CASES = []
for _path in sorted(TEMPLATES.glob("*.jinja")):
    _tmpl = ChatTemplate(_path.read_text(encoding="utf-8"))
    for _n in (1, 2, 3):
        _rendered = generated_text(_tmpl, _n)
        if _rendered is not None:
            CASES.append((_path.name, _n, _rendered[0], _tmpl.tool_call_format))


def chunks(text: str, rng: random.Random) -> list[str]:
    out, i = [], 0
    while i < len(text):
        k = rng.choice([1, 1, 2, 3, 5, 8, 13, 40])
        out.append(text[i:i + k])
        i += k
    return out


def test_there_are_cases():
    assert len(CASES) > 100


@pytest.mark.parametrize("name,n,text,fmt", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_random_chunkings_end_in_the_one_shot_result(name, n, text, fmt):
    final = parse_tool_calls(text, fmt)
    assert final["error"] is None
    for seed in range(3):
        rng = random.Random(seed)
        stream = ToolCallStream(fmt)
        seen = []
        fed = ""
        for piece in chunks(text, rng):
            fed += piece
            now = stream.feed(piece)
            calls = now["tool_calls"]
            # reported calls are complete: never more than the text so far
            # holds, each one final, and they only grow
            assert calls == final["tool_calls"][:len(calls)], (fed, now)
            assert len(calls) >= len(seen)
            seen = calls
            assert now["error"] is None
        assert stream.finish() == final


def test_a_half_written_call_is_not_reported_and_content_is_not_retracted():
    stream = ToolCallStream("hermes")
    text = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    contents = []
    for i in range(len(text)):
        r = stream.feed(text[i])
        if i < text.index("}}"):
            assert r["tool_calls"] == []
        contents.append(r["content"])
    assert r["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    # "<tool_c..." is held back: the content only grows through "Sure.\n",
    # never shows marker text that a later chunk would take away
    assert all(c is None or "Sure.\n".startswith(c) for c in contents), set(contents)


def test_stream_reports_reasoning_as_it_grows():
    stream = ToolCallStream("deepseek")
    r = stream.feed("<think>Let me")
    assert r["reasoning_content"] == "Let me" and r["content"] is None
    r = stream.feed(" think.</think>The answer is 4.")
    assert r["reasoning_content"] == "Let me think." and r["content"] == "The answer is 4."


def test_stream_keeps_a_malformed_call_for_finish():
    stream = ToolCallStream("mistral")
    stream.feed('[TOOL_CALLS]f[ARGS]{"a": ')
    r = stream.feed("oops")
    assert r["tool_calls"] == [] and r["error"] is None
    final = stream.finish()
    assert final["error"] and final["content"] == '[TOOL_CALLS]f[ARGS]{"a": oops'


def test_unknown_stream_format_is_an_error():
    with pytest.raises(ValueError, match="unknown tool-call format"):
        ToolCallStream("nope")
