"""Round trip of tool calls through every chat template in tests/chat/templates:
render an assistant turn carrying 1, 2 or 3 calls (nested, unicode and
quote-heavy arguments), cut out the text the model would have generated, and
parse it back with the format detected from the template. Shared by
test_tool_calls_roundtrip.py and test_tool_calls_streaming.py."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chat"))
from conversations import SPECIAL, TOOLS  # noqa: E402

TEMPLATES = Path(__file__).resolve().parents[1] / "chat" / "templates"

# Arguments chosen to stress every wire format: nesting, unicode, quotes of
# both kinds, backslashes, markup-like text, numbers, booleans and null.
ARGUMENTS = [
    ("get_weather", {"city": "Zürich", "unit": "celsius"}),
    ("search_docs", {"query": "say \"hi\" & 'bye' \\ <b>", "limit": 3,
                     "filters": {"tags": ["日本", "a,b", "x]y"], "score": 0.5, "exact": True, "owner": None}}),
    ("get_weather", {"city": "São Paulo 🚀", "unit": "fahrenheit"}),
]
CALL_IDS = ["call00001", "call00002", "call00003"]  # 9 characters: Mistral templates insist


def _with_map_types(tool: dict) -> dict:
    """The tool with its object parameters typed as maps (Command R+ prints
    them as Dict[str, ...] and needs additionalProperties)."""
    tool = json.loads(json.dumps(tool))
    for spec in tool["function"]["parameters"]["properties"].values():
        if spec.get("type") == "object":
            spec["additionalProperties"] = {"type": "string"}
    return tool


# Ways of writing the same turn, tried in order until the template renders
# the calls: arguments as dicts or as JSON strings, content "" or None,
# object parameters as maps, the tools also passed as `functions`
# and a date (FireFunction's variables).
VARIANTS = [
    {"as_string": False, "content": "", "tools": TOOLS, "extra": {}},
    {"as_string": True, "content": "", "tools": TOOLS, "extra": {}},
    {"as_string": True, "content": None, "tools": TOOLS, "extra": {}},
    {"as_string": False, "content": "", "tools": [_with_map_types(t) for t in TOOLS], "extra": {}},
    {"as_string": False, "content": "", "tools": TOOLS, "extra": {"functions": json.dumps(TOOLS), "datetime": "2026-01-01"}},
]


def make_calls(n: int, arguments_as_string: bool, arguments=ARGUMENTS) -> list[dict]:
    calls = []
    for i in range(n):
        name, args = arguments[i]
        calls.append({"id": CALL_IDS[i], "type": "function",
                      "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)
                                   if arguments_as_string else args}})
    return calls


def common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def generated_text(template, n: int, content: str | None = None, reasoning: str | None = None,
                   arguments=ARGUMENTS) -> tuple[str, list[dict]] | None:
    """(the assistant turn's text as the model would generate it, the calls it
    carries), or None when the template does not render n calls (refuses
    them, or renders a turn without them). With `content` / `reasoning`, the
    turn also carries that text / reasoning_content. `arguments`: the
    (name, arguments) of the calls, ARGUMENTS by default."""
    user = {"role": "user", "content": "What is the weather in Zürich, and find the docs?"}
    for v in VARIANTS:
        calls = make_calls(n, v["as_string"], arguments)
        assistant = {"role": "assistant", "content": v["content"] if content is None else content, "tool_calls": calls}
        if reasoning is not None:
            assistant["reasoning_content"] = reasoning
        try:
            full = template.apply([user, assistant], tools=v["tools"], **SPECIAL, **v["extra"])
            prompt = template.apply([user], tools=v["tools"], add_generation_prompt=True, **SPECIAL, **v["extra"])
        except ValueError:
            continue
        cut = common_prefix(full, prompt)
        if cut < len(prompt):
            # the prompt ends in text the model's turn does not repeat (an
            # opened <think>, ...): start at the token the two diverge in
            cut = max(full.rfind("<", 0, cut + 1), full.rfind("[", 0, cut + 1), full.rfind("\n", 0, cut) + 1)
        text = full[cut:]
        # the generation prompt's own last token, where the prompts part ways
        # earlier (Command R+ puts an instruction turn before it)
        for k in range(min(len(prompt), len(text), 64), 0, -1):
            if prompt.endswith(text[:k]) and text[:k].startswith("<"):
                text = text[k:]
                break
        expected = [{"name": arguments[i][0], "arguments": arguments[i][1]} for i in range(n)]
        if all(text.count(name) >= sum(1 for e in expected if e["name"] == name) for name, _ in arguments[:n]):
            return text, expected
    return None


def calls_of(result: dict) -> list[dict]:
    return [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in result["tool_calls"]]
