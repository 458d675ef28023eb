"""Randomised differential test: random conversations (roles, unicode and
JSON-ish content, tool calls with nested arguments, reasoning, parts) through
every template, qforge vs jinja2 configured by transformers. A conversation a
template rejects must be rejected by both. 12 conversations per template by
default; QF_RANDOM_N=400 QF_RANDOM_SEED=<salt> for a longer hunt."""
from __future__ import annotations

import copy
import json
import random
import sys
from pathlib import Path

import pytest

from qforge.chat import ChatTemplate, TemplateError

ctu = pytest.importorskip("transformers.utils.chat_template_utils")

CHAT = Path(__file__).resolve().parents[1] / "chat"
sys.path.insert(0, str(CHAT))
from conversations import SPECIAL, TOOLS, call  # noqa: E402
from make_goldens import NOW_EPOCH, compile_pinned  # noqa: E402

TEMPLATES = sorted(p.name for p in (CHAT / "templates").glob("*.jinja"))
PIECES = ["hello", "wörld", "日本語", "🚀", "\n", "\n\n", "  ", "\t", "'", '"', "\\", "{", "}", "{{", "%}", "<b>",
          "&", "null", "1.5", "-0", "e+10", "</s>", "<|eot_id|>", "[", "]", ":", ",", "ß", "€", "\u2028", "tool"]


def text(rng, k=8):
    return "".join(rng.choice(PIECES) + rng.choice(["", " "]) for _ in range(rng.randint(0, k)))


def value(rng, depth=0):
    r = rng.random()
    if depth > 2 or r < 0.3:
        return rng.choice([text(rng, 3), rng.randint(-5, 10**6), rng.random() * 100, True, False, None, 1e-9, 2.0])
    if r < 0.65:
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {text(rng, 2) or "k": value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def conversation(rng):
    msgs = []
    if rng.random() < 0.5:
        msgs.append({"role": "system", "content": text(rng)})
    for turn in range(rng.randint(1, 3)):
        msgs.append({"role": "user", "content": text(rng) or "q"})
        if rng.random() < 0.4:
            args = {"city": text(rng, 2), "extra": value(rng)}
            if rng.random() < 0.3:
                args = json.dumps(args, ensure_ascii=rng.random() < 0.5)
            msgs.append({"role": "assistant", "content": rng.choice(["", None, text(rng, 3)]),
                         "tool_calls": [call(f"call{turn:05d}a", "get_weather", args)]})
            msgs.append({"role": "tool", "tool_call_id": f"call{turn:05d}a", "name": "get_weather",
                         "content": json.dumps(value(rng), ensure_ascii=False)})
        a = {"role": "assistant", "content": text(rng) or "a"}
        if rng.random() < 0.2:
            a["reasoning_content"] = text(rng, 4)
        msgs.append(a)
    if rng.random() < 0.6:
        msgs.append({"role": "user", "content": text(rng) or "u"})
    if rng.random() < 0.15:  # odd shapes: unknown roles, parts, missing/None content, ipython results
        i = rng.randrange(len(msgs))
        m = dict(msgs[i])
        kind = rng.randrange(5)
        if kind == 0:
            m["role"] = rng.choice(["developer", "ipython", "function", "critic"])
        elif kind == 1:
            m["content"] = [{"type": "text", "text": text(rng)}, {"type": "image"}][: rng.randint(1, 2)]
        elif kind == 2:
            m.pop("content", None)
        elif kind == 3:
            m["content"] = None
        else:
            m["name"] = text(rng, 2)
        msgs[i] = m
    return msgs


def outcome(fn):
    try:
        return ("ok", fn())
    except TemplateError as e:
        return ("error", e.kind, e.message)
    except Exception as e:  # noqa: BLE001
        return ("error", type(e).__name__, str(e))


@pytest.mark.parametrize("template", TEMPLATES)
def test_random_conversations_match_jinja2(template):
    source = (CHAT / "templates" / template).read_text(encoding="utf-8")
    rng = random.Random(template + __import__("os").environ.get("QF_RANDOM_SEED", ""))
    try:
        py = compile_pinned(source)
    except Exception:  # noqa: BLE001
        with pytest.raises(TemplateError):
            ChatTemplate(source)
        return
    ours = ChatTemplate(source)
    for i in range(int(__import__("os").environ.get("QF_RANDOM_N", "12"))):
        msgs = conversation(rng)
        kwargs = dict(SPECIAL, add_generation_prompt=rng.random() < 0.5)
        if rng.random() < 0.3:
            kwargs["enable_thinking"] = rng.random() < 0.5
        if rng.random() < 0.2:
            kwargs["documents"] = [{"title": text(rng, 2), "text": text(rng)} for _ in range(rng.randint(1, 2))]
        last = msgs[-1].get("content")
        if rng.random() < 0.2 and msgs[-1]["role"] == "assistant" and isinstance(last, str) and last.strip():
            kwargs["continue_final_message"] = True
            kwargs["add_generation_prompt"] = False
        if rng.random() < 0.2:
            kwargs["builtin_tools"] = ["brave_search", "wolfram_alpha"]
            kwargs["date_string"] = text(rng, 2)
        tools = TOOLS if rng.random() < 0.5 else None
        ctu._compile_jinja_template, orig = compile_pinned, ctu._compile_jinja_template
        try:
            expected = outcome(lambda: ctu.render_jinja_template(
                [copy.deepcopy(msgs)], tools=tools, chat_template=source, **kwargs)[0][0])
        finally:
            ctu._compile_jinja_template = orig
        got = outcome(lambda: ours.apply(msgs, tools=tools, now=NOW_EPOCH, **kwargs))
        assert got[0] == expected[0], (i, msgs, expected, got)
        if got[0] == "ok":
            assert got[1] == expected[1], (i, msgs)
        elif expected[1] != "ValueError":  # a template failure: same class and message as Python
            assert got[1:] == expected[1:], (i, msgs)
