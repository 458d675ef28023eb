"""Training data for tool use: tokenizer special-token patching (by content,
renaming Llama 3 placeholders in place), assistant-only loss masks, tool-call
parsing through the C ABI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from qforge.chat import (ChatTemplate, TemplateError, assistant_spans, parse_tool_calls, patch_tokenizer,
                         train_on_responses_only)

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

CHAT = Path(__file__).resolve().parents[1] / "chat"
REQUESTS = json.loads((CHAT / "conversations.json").read_text(encoding="utf-8"))


def template(name):
    return ChatTemplate((CHAT / "templates" / name).read_text(encoding="utf-8"))


def llama3_layout_tokenizer():
    """A byte-level tokenizer whose special tokens sit where an original Llama 3
    tokenizer has them (ids offset by 128000 - 256): the tool tokens of 3.1
    are still <|reserved_special_token_N|> placeholders."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>",
                "<|reserved_special_token_5|>"]
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in specials])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                                eos_token="<|eot_id|>")
    return fast


def test_patch_renames_llama3_placeholders_in_place():
    tok = llama3_layout_tokenizer()
    n = len(tok)
    eom_id = tok.convert_tokens_to_ids("<|reserved_special_token_4|>")
    tag_id = tok.convert_tokens_to_ids("<|reserved_special_token_5|>")
    report = patch_tokenizer(tok)
    assert sorted(report["renamed"]) == ["<|eom_id|>", "<|python_tag|>"]
    assert report["added"] == [] and report["resized"] is False
    assert len(tok) == n  # nothing appended
    assert tok.convert_tokens_to_ids("<|eom_id|>") == eom_id
    assert tok.convert_tokens_to_ids("<|python_tag|>") == tag_id
    assert tok.encode("<|python_tag|>x<|eom_id|>", add_special_tokens=False) == [tag_id, tok.convert_tokens_to_ids("x"), eom_id]
    assert tok.decode([tag_id, eom_id]) == "<|python_tag|><|eom_id|>"
    assert "<|reserved_special_token_4|>" not in tok.get_vocab()
    # idempotent
    again = patch_tokenizer(tok)
    assert again == {"renamed": [], "added": [], "resized": False} and len(tok) == n


def test_patch_appends_only_new_tokens_and_resizes_embeddings():
    torch = pytest.importorskip("torch")
    tok = llama3_layout_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    n = len(tok)
    report = patch_tokenizer(tok, model, tokens=["<|eot_id|>", "<|eom_id|>", "<|tool_result|>"])
    assert report["renamed"] == ["<|eom_id|>"] and report["added"] == ["<|tool_result|>"]
    assert report["resized"] and len(tok) == n + 1
    assert model.get_input_embeddings().weight.shape[0] == n + 1
    assert tok.convert_tokens_to_ids("<|tool_result|>") == n
    assert isinstance(model.get_input_embeddings().weight, torch.nn.Parameter)


def test_masks_keep_exactly_the_assistant_turns_llama31():
    tok = llama3_layout_tokenizer()
    patch_tokenizer(tok)
    tmpl = template("meta-llama-Llama-3.1-8B-Instruct.jinja")
    req = dict(REQUESTS["tool_result_answer"])
    messages = req.pop("messages")
    for k in ("add_generation_prompt", "continue_final_message"):
        req.pop(k)
    out = train_on_responses_only(tmpl, messages, tok, **req)
    kept = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    text = tok.decode(kept)
    assert text == ('{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
                    "It is 21.5 °C in Paris.<|eot_id|>")
    assert "temperature" not in text  # the tool result is not trained on
    assert all(l == -100 for l, m in zip(out["labels"], out["assistant_masks"]) if not m)
    assert tok.decode(out["input_ids"]) == tmpl.apply(messages, **req)


def test_generation_spans_match_transformers_assistant_mask():
    tok = llama3_layout_tokenizer()
    source = (CHAT / "templates" / "LFM2.5-8B-A1B.jinja").read_text(encoding="utf-8")
    assert "{% generation %}" in source or "{%- generation" in source
    tmpl = ChatTemplate(source)
    messages = REQUESTS["multi_turn_closed"]["messages"]
    ours = train_on_responses_only(tmpl, messages, tok)
    tok.chat_template = source
    theirs = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ours["input_ids"] == list(theirs["input_ids"])
    assert ours["assistant_masks"] == list(theirs["assistant_masks"])
    assert sum(ours["assistant_masks"]) > 0


def test_rendered_offset_spans_refuse_templates_that_rewrite_history():
    tmpl = ChatTemplate("{% for m in messages %}{% if loop.last %}{{ m.content }}{% else %}*{% endif %}{% endfor %}")
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    with pytest.raises(ValueError, match="generation"):
        assistant_spans(tmpl, msgs)


def test_parse_tool_calls_through_the_c_abi():
    r = parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>')
    assert r == {"content": None, "reasoning_content": None, "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}], "stop": "eom", "error": None, "format": "llama3"}
    r = parse_tool_calls("<tool_call>\n{broken\n</tool_call>", format="hermes")
    assert r["tool_calls"] == [] and r["error"] and r["content"] == "<tool_call>\n{broken\n</tool_call>"
    with pytest.raises(ValueError, match="unknown tool-call format"):
        parse_tool_calls("x", format="nope")


def test_apply_matches_transformers_tokenizer_apply_chat_template():
    tok = llama3_layout_tokenizer()
    source = (CHAT / "templates" / "meta-llama-Llama-3.2-3B-Instruct.jinja").read_text(encoding="utf-8")
    tok.chat_template = source
    req = REQUESTS["tools_defined"]

    def get_weather(city: str, unit: str = "celsius"):
        """Get the current weather in a city.

        Args:
            city: The city, e.g. Paris
            unit: Temperature unit
        """

    expected = tok.apply_chat_template(req["messages"], tools=[get_weather], tokenize=False,
                                       add_generation_prompt=True, date_string="15 Jan 2026")
    got = ChatTemplate(source).apply(req["messages"], tools=[get_weather], add_generation_prompt=True,
                                     date_string="15 Jan 2026", bos_token=tok.bos_token, eos_token=tok.eos_token)
    assert got == expected


def test_template_errors_are_typed():
    with pytest.raises(TemplateError) as info:
        template("google-gemma-2-2b-it.jinja").apply([{"role": "system", "content": "x"}])
    assert info.value.kind == "TemplateError" and info.value.message == "System role not supported"
    with pytest.raises(TemplateError) as info:
        ChatTemplate("{% if x %}")
    assert info.value.kind == "TemplateSyntaxError" and info.value.line == 1


def test_llama31_builtin_tool_round_trip_for_training():
    """Render a Llama 3.1 conversation with a builtin (brave_search) call and
    its ipython result, train only on the assistant's turns, and read the call
    back out of exactly the text the model is trained to produce."""
    tok = llama3_layout_tokenizer()
    patch_tokenizer(tok)
    tmpl = ChatTemplate(__import__("qforge.chat", fromlist=["llama3_template"]).llama3_template("3.1"))
    messages = [
        {"role": "user", "content": "What's new with Llama?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "brave_search", "arguments": {"query": "Llama 3.1 release"}}}]},
        {"role": "ipython", "content": "Llama 3.1 was released in July 2024."},
        {"role": "assistant", "content": "It came out in July 2024."},
    ]
    kwargs = {"builtin_tools": ["brave_search", "wolfram_alpha"], "date_string": "15 Jan 2026"}
    out = train_on_responses_only(tmpl, messages, tok, **kwargs)
    text, spans = assistant_spans(tmpl, messages, bos_token=tok.bos_token, **kwargs)
    turns = [text[s:e] for s, e in spans]
    assert turns == ['<|python_tag|>brave_search.call(query="Llama 3.1 release")<|eom_id|>',
                     "It came out in July 2024.<|eot_id|>"]
    kept = tok.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert kept == "".join(turns) and "released in July" not in kept
    parsed = parse_tool_calls(turns[0])
    assert parsed["stop"] == "eom" and parsed["error"] is None
    assert parsed["tool_calls"] == [{"type": "function", "function": {
        "name": "brave_search", "arguments": {"query": "Llama 3.1 release"}}}]
    assert "Environment: ipython\nTools: brave_search, wolfram_alpha" in text
