"""The conversations every chat template is rendered with, as apply_chat_template
requests: {"messages", "tools", "documents", "add_generation_prompt",
"continue_final_message", <kwargs>}. Shared by make_goldens.py (jinja2 side)
and the C++/Python tests (qforge side) through conversations.json."""
from __future__ import annotations

import json
from pathlib import Path

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search_docs",
        "description": "Search the documentation index.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "What to look for"},
                "limit": {"type": "integer", "description": "How many results", "default": 5},
                "filters": {
                    "type": "object",
                    "description": "Optional filters",
                    "properties": {
                        "tags": {"type": "array", "items": {"type": "string"}},
                        "score": {"type": "number"},
                    },
                },
            },
            "required": ["query"],
        },
    },
}
TOOLS = [WEATHER, SEARCH]


def call(id_, name, arguments):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


SPECIAL = {
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|eot_id|>",
    "pad_token": "<|finetune_right_pad_id|>",
    "unk_token": "<unk>",
}


def requests() -> dict[str, dict]:
    r: dict[str, dict] = {}

    def add(name, messages, tools=None, agp=False, cont=False, documents=None, **kw):
        r[name] = {
            "messages": messages,
            "tools": tools,
            "documents": documents,
            "add_generation_prompt": agp,
            "continue_final_message": cont,
            **SPECIAL,
            **kw,
        }

    u1 = {"role": "user", "content": "Hello! How are you today?"}
    a1 = {"role": "assistant", "content": "I'm doing well, thank you. How can I help?"}
    u2 = {"role": "user", "content": "What's the capital of France?"}
    a2 = {"role": "assistant", "content": "The capital of France is Paris."}
    sys = {"role": "system", "content": "You are a concise, helpful assistant."}
    add("plain", [u1], agp=True)
    add("plain_no_prompt", [u1, a1])
    add("system", [sys, u1, a1, u2], agp=True)
    add("multi_turn", [u1, a1, u2, a2, {"role": "user", "content": "And of Italy?"}], agp=True)
    add("multi_turn_closed", [sys, u1, a1, u2, a2])
    add("tools_defined", [sys, {"role": "user", "content": "What's the weather in Paris?"}], tools=TOOLS, agp=True)
    add("tools_no_system", [{"role": "user", "content": "Weather in Tokyo?"}], tools=TOOLS, agp=True)
    q = {"role": "user", "content": "What's the weather in Paris?"}
    one_call = {"role": "assistant", "content": "", "tool_calls": [call("call00001", "get_weather", {"city": "Paris"})]}
    one_result = {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": '{"temperature": 21.5, "unit": "celsius"}'}
    add("one_tool_call", [q, one_call], tools=TOOLS)
    add("tool_result", [q, one_call, one_result], tools=TOOLS, agp=True)
    add("tool_result_answer", [sys, q, one_call, one_result,
                               {"role": "assistant", "content": "It is 21.5 °C in Paris."}], tools=TOOLS)
    two = {"role": "assistant", "content": None, "tool_calls": [
        call("call00002", "get_weather", {"city": "Paris", "unit": "celsius"}),
        call("call00003", "get_weather", {"city": "Berlin", "unit": "fahrenheit"}),
    ]}
    add("several_tool_calls", [
        {"role": "user", "content": "Compare the weather in Paris and Berlin."}, two,
        {"role": "tool", "tool_call_id": "call00002", "name": "get_weather", "content": "20 degrees"},
        {"role": "tool", "tool_call_id": "call00003", "name": "get_weather", "content": "65 degrees"},
    ], tools=TOOLS, agp=True)
    add("string_arguments", [q, {"role": "assistant", "content": "", "tool_calls": [
        call("call00004", "get_weather", '{"city": "Paris", "unit": "celsius"}')]}], tools=TOOLS)
    nested = {"query": "naïve \"quotes\" & <tags>", "limit": 3,
              "filters": {"tags": ["a", "b c", "日本"], "score": 0.75, "exp": 1e-7, "big": 12345678901234567890.0,
                          "none": None, "flag": True, "empty": {}, "list": []}}
    add("nested_json_args", [{"role": "user", "content": "Search the docs."},
                             {"role": "assistant", "content": "", "tool_calls": [call("call00005", "search_docs", nested)]},
                             {"role": "tool", "tool_call_id": "call00005", "name": "search_docs",
                              "content": json.dumps([{"title": "Intro", "score": 0.9}])}], tools=TOOLS, agp=True)
    add("unicode", [{"role": "system", "content": "Réponds en français. 日本語も OK 🙂"},
                    {"role": "user", "content": "Ça va? \"quoted\" 'single' back\\slash\ttab\nnewline — ü ß 中文 🚀"},
                    {"role": "assistant", "content": "Très bien! ✓ <b>bold</b> {braces} {{double}} {% not a tag %}"},
                    {"role": "user", "content": "  leading and trailing spaces  \n\n"}], agp=True)
    add("continue_final", [u1, {"role": "assistant", "content": "Sure, the answer is"}], cont=True)
    add("ipython_result", [q, one_call, {"role": "ipython", "content": '{"temperature": 21.5}'}], tools=TOOLS, agp=True)
    add("builtin_tools", [sys, {"role": "user", "content": "Search the web for the latest Llama release."}],
        tools=TOOLS, agp=True, builtin_tools=["brave_search", "wolfram_alpha"], date_string="15 Jan 2026")
    add("tools_in_system", [{"role": "user", "content": "Weather in Rome?"}], tools=[WEATHER], agp=True,
        tools_in_user_message=False, date_string="01 Mar 2025")
    add("content_parts", [{"role": "user", "content": [{"type": "text", "text": "Describe this."},
                                                       {"type": "text", "text": "Be brief."}]}], agp=True)
    add("reasoning", [u2, {"role": "assistant", "content": "Paris.", "reasoning_content": "The user asks about France. Paris."},
                      {"role": "user", "content": "Thanks!"}], agp=True)
    add("thinking_off", [u1], agp=True, enable_thinking=False)
    add("documents", [{"role": "user", "content": "What does the report say?"}], agp=True,
        documents=[{"title": "Report", "text": "Revenue grew 12% in 2025."},
                   {"title": "Memo", "text": "Hiring is paused."}])
    add("empty_system", [{"role": "system", "content": ""}, u1], agp=True)
    add("content_and_tool_call", [sys, q, {"role": "assistant", "content": "Let me check that for you.",
                                           "tool_calls": [call("call00006", "get_weather", {"city": "Paris"})]},
                                  {"role": "tool", "tool_call_id": "call00006", "content": "sunny"}], tools=TOOLS, agp=True)
    add("tools_mid_history", [sys, u1, a1, q, one_call, one_result,
                              {"role": "assistant", "content": "It is sunny."},
                              {"role": "user", "content": "Thanks, and tomorrow?"}], tools=TOOLS, agp=True)
    add("empty_tools", [u1], tools=[], agp=True)
    add("image_parts", [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
                        {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]}], agp=True)
    add("unicode_tool_args", [{"role": "user", "content": "Météo à Zürich?"}, {"role": "assistant", "content": "",
                              "tool_calls": [call("call00007", "get_weather", '{"city": "Zürich", "note": "ß → 日本 🚀"}')]},
                              {"role": "tool", "tool_call_id": "call00007", "name": "get_weather",
                               "content": "{\"temp\": -3.25, \"desc\": \"neige ❄\"}"}], tools=TOOLS, agp=True)
    add("consecutive_users", [{"role": "user", "content": "First part."}, {"role": "user", "content": "Second part."}],
        agp=True)
    add("whitespace_content", [{"role": "system", "content": "\n\n  spaced system  \n"},
                               {"role": "user", "content": "\ttabbed\n"},
                               {"role": "assistant", "content": "\n\nanswer\n\n"},
                               {"role": "user", "content": " "}], agp=True)
    # kwargs some templates need: firefunction-v2 reads `functions` and `datetime`;
    # command-r-plus needs tools always and additionalProperties on object parameters
    add("functions_kwarg", [sys, q, one_call, one_result, {"role": "assistant", "content": "Sunny, 21.5 °C."},
                            {"role": "user", "content": "Thanks!"}], tools=[WEATHER], agp=True,
        functions=json.dumps([WEATHER["function"]], indent=2), datetime="2026-01-15 09:30")
    add("weather_tool_only", [q, one_call, one_result], tools=[WEATHER], agp=True)
    return r


if __name__ == "__main__":
    out = Path(__file__).with_name("conversations.json")
    out.write_text(json.dumps(requests(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
