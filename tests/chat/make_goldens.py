#!/usr/bin/env python3
"""Render every template in tests/chat/templates/ with every conversation of
conversations.py through transformers' own render_jinja_template (jinja2's
ImmutableSandboxedEnvironment, trim/lstrip blocks, loopcontrols, the tojson
override, raise_exception, strftime_now, namespace, {% generation %}) and
write the outputs, or the exception each raises, to tests/chat/goldens/.

strftime_now is pinned to NOW (the C++ side gets the same instant) so the
goldens do not depend on the day they were made.

    python tests/chat/make_goldens.py            # needs transformers + jinja2
"""
from __future__ import annotations

import copy
import datetime as dt
import json
import sys
from pathlib import Path

import jinja2
import transformers
from transformers.utils import chat_template_utils as ctu

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from conversations import requests  # noqa: E402

NOW = dt.datetime(2026, 1, 15, 9, 30, 5)
NOW_EPOCH = int(NOW.replace(tzinfo=dt.timezone.utc).timestamp())


_ORIGINAL_COMPILE = ctu._compile_jinja_template


def compile_pinned(source: str):
    tmpl = _ORIGINAL_COMPILE(source)
    tmpl.globals["strftime_now"] = lambda fmt: NOW.strftime(fmt)
    return tmpl


def render(source: str, req: dict) -> dict:
    req = copy.deepcopy(req)
    kwargs = {k: v for k, v in req.items()
              if k not in ("messages", "tools", "documents", "add_generation_prompt", "continue_final_message")}
    track = "generation" in source
    ctu._compile_jinja_template = compile_pinned
    try:
        rendered, indices = ctu.render_jinja_template(
            conversations=[req["messages"]], tools=req["tools"], documents=req["documents"], chat_template=source,
            add_generation_prompt=req["add_generation_prompt"], continue_final_message=req["continue_final_message"],
            return_assistant_tokens_mask=track, **kwargs)
    except Exception as e:  # noqa: BLE001 - the failure is the golden
        return {"error": {"type": type(e).__name__, "message": str(e)}}
    finally:
        ctu._compile_jinja_template = _ORIGINAL_COMPILE
    out = {"output": rendered[0]}
    if track:
        out["generation"] = [list(p) for p in indices[0]]
    return out


def main() -> None:
    reqs = requests()
    (HERE / "conversations.json").write_text(json.dumps(reqs, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    gold_dir = HERE / "goldens"
    gold_dir.mkdir(exist_ok=True)
    names = sorted(p.name for p in (HERE / "templates").glob("*.jinja"))
    for name in names:
        source = (HERE / "templates" / name).read_text(encoding="utf-8")
        cases = {}
        try:
            compile_pinned(source)
        except Exception as e:  # noqa: BLE001
            cases = {conv: {"error": {"type": type(e).__name__, "message": str(e)}} for conv in reqs}
        else:
            for conv, req in reqs.items():
                cases[conv] = render(source, req)
        golden = {"template": name, "now": NOW_EPOCH, "jinja2": jinja2.__version__,
                  "transformers": transformers.__version__, "cases": cases}
        path = gold_dir / (name[: -len(".jinja")] + ".json")
        if path.exists():  # make_tool_call_goldens.py's keys stay (rerun it when a template changes)
            golden.update({k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items()
                           if k.startswith("tool_call_")})
        (gold_dir / (name[: -len(".jinja")] + ".json")).write_text(
            json.dumps(golden, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        ok = sum("output" in c for c in cases.values())
        print(f"{name}: {ok}/{len(cases)} conversations render")


if __name__ == "__main__":
    main()
