"""One chat-template resolver (qforge.chat.select_chat_template) behind both
the CLI's tokenizer_config reader and the trainer's template_for, choosing
among named templates exactly as transformers' get_chat_template does."""
import json

import pytest

from qforge.chat import load_tokenizer_config, select_chat_template
from qforge.data import template_for

transformers = pytest.importorskip("transformers")
from test_chat_training import llama3_layout_tokenizer  # noqa: E402

DEFAULT = "{% for m in messages %}{{ m.content }}{% endfor %}"
TOOL_USE = "tools:{{ tools|length }}|{% for m in messages %}{{ m.content }}{% endfor %}"
RAG = "rag:{% for m in messages %}{{ m.content }}{% endfor %}"
NAMED = [{"default": DEFAULT, "tool_use": TOOL_USE}, {"default": DEFAULT}, {"tool_use": TOOL_USE, "rag": RAG},
         {"default": DEFAULT, "tool_use": TOOL_USE, "rag": RAG}]


def transformers_choice(templates, name, tools):
    tok = llama3_layout_tokenizer()
    tok.chat_template = templates
    try:
        return tok.get_chat_template(name, tools=tools)
    except ValueError:
        return ValueError


def ours(templates, name, tools):
    try:
        return select_chat_template(templates, name, tools)
    except ValueError:
        return ValueError


@pytest.mark.parametrize("templates", NAMED + [DEFAULT])
@pytest.mark.parametrize("tools", [None, [], [{"type": "function", "function": {"name": "f"}}]])
@pytest.mark.parametrize("name", [None, "default", "tool_use", "rag"])
def test_same_choice_as_transformers(templates, tools, name):
    expected = transformers_choice(templates, name, tools)
    if name is not None and (isinstance(templates, str) or name not in templates):
        # a name that is not there: transformers renders the name itself as a
        # template (the text "rag"); qforge refuses it, naming the templates
        # there are, except "default" for a single template (that one)
        assert expected == name
        assert ours(templates, name, tools) == (templates if name == "default" and isinstance(templates, str)
                                                else ValueError)
        return
    assert ours(templates, name, tools) == expected
    # tokenizer_config.json's list form chooses the same
    if isinstance(templates, dict):
        as_list = [{"name": k, "template": v} for k, v in templates.items()]
        assert ours(as_list, name, tools) == expected


def test_template_for_and_the_tokenizer_config_reader_agree(tmp_path):
    messages = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    tok = llama3_layout_tokenizer()
    tok.chat_template = {"default": DEFAULT, "tool_use": TOOL_USE}
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": [{"name": k, "template": v} for k, v in tok.chat_template.items()]}))
    for with_tools, given in ((True, tools), (False, None)):
        from_config, _ = load_tokenizer_config(config, tools=given)
        trainer = template_for(tok, with_tools=with_tools)
        assert trainer.apply(messages, tools=given) == from_config.apply(messages, tools=given)
    assert template_for(tok, with_tools=False).apply(messages) == "hi"  # default, as transformers without tools
    assert template_for(tok, with_tools=True).apply(messages, tools=tools) == "tools:1|hi"


def test_template_for_names_the_templates_when_none_is_the_default():
    tok = llama3_layout_tokenizer()
    tok.chat_template = {"tool_use": TOOL_USE, "rag": RAG}
    assert template_for(tok, with_tools=True).apply([{"role": "user", "content": "x"}], tools=[]) == "tools:0|x"
    with pytest.raises(ValueError, match=r"no chat template named 'default' \(has \['rag', 'tool_use'\]\)"):
        template_for(tok, with_tools=False)
