"""Tool-call families one by one: the shapes their models write beyond what
templates render (reasoning, content around calls, Python and XML values),
malformed text (error set, text kept as content, never an exception) and
hostile text (linear time, bounded nesting) for every format."""
from __future__ import annotations

import json
import time

import pytest

from qforge.chat import parse_tool_calls, tool_call_formats


def calls(r):
    return [(c["function"]["name"], c["function"]["arguments"]) for c in r["tool_calls"]]


@pytest.mark.parametrize("fmt,text,want,content,reasoning", [
    ("mistral", '[THINK]plan[/THINK]Sure.[TOOL_CALLS]f[ARGS]{"a": [1, {"b": null}]}</s>',
     [("f", {"a": [1, {"b": None}]})], "Sure.", "plan"),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": "{\\"y\\": 2}"}]',
     [("f", {"x": 1}), ("g", {"y": 2})], None, None),
    ("deepseek", '<think>hm</think>Ok<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{"q": "a"}<｜tool▁call▁end｜>'
     '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>ignored', [("f", {"q": "a"})], "Ok", "hm"),
    ("deepseek_v3_2", '<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="n" string="false">12'
     '</｜DSML｜parameter>\n<｜DSML｜parameter name="s" string="true">12</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
     '</｜DSML｜function_calls>', [("f", {"n": 12, "s": "12"})], None, None),
    ("command_r7b", '<|START_THINKING|>think<|END_THINKING|><|START_RESPONSE|>Hi there<|END_RESPONSE|>',
     [], "Hi there", "think"),
    ("glm4", "<think>x</think>Calling.<tool_call>f\n<arg_key>a</arg_key>\n<arg_value>[1, 2]</arg_value>\n"
     "<arg_key>b</arg_key>\n<arg_value>text with <b>tags</b></arg_value>\n</tool_call>",
     [("f", {"a": [1, 2], "b": "text with <b>tags</b>"})], "Calling.", "x"),
    ("kimi_k2", "<think>r</think><|tool_calls_section_begin|><|tool_call_begin|>functions.a.b:7<|tool_call_argument_begin|>"
     '{"k": true}<|tool_call_end|><|tool_calls_section_end|>', [("a.b", {"k": True})], None, "r"),
    ("minimax_m2", '<think>r</think>\n<minimax:tool_call>\n<invoke name="f">\n<parameter name="x">3.5</parameter>\n'
     '<parameter name="y">abc</parameter>\n</invoke>\n</minimax:tool_call>', [("f", {"x": 3.5, "y": "abc"})], None, "r"),
    ("gpt_oss", "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant to=functions.get_weather"
     '<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>', [("get_weather", {"city": "Paris"})], None,
     "Need weather."),
    ("gpt_oss", "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>",
     [], "4", "Easy."),
    ("lfm2", "<|tool_call_start|>[f(a=1, b='it\\'s', c=[1, 'x'], d={'k': None}, e=True)]<|tool_call_end|>Done.",
     [("f", {"a": 1, "b": "it's", "c": [1, "x"], "d": {"k": None}, "e": True})], "Done.", None),
    ("functionary_v3_2", 'all\nLet me look.>>>f\n{"a": 1}>>>g\n{}', [("f", {"a": 1}), ("g", {})], "Let me look.", None),
    ("functionary_v3_2", "all\nJust text, no calls.", [], "Just text, no calls.", None),
    ("functionary_v3_1", 'Hmm <function=f>{"a": "</function>"}</function>', [("f", {"a": "</function>"})], "Hmm", None),
    ("apertus", '<|inner_prefix|>why<|inner_suffix|><|tools_prefix|>[{"f": {"a": 1}}]<|tools_suffix|>',
     [("f", {"a": 1})], None, "why"),
    ("seed_oss", "<seed:think>t</seed:think><seed:tool_call>\n<function=f>\n<parameter=d>{'a': (1, 2), 'b': False}"
     "</parameter>\n<parameter=s>plain</parameter>\n</function>\n</seed:tool_call>",
     [("f", {"d": {"a": [1, 2], "b": False}, "s": "plain"})], None, "t"),
    ("nemotron_v2", '<think>t</think><TOOLCALL>[{"name": "f", "arguments": {}}]</TOOLCALL>', [("f", {})], None, "t"),
    ("apriel", 'steps\n[BEGIN FINAL RESPONSE]\nOk.\n<tool_calls>[{"name": "f", "arguments": {"a": 1}}]</tool_calls>',
     [("f", {"a": 1})], "Ok.", "steps"),
    ("solar_open", '<|tool_calls|><|tool_call:begin|>id1<|tool_call:name|>f<|tool_call:args|>{"a": 1}<|tool_call:end|>'
     "<|calls|>", [("f", {"a": 1})], None, None),
    ("gemma4", "<|channel>thought\nhm<channel|><|tool_call>call:f{a:<|\"|>x, y<|\"|>,b:[1,{c:true}],d:None}<tool_call|>",
     [("f", {"a": "x, y", "b": [1, {"c": True}], "d": None})], None, "hm"),
    ("granite", '<|tool_call|>[{"name": "f", "arguments": {"a": 1}}]', [("f", {"a": 1})], None, None),
    ("gigachat", 'Sure<|function_call|>{"name": "f", "arguments": {"a": 1}}', [("f", {"a": 1})], "Sure", None),
    ("firefunction", ' functools[{"name": "f", "arguments": {"a": 1}}]', [("f", {"a": 1})], None, None),
    ("command_r_plus", 'Action:\n```json\n[{"tool_name": "f", "parameters": {"a": 1}}]\n```', [("f", {"a": 1})], None,
     None),
    ("hermes", "<think>\nr\n</think>\n\n<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</function>\n"
     "</tool_call>", [("f", {"a": 1})], None, "r"),
])
def test_family_shapes(fmt, text, want, content, reasoning):
    r = parse_tool_calls(text, fmt)
    assert r["error"] is None, r
    assert calls(r) == want
    assert r["content"] == content and r["reasoning_content"] == reasoning, r
    assert r["format"] == fmt


@pytest.mark.parametrize("fmt,text", [
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": 1'),
    ("mistral", "[TOOL_CALLS]f{}"),
    ("mistral", "[TOOL_CALLS][1, 2]"),
    ("deepseek", '<｜tool▁call▁begin｜>f{"a": 1}<｜tool▁call▁end｜>'),
    ("deepseek", '<｜tool▁call▁begin｜>f<｜tool▁sep｜>{"a": 1}garbage'),
    ("deepseek_v3_2", '<｜DSML｜function_calls><｜DSML｜invoke name="f"><｜DSML｜parameter name="x" string="false">'
     "not json</｜DSML｜parameter></｜DSML｜invoke></｜DSML｜function_calls>"),
    ("deepseek_v3_2", '<｜DSML｜function_calls><｜DSML｜invoke name="f">'),
    ("command_r7b", '<|START_ACTION|>[{"tool_name": "f", "parameters": 5}]<|END_ACTION|>'),
    ("glm4", "<tool_call>f<arg_key>a</arg_key><arg_value>1</tool_call>"),
    ("glm4", "<tool_call><arg_key>a</arg_key><arg_value>1</arg_value></tool_call>"),
    ("kimi_k2", "<|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>[1]<|tool_call_end|>"),
    ("minimax_m2", '<minimax:tool_call><invoke name="f"><parameter name="x">1</invoke></minimax:tool_call>'),
    ("minimax_m2", '<minimax:tool_call><invoke name="f">'),
    ("gpt_oss", "<|start|>assistant to=functions.f<|channel|>commentary json<|message|>{not json<|call|>x"),
    ("lfm2", "<|tool_call_start|>[f(a=1, b=)]<|tool_call_end|>"),
    ("lfm2", "<|tool_call_start|>[f(a=" + "[" * 100 + "]" * 100 + ")]<|tool_call_end|>"),
    ("lfm2", "<|tool_call_start|>[f(a='unterminated)]"),
    ("functionary_v3_1", "<function=f>{broken}</function>"),
    ("functionary_v3_2", 'f\n{"a": 1} trailing'),
    ("apertus", '<|tools_prefix|>[{"f": 1}]<|tools_suffix|>'),
    ("seed_oss", "<seed:tool_call><function=f><parameter=a>1</parameter>"),
    ("nemotron_v2", '<TOOLCALL>[{"name": "f", "arguments": {}}</TOOLCALL>'),
    ("apriel", '<tool_calls>[{"name": "f", "arguments": {}}] junk</tool_calls>'),
    ("solar_open", "<|tool_call:begin|>id<|tool_call:args|>{}<|tool_call:end|>"),
    ("gemma4", "<|tool_call>call:f{a:<|\"|>x}<tool_call|>"),
    ("gemma4", "<|tool_call>call:f{" + "a:{" * 100 + "}" * 101 + "<tool_call|>"),
    ("gemma4", "<|tool_call>f{}<tool_call|>"),
    ("hermes", "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}\n</tool_call>"),
    ("llama3", '{"name": "f", "parameters": {"a": '),
])
def test_malformed_text_is_an_error_and_kept_as_content(fmt, text):
    r = parse_tool_calls(text, fmt)
    assert r["error"], r
    assert r["tool_calls"] == [] and r["content"] == text and r["reasoning_content"] is None


# N = the repeat count (test_hostile_text_parses_in_linear_time runs N and 8 N)
HOSTILE = {
    "mistral": ["'[TOOL_CALLS]' * N", "'[TOOL_CALLS]f[ARGS]{}' * (N // 2)", "'[TOOL_CALLS]' + '[' * (2 * N)"],
    "deepseek": ["'<｜tool▁call▁begin｜>' * (N // 2)", "'<｜tool▁call▁begin｜>function<｜tool▁sep｜>' * (N // 2)"],
    "deepseek_v3_2": ["'<｜DSML｜function_calls>' * (N // 2)", "'<｜DSML｜function_calls>' + '<｜DSML｜invoke name=\"' * (N // 2)"],
    "command_r7b": ["'<|START_ACTION|>' * N", "'<|START_THINKING|>' * N"],
    "glm4": ["'<tool_call>' * N", "'<tool_call>f' + '<arg_key>' * N + '</tool_call>'"],
    "kimi_k2": ["'<|tool_call_begin|>' * (N // 2)", "'<|tool_call_begin|>f<|tool_call_argument_begin|>{}' * (N // 3)"],
    "minimax_m2": ["'<minimax:tool_call>' * (N // 2)", "'<minimax:tool_call>' + '<invoke name=\"f\">' * (N // 2)"],
    "gpt_oss": ["'<|message|>' * N", "'<|start|>assistant to=functions.f<|message|>{}<|call|>' * (N // 5)"],
    "lfm2": ["'<|tool_call_start|>[' + 'f(a=\\'' * N", "'<|tool_call_start|>[' + 'f(a=1), ' * N",
             "'<|tool_call_start|>[f(a=' + '[' * N"],
    "functionary_v3_1": ["'<function=' * N", "'<function=f>{}</function>' * (N // 2)"],
    "functionary_v3_2": ["'>>>' * N", "'all\\n' + '>>>all\\n' * N"],
    "apertus": ["'<|tools_prefix|>' * N"],
    "seed_oss": ["'<seed:tool_call>' * (N // 2)", "'<seed:tool_call><function=f>' + '<parameter=a>' * (N // 2)"],
    "nemotron_v2": ["'<TOOLCALL>' * N"],
    "apriel": ["'<tool_calls>' * N"],
    "solar_open": ["'<|tool_call:begin|>' * (N // 2)"],
    "gemma4": ["'<|tool_call>call:f' * (N // 2)", "'<|tool_call>call:f{' + 'a:{' * N",
               "'<|tool_call>call:f{a:' + '<|\"|>' * (N + 1)"],
    "granite": ["'<|tool_call|>' * N"],
    "gigachat": ["'<|function_call|>' * N"],
    "firefunction": ["'functools' * N"],
    "command_r_plus": ["'Action:' * N", "'Action:```' * N"],
    "hermes": ["'<tool_call>' * N", "'<think>' * N"],
    "llama3": ["'[' * N"],
}


def test_every_format_has_hostile_cases():
    assert sorted(HOSTILE) == sorted(tool_call_formats())


@pytest.mark.parametrize("fmt,expr", [(f, e) for f, es in HOSTILE.items() for e in es])
def test_hostile_text_parses_in_linear_time(fmt, expr):
    seconds = []
    for n in (12500, 100000):  # 8 times the text: about 8 times the time (quadratic: 64)
        text = eval(expr, {"N": n})  # noqa: S307 - test-owned expressions
        best = float("inf")
        for _ in range(2):  # the better of two runs: the build machine is shared
            start = time.perf_counter()
            r = parse_tool_calls(text, fmt)
            best = min(best, time.perf_counter() - start)
        seconds.append(best)
        assert set(r) == {"content", "reasoning_content", "tool_calls", "stop", "error", "format"}
        json.dumps(r)  # printable: valid Unicode throughout
    assert seconds[1] < 2.0, (fmt, expr, seconds)
    # tens of thousands of calls scale a little worse than linearly (allocation,
    # cache misses: the Llama 3 parser does too), far from the 64 of quadratic
    assert seconds[1] < 32 * seconds[0] + 0.5, (fmt, expr, seconds)  # slack: a shared machine


def test_unknown_format_names_the_known_ones():
    with pytest.raises(ValueError, match="mistral"):
        parse_tool_calls("x", format="nope")
