"""Adds "tool_call_parses" to each golden in tests/chat/goldens: for every
template that renders assistant tool calls, the text of a turn carrying 1, 2
and 3 calls (nested, unicode and quote-heavy arguments) as transformers +
jinja2 render it (cut out as tests/python/tool_call_roundtrip.py does), the
calls put into it, and qforge's parse of that text with the format detected
from the template. Also writes each text to tests/chat/tool_call_corpus/ for
the fuzz target. Run after make_goldens.py (which rewrites the goldens):

    PYTHONPATH=python python3 tests/chat/make_tool_call_goldens.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "python"))
from make_goldens import render  # noqa: E402
from tool_call_roundtrip import generated_text  # noqa: E402

from qforge.chat import detect_tool_call_format, parse_tool_calls  # noqa: E402


class Jinja2Template:
    """generated_text's template interface, rendered by transformers + jinja2."""

    def __init__(self, source: str):
        self.source = source

    def apply(self, messages, tools=None, add_generation_prompt=False, **kwargs):
        req = {"messages": messages, "tools": tools, "documents": None, "add_generation_prompt": add_generation_prompt,
               "continue_final_message": False, **kwargs}
        out = render(self.source, req)
        if "error" in out:
            raise ValueError(out["error"]["message"])
        return out["output"]


def main() -> None:
    corpus = HERE / "tool_call_corpus"
    corpus.mkdir(exist_ok=True)
    for old in corpus.glob("*.txt"):
        old.unlink()
    for path in sorted((HERE / "templates").glob("*.jinja")):
        source = path.read_text(encoding="utf-8")
        fmt = detect_tool_call_format(source)
        parses = {}
        for n in (1, 2, 3):
            rendered = generated_text(Jinja2Template(source), n)
            if rendered is None:
                continue
            text, calls = rendered
            parses[str(n)] = {"text": text, "calls": calls, "parse": parse_tool_calls(text, fmt)}
            (corpus / f"{path.stem}-{n}.txt").write_text(text, encoding="utf-8")
        golden_path = HERE / "goldens" / (path.stem + ".json")
        golden = json.loads(golden_path.read_text(encoding="utf-8"))
        golden["tool_call_format"] = fmt
        golden["tool_call_parses"] = parses
        golden_path.write_text(json.dumps(golden, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(f"{path.name}: {fmt}, {len(parses)} call counts render")


if __name__ == "__main__":
    main()
