"""`qforge chat render|parse` (the handlers, wired through argparse as cli.py does)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from qforge import chat

CHAT = Path(__file__).resolve().parents[1] / "chat"


def run(argv, capsys):
    parser = argparse.ArgumentParser(prog="qforge")
    chat.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    rc = args.func(args)
    return rc, capsys.readouterr()


def test_render_from_tokenizer_config_with_named_templates(tmp_path, capsys):
    source = (CHAT / "templates" / "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja").read_text()
    config = {"chat_template": [{"name": "default", "template": "{% for m in messages %}{{ m.content }}{% endfor %}"},
                                {"name": "tool_use", "template": source}],
              "bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|im_end|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    req = json.loads((CHAT / "conversations.json").read_text())["tool_result"]
    (tmp_path / "conv.json").write_text(json.dumps({"messages": req["messages"], "tools": req["tools"]}))
    rc, out = run(["chat", "render", "--tokenizer-config", str(tmp_path / "tokenizer_config.json"),
                   "--messages", str(tmp_path / "conv.json"), "--add-generation-prompt"], capsys)
    assert rc == 0
    golden = json.loads((CHAT / "goldens" / "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.json").read_text())
    assert out.out == golden["cases"]["tool_result"]["output"]


def test_render_llama_fallback_and_assistant_marks(tmp_path, capsys):
    (tmp_path / "cfg.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>"}))
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (tmp_path / "m.json").write_text(json.dumps(msgs))
    rc, out = run(["chat", "render", "--tokenizer-config", str(tmp_path / "cfg.json"), "--llama-fallback", "3.1",
                   "--messages", str(tmp_path / "m.json"), "--show-assistant", "--var", "date_string=\"01 Jan 2026\""],
                  capsys)
    assert rc == 0
    assert ">>>hello<|eot_id|><<<" in out.out and "01 Jan 2026" in out.out


def test_render_reports_template_errors(tmp_path, capsys):
    (tmp_path / "t.jinja").write_text("{{ raise_exception('nope') }}")
    (tmp_path / "m.json").write_text("[]")
    rc, out = run(["chat", "render", "--template", str(tmp_path / "t.jinja"), "--messages", str(tmp_path / "m.json")],
                  capsys)
    assert rc == 1 and "nope" in out.err


def test_parse(tmp_path, capsys):
    (tmp_path / "gen.txt").write_text('<|python_tag|>brave_search.call(query="qforge")<|eom_id|>')
    rc, out = run(["chat", "parse", str(tmp_path / "gen.txt")], capsys)
    assert rc == 0
    r = json.loads(out.out)
    assert r["tool_calls"][0]["function"] == {"name": "brave_search", "arguments": {"query": "qforge"}}
    assert r["stop"] == "eom"


def test_parse_in_the_format_of_a_template(tmp_path, capsys):
    (tmp_path / "gen.txt").write_text('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}</s>')
    template = CHAT / "templates" / "unsloth-mistral-Devstral-Small-2507.jinja"
    rc, out = run(["chat", "parse", "--template", str(template), str(tmp_path / "gen.txt")], capsys)
    r = json.loads(out.out)
    assert rc == 0 and r["format"] == "mistral"
    assert r["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    rc, out = run(["chat", "parse", "--format", "glm4", str(tmp_path / "gen.txt")], capsys)
    assert rc == 0 and json.loads(out.out)["tool_calls"] == []  # not GLM's markers: all content


def test_tokenizer_config_with_template_files_beside_it(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}")
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text("tools:{{ tools|length }}")
    tmpl, special = chat.load_tokenizer_config(tmp_path / "tokenizer_config.json")
    assert tmpl.apply([{"role": "user", "content": "hi"}], **special) == "hi</s>"
    tmpl, _ = chat.load_tokenizer_config(tmp_path / "tokenizer_config.json", tools=[{"type": "function"}])
    assert tmpl.apply([], tools=[{"type": "function"}]) == "tools:1"
