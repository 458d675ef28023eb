"""Hostile model output and hostile batch requests: each parse runs in a child
process under an address-space limit (RLIMIT_AS) and a hang guard, and must
come back as a clean result (error set, text kept as content, no exception)
within the documented bounds (docs/chat.md, "Tool-call parsing"): linear
time, well under a second for a megabyte, about 20 bytes of memory per byte.
Also: apply_batch with thread counts the system refuses, and assistant spans
over 20,000 turn pairs."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qforge.chat import ChatTemplate, assistant_spans, llama3_template, parse_tool_calls
from qforge.chat import _span_membership

CHAT = Path(__file__).resolve().parents[1] / "chat"
SECONDS = 1.0  # one parse of up to a few MB of hostile text
ADDRESS_SPACE = 256 << 20  # what a child may map beyond what it holds after the imports
HANG_GUARD = 120  # seconds: a child still running then is a hang

# A child: builds the text, limits its address space, parses, and reports.
CHILD = r"""
import json, random, re, resource, sys, time
from qforge.chat import parse_tool_calls
case = json.loads(sys.argv[1])
random.seed(0)
text = eval(case["text"])
content = eval(case.get("content", "text"))
pages = int(open("/proc/self/statm").read().split()[0])
_, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (pages * resource.getpagesize() + case["address_space"], hard))
start = time.perf_counter()
r = parse_tool_calls(text, case.get("format", "auto"))
seconds = time.perf_counter() - start
json.dumps(r)  # the result is printable JSON (valid Unicode throughout)
print(json.dumps({"seconds": seconds, "error": r["error"], "content_kept": r["content"] == content,
                  "calls": len(r["tool_calls"]), "check": bool(eval(case.get("check", "True")))}))
"""


def run_child(code: str, case: dict) -> dict:
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(case)], capture_output=True, text=True,
                          timeout=HANG_GUARD, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_in_child(text: str, **case) -> dict:
    case = {"text": text, "address_space": ADDRESS_SPACE, **case}
    out = run_child(CHILD, case)
    assert out["seconds"] < SECONDS, out
    assert out["check"], out
    return out


GARBAGE = "''.join(random.choice('{}[]\",:0123456789.-eE truefalsnul\\\\u ') for _ in range(1 << 20))"


@pytest.mark.parametrize("text", [
    "'[' * 100000",  # took 81 s (every bracket parsed anew, up to depth 1000 each)
    "'[' * (1 << 20)",
    "'{\"a\":' * 100000",
    "'{' * (1 << 20)",
    "'[\"[\" , ' + '\",\" , ' * 200000",  # a bracket in every string of another reading
    "'[1,' * 300000",
    GARBAGE,
])
def test_deep_and_garbage_brackets_are_plain_content(text):
    out = parse_in_child(text)
    assert out["error"] is None and out["content_kept"] and out["calls"] == 0


def test_calls_inside_a_megabyte_of_garbage_are_found():
    text = GARBAGE + " + ' {\"name\": \"f\", \"parameters\": {\"k\": [1, 2]}}'"
    out = parse_in_child(text, content="text[:text.rindex(' {\"name\"')].strip()")
    # the garbage holds no call of its own ("name" keys are not in its alphabet)
    assert out["error"] is None and out["calls"] == 1 and out["content_kept"]


@pytest.mark.parametrize("depth", [64, 600, 100000])
def test_calls_nested_deeper_than_the_limit_are_errors_not_exceptions(depth):
    # 600 levels raised ValueError (json.dumps: nesting too deep); 100,000 took minutes
    call = f"'{{\"name\":\"f\",\"parameters\":' + '{{\"a\":' * {depth} + '1' + '}}' * {depth} + '}}'"
    for text in (call, f"'<tool_call>' + {call} + '</tool_call>'"):
        out = parse_in_child(text, check="'deeper than 64' in r['error']")
        assert out["calls"] == 0 and out["content_kept"]


def test_nesting_at_the_limit_still_parses():
    depth = 63  # the call's own object is the 64th level
    out = parse_in_child(f"'{{\"name\":\"f\",\"parameters\":' + '{{\"a\":' * {depth} + '1' + '}}' * {depth} + '}}'")
    assert out["error"] is None and out["calls"] == 1


@pytest.mark.parametrize("text", [
    "'{\"name\": \"f\", \"parameters\": {\"s\": \"' + 'x' * (4 << 20) + '\"}}'",
    "'<tool_call>{\"name\": \"f\", \"arguments\": {\"s\": \"' + 'x' * (4 << 20) + '\"}}</tool_call>'",
])
def test_huge_strings_parse(text):
    out = parse_in_child(text, check="len(r['tool_calls'][0]['function']['arguments']['s']) == 4 << 20")
    assert out["error"] is None and out["calls"] == 1


@pytest.mark.parametrize("text", [
    "'{\"name\": \"f\", \"parameters\": {\"s\": \"' + 'x' * (4 << 20)",  # unterminated string
    "'{\"name\": \"f\", \"parameters\": {\"a\": [1, 2'",
    "'{\"name\": \"f\", \"parameters\": {\"a\": 1}'",
    "'{\"name\": \"f\", \"parameters\": {\"a\": \"\\\\ud8\"}}'",  # truncated escape
    "'<tool_call>{\"name\": \"f\", \"arguments\": {'",
    "'<tool_call>\\n<function=f>\\n<parameter=a>\\n1'",
    "'{\"name\": \"f\", \"arguments\": \"' + '[' * 1000 + '\"}'",  # arguments as a JSON string, too deep
])
def test_truncated_json_is_an_error_keeping_the_text(text):
    out = parse_in_child(text)
    assert out["error"] and out["calls"] == 0 and out["content_kept"]


def test_lone_surrogate_escape_reads_as_replacement_character():
    # raised UnicodeDecodeError decoding the C result
    r = parse_tool_calls('{"name":"f","parameters":{"a":"\\ud800"}}')
    assert r["error"] is None
    assert r["tool_calls"][0]["function"]["arguments"] == {"a": "\ufffd"}
    r = parse_tool_calls('{"name":"f","parameters":{"a":"\\ud83d\\ude00", "\\udc00": "\\udbff x"}}')
    assert r["tool_calls"][0]["function"]["arguments"] == {"a": "\U0001F600", "\ufffd": "\ufffd x"}
    r = parse_tool_calls('<tool_call>{"name":"f","arguments":"{\\"a\\": \\"\\\\ud800\\"}"}</tool_call>')
    assert r["error"] is None and r["tool_calls"][0]["function"]["arguments"] == {"a": "\ufffd"}


def test_invalid_unicode_in_the_model_text_reads_as_replacement_characters():
    # a lone surrogate in a str (as errors="surrogateescape" leaves undecodable bytes)
    r = parse_tool_calls('Sure \ud800 {"name": "f", "parameters": {"q": "\udcff"}}')
    assert r["error"] is None and r["content"] == "Sure \ufffd"
    assert r["tool_calls"][0]["function"]["arguments"] == {"q": "\ufffd"}
    # invalid UTF-8 bytes, as Python's decode("utf-8", "replace") reads them
    raw = b"\xff\xfe caf\xc3 \xe2\x82 {\"name\": \"f\", \"parameters\": {\"q\": \"\xc0\xaf\"}}<|eom_id|>"
    r = parse_tool_calls(raw)
    assert r["error"] is None and r["stop"] == "eom"
    assert r["content"] == b"\xff\xfe caf\xc3 \xe2\x82".decode("utf-8", "replace")
    assert r["tool_calls"][0]["function"]["arguments"] == {"q": "\ufffd\ufffd"}
    r = parse_tool_calls(b"\xed\xa0\x80 plain \xf4\x90\x80\x80")
    assert r["error"] is None and r["content"] == "\ufffd plain \ufffd\ufffd\ufffd\ufffd"


def test_invalid_unicode_in_a_megabyte_under_the_limits():
    # Python's decode("utf-8", "replace"), but an encoded surrogate is one U+FFFD
    out = parse_in_child("bytes(random.getrandbits(8) for _ in range(1 << 20))",
                         content="re.sub(rb'\\xed[\\xa0-\\xbf][\\x80-\\xbf]', b'\\xef\\xbf\\xbd', text)"
                                 ".decode('utf-8', 'replace')")
    assert out["content_kept"]


def test_text_beyond_the_size_limit_is_content_with_an_error():
    out = parse_in_child("'{\"name\": \"f\", \"parameters\": {}} ' + 'x' * (9 << 20)",
                         check="'longer than' in r['error']")
    assert out["calls"] == 0 and out["content_kept"]


# ------------------------------------------------------------ apply_batch threads
BATCH_CHILD = r"""
import json, resource, sys
from qforge.chat import ChatTemplate
case = json.loads(sys.argv[1])
tmpl = ChatTemplate("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
convs = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
         for i in range(3000)]
want = tmpl.apply_batch(convs, threads=1)
if case["address_space"]:
    pages = int(open("/proc/self/statm").read().split()[0])
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (pages * resource.getpagesize() + case["address_space"], hard))
    import threading
    started, release = [], threading.Event()
    try:  # the limit must bite, else this proves nothing
        for _ in range(200):
            t = threading.Thread(target=release.wait)
            t.start()
            started.append(t)
        refused = False
    except RuntimeError:
        refused = True
    release.set()
    for t in started:
        t.join()
    assert refused, "200 threads started under the limit"
got = tmpl.apply_batch(convs, threads=case["threads"])
print(json.dumps({"same": got == want}))
"""


@pytest.mark.parametrize("threads,address_space", [(1000, 0), (10 ** 9, 0), (-3, 0), (200, 64 << 20)])
def test_apply_batch_survives_thread_counts_the_system_refuses(threads, address_space):
    # threads=1000 (or any count the system refuses) died in std::terminate
    out = run_child(BATCH_CHILD, {"threads": threads, "address_space": address_space})
    assert out["same"]


# ------------------------------------------------------------ assistant spans
def old_assistant_spans(template, messages, **kwargs):
    """The quadratic rendered-offset method assistant_spans used before: every
    prefix of the conversation rendered in full."""
    text = template.apply(messages, **kwargs)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prefix = template.apply(messages[:i], add_generation_prompt=True, **kwargs) if i else ""
        through = template.apply(messages[: i + 1], **kwargs)
        if not (through.startswith(prefix) and text.startswith(through)):
            raise ValueError("not prefixes")
        if len(through) > len(prefix):
            spans.append((len(prefix), len(through)))
    return text, spans


def test_assistant_spans_of_20000_turn_pairs_in_linear_time():
    tmpl = ChatTemplate(llama3_template("3.1"))
    timings = {}
    for pairs in (2000, 20000):
        messages = [m for i in range(pairs) for m in ({"role": "user", "content": f"question {i}"},
                                                       {"role": "assistant", "content": f"answer {i}"})]
        start = time.perf_counter()
        text, spans = assistant_spans(tmpl, messages, date_string="26 Jul 2024")
        timings[pairs] = time.perf_counter() - start
        assert len(spans) == pairs
        assert [text[s:e] for s, e in spans[-2:]] == [f"answer {pairs - 2}<|eot_id|>", f"answer {pairs - 1}<|eot_id|>"]
    # 1,600 pairs took 4.3 s and grew as the square; now 10x the turns is about 10x the time
    assert timings[20000] < 20, timings
    assert timings[20000] < 40 * timings[2000] + 1, timings


def normal_conversations():
    requests = json.loads((CHAT / "conversations.json").read_text(encoding="utf-8"))
    for name, req in sorted(requests.items()):
        req = dict(req)
        messages = req.pop("messages")
        req.pop("add_generation_prompt", None)
        req.pop("continue_final_message", None)
        longer = messages + [m for m in messages if m.get("role") != "system"] * 3
        yield name, messages, req
        yield name + " x4", longer, req


def test_assistant_spans_equal_the_old_method_on_every_template():
    compared = 0
    for path in sorted((CHAT / "templates").glob("*.jinja")):
        source = path.read_text(encoding="utf-8")
        if re.search(r"\{%-?\s*generation\s*-?%\}", source):
            continue
        tmpl = ChatTemplate(source)
        for name, messages, req in normal_conversations():
            try:
                want = old_assistant_spans(tmpl, messages, now=0, **req)
            except ValueError:  # TemplateError is one: then the new method must refuse too
                with pytest.raises(ValueError):
                    assistant_spans(tmpl, messages, now=0, **req)
                continue
            assert assistant_spans(tmpl, messages, now=0, **req) == want, (path.name, name)
            compared += 1
    assert compared > 1000


def test_many_generation_blocks_get_spans():
    # more than 256 {% generation %} blocks raised ValueError
    tmpl = ChatTemplate("{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}"
                        "{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}")
    messages = [m for i in range(5000) for m in ({"role": "user", "content": f"é{i}"},
                                                  {"role": "assistant", "content": f"→{i}"})]
    text, spans = assistant_spans(tmpl, messages)
    assert [text[s:e] for s, e in spans] == [f"→{i}" for i in range(5000)]


def test_mask_membership_equals_the_any_over_spans_rule():
    rng = random.Random(7)
    for _ in range(200):
        spans = []
        for _ in range(rng.randint(0, 8)):
            s = rng.randint(0, 60)
            spans.append((s, s + rng.choice([0, 0, 1, 3, 10])))
        inside = _span_membership(spans)
        for _ in range(50):
            start = rng.randint(0, 70)
            end = start + rng.choice([0, 1, 2, 5])
            want = (any(start < e and end > s for s, e in spans) if end > start
                    else any(s <= start < e for s, e in spans))
            assert inside(start, end) == want, (spans, start, end)
