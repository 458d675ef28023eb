"""`qforge eval`: scoring rules on hand-made parses, and the command end to
end on the tiny default model with an adapter trained in the test."""
from __future__ import annotations

import json

import pytest
import torch

import qforge.train as T
from qforge import cli
from qforge.chat import parse_tool_calls
from qforge.data import builtin_dataset
from qforge.evaluate import held_out_turns, score_turn, summarize


def parsed(calls=(), content=None, error=None):
    return {"content": content, "reasoning_content": None, "error": error, "stop": None, "format": "llama3",
            "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]}


WEATHER = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}


def test_call_turn_scores():
    s = score_turn([WEATHER], "", parsed([("get_weather", {"city": "Paris", "unit": "celsius"})]))
    assert s == {"kind": "call", "names": True, "arguments": True, "calls": True, "parse_error": None}
    s = score_turn([WEATHER], "", parsed([("get_weather", {"city": "Paris", "unit": "kelvin"})]))
    assert s["names"] and not s["arguments"] and not s["calls"]
    s = score_turn([WEATHER], "", parsed([("get_time", {"city": "Paris", "unit": "celsius"})]))
    assert not s["names"] and s["arguments"] and not s["calls"]
    # an extra call, or none at all (a parse error), is not a match
    two = parsed([("get_weather", WEATHER["arguments"]), ("get_weather", WEATHER["arguments"])])
    assert not score_turn([WEATHER], "", two)["calls"]
    s = score_turn([WEATHER], "", parsed(content="{broken", error="malformed JSON tool call"))
    assert not s["names"] and s["parse_error"]


def test_content_turn_scores():
    assert score_turn([], "Hello!", parsed(content=" Hello! ")) == {
        "kind": "content", "content_only": True, "content": True, "parse_error": None}
    s = score_turn([], "Hello!", parsed(content="Hi"))
    assert s["content_only"] and not s["content"]
    s = score_turn([], "Hello!", parsed([("get_weather", {})]))
    assert not s["content_only"] and not s["content"]


def test_summary_rates():
    rows = [score_turn([WEATHER], "", parsed([("get_weather", WEATHER["arguments"])])),
            score_turn([WEATHER], "", parsed([("get_weather", {})])),
            score_turn([], "Hi", parsed(content="Hi")),
            score_turn([], "Hi", parsed(content="x", error="bad"))]
    m = summarize(rows)
    assert m == {"turns": 4, "call_turns": 2, "content_turns": 2, "tool_name": 1.0, "arguments": 0.5,
                 "call_list": 0.5, "content_only": 0.5, "content_exact": 0.5, "parse_errors": 1}
    assert summarize([])["tool_name"] is None


def test_generation_stops_at_every_token_the_parsers_drop():
    """The stop list is the C++ parsers' (qf_chat_stop_tokens): each one ends a reply,
    and the ids the tokenizer has (plus eos) stop generation."""
    from qforge.chat import stop_tokens
    from qforge.evaluate import _stop_ids

    tokens = stop_tokens()
    assert {"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<end_of_turn>", "<|END_OF_TURN_TOKEN|>"} <= set(tokens)
    for token in tokens:
        reply = parse_tool_calls("All done." + token)
        assert reply["content"] == "All done." and reply["stop"] in ("eot", "eom"), token

    class Tokenizer:
        eos_token_id = 7

        def get_vocab(self):
            return {"<|im_end|>": 3, "hello": 4, "<|eot_id|>": 5}

    assert sorted(_stop_ids(Tokenizer())) == [3, 5, 7]


def test_held_out_turns_are_every_assistant_turn():
    records = builtin_dataset(4, seed=3)  # one of each kind: 2 + 2 + 2 + 1 assistant turns
    turns = held_out_turns(records)
    assert len(turns) == 7
    first = turns[0]
    assert first["prompt"] == records[0]["messages"][:2] and first["calls"][0]["name"] == "get_weather"
    assert turns[1]["calls"] == [] and turns[1]["content"].startswith("It is")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """The tiny default model with a LoRA adapter trained for a few steps."""
    out = tmp_path_factory.mktemp("evalrun") / "run"
    T.train(model=None, data=None, output=str(out), max_steps=3, save_every=0, max_seq_length=512, tokens_per_batch=512,
            lr=4e-3, warmup_steps=1, lora_r=8, lora_alpha=16.0, progress=False)
    return out


def test_qforge_eval_end_to_end(trained_run, tmp_path, capsys):
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in builtin_dataset(4, seed=7)), encoding="utf-8")
    args = ["eval", "--model", str(trained_run / "base-model"), "--adapter", str(trained_run), "--data", str(data),
            "--max-new-tokens", "12", "--device", "cpu"]
    assert cli.main(args + ["--output", str(tmp_path / "a"), "--batch-size", "1"]) == 0
    table = capsys.readouterr().out
    assert "tool name exact match" in table and "of 3 turns" in table and "parsed as 'llama3'" in table
    report = json.loads((tmp_path / "a" / "eval.json").read_text(encoding="utf-8"))
    assert report["format"] == "llama3" and len(report["turns"]) == 7
    for row in report["turns"]:  # each reply read by the C++ parser with the template's format, and scored
        tools = builtin_dataset(4, seed=7)[row["record"]]["tools"]
        assert row["parsed"] == parse_tool_calls(row["reply"], "llama3", tools)
        assert row["scores"] == score_turn(row["expected_calls"], row["expected_content"], row["parsed"])
    assert report["metrics"] == summarize([r["scores"] for r in report["turns"]])
    # batched generation (left padding) gives the same greedy replies as one at a time
    assert cli.main(args + ["--output", str(tmp_path / "b"), "--batch-size", "3"]) == 0
    batched = json.loads((tmp_path / "b" / "eval.json").read_text(encoding="utf-8"))
    assert [r["reply"] for r in batched["turns"]] == [r["reply"] for r in report["turns"]]


def test_eval_names_a_wrong_adapter(trained_run, tmp_path, capsys):
    data = tmp_path / "held_out.jsonl"
    data.write_text(json.dumps(builtin_dataset(1)[0]) + "\n", encoding="utf-8")
    assert cli.main(["eval", "--model", str(trained_run / "base-model"), "--adapter", str(tmp_path), "--data",
                     str(data)]) == 2
    assert "neither a PEFT adapter directory" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_new_tokens"):
        from qforge.evaluate import generate_replies
        generate_replies(None, None, None, [], max_new_tokens=10**6)


def _assistant_turns(path):
    """Every assistant turn of a chat JSONL file, in file order, read without
    qforge.evaluate: (tools, expected calls as {name: arguments} pairs, content)."""
    turns = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        for i, message in enumerate(record["messages"]):
            if message["role"] == "assistant" and i > 0:
                calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or []]
                turns.append((record.get("tools"), calls, message.get("content") or ""))
    return turns


def _recount(turns, replies, fmt):
    """eval.json's figures counted from the replies: each re-parsed, compared
    with the data's turn, and tallied here."""
    hits = {"tool_name": 0, "arguments": 0, "call_list": 0, "content_only": 0, "content_exact": 0}
    parse_errors = call_turns = 0
    for (tools, expected, content), reply in zip(turns, replies, strict=True):
        parsed = parse_tool_calls(reply, fmt, tools)
        got = [(c["function"]["name"], c["function"]["arguments"]) for c in parsed["tool_calls"]]
        parse_errors += parsed["error"] is not None
        if expected:
            call_turns += 1
            names = [n for n, _ in got] == [n for n, _ in expected]
            args = [a for _, a in got] == [a for _, a in expected]
            hits["tool_name"] += names
            hits["arguments"] += args
            hits["call_list"] += names and args
        elif not got and parsed["error"] is None:
            hits["content_only"] += 1
            hits["content_exact"] += (parsed["content"] or "").strip() == content.strip()
    content_turns = len(turns) - call_turns
    rates = {k: round(v / (call_turns if k in ("tool_name", "arguments", "call_list") else content_turns), 4)
             for k, v in hits.items()}
    return {"turns": len(turns), "call_turns": call_turns, "content_turns": content_turns, **rates,
            "parse_errors": parse_errors}


def test_eval_json_figures_equal_an_independent_recount(trained_run, tmp_path):
    """`qforge eval` on held-out built-in data with the adapter trained above:
    the turns, replies and every figure of eval.json recounted from the data
    file and the replies it wrote."""
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in builtin_dataset(8, seed=11)), encoding="utf-8")
    assert cli.main(["eval", "--model", str(trained_run / "base-model"), "--adapter", str(trained_run), "--data",
                     str(data), "--max-new-tokens", "16", "--device", "cpu", "--output", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))
    turns = _assistant_turns(data)
    assert len(turns) == 14 and [len(c) > 0 for _, c, _ in turns].count(True) == 6  # 6 call turns, 8 content turns
    assert [(r["expected_calls"], r["expected_content"]) for r in report["turns"]] == [
        ([{"name": n, "arguments": a} for n, a in calls], content) for _, calls, content in turns]
    assert all(r["reply"] for r in report["turns"])
    assert report["metrics"] == _recount(turns, [r["reply"] for r in report["turns"]], report["format"])


class _ScriptedModel(torch.nn.Module):
    """Stands in for a fine-tuned model: generate() answers each prompt with the
    next scripted reply (tokenized), as transformers' generate() returns them:
    the prompt, then the reply, padded after its stop token to the longest."""

    def __init__(self, tokenizer, replies):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.replies = tokenizer, list(replies)

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, **_):
        rows = [self.tokenizer(self.replies.pop(0), add_special_tokens=False).input_ids for _ in range(len(input_ids))]
        width = max(map(len, rows))
        tail = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, tail], dim=1)


def test_eval_figures_on_replies_of_known_quality(trained_run):
    """Generations whose correctness is known by construction (right call, wrong
    arguments, wrong tool, two calls, truncated JSON, exact and wrong text)
    give exactly the rates they should, through the whole eval path (template,
    tokenizer, batched generation, decode, parser, scores)."""
    from qforge.evaluate import evaluate_model
    from qforge.chat import ChatTemplate
    from qforge.models import load_tokenizer

    tokenizer = load_tokenizer(trained_run / "base-model")
    template = ChatTemplate((trained_run / "base-model" / "chat_template.jinja").read_text(encoding="utf-8"))
    records = builtin_dataset(8, seed=5)
    turns = held_out_turns(records)
    call = lambda name, args: json.dumps({"name": name, "parameters": args}) + "<|eot_id|>"  # noqa: E731
    replies, expected = [], {"names": 0, "args": 0, "both": 0, "content_only": 0, "content": 0, "errors": 0}
    for k, t in enumerate(turns):
        if t["calls"]:
            name, args = t["calls"][0]["name"], t["calls"][0]["arguments"]
            kind = k % 4
            if kind == 0:  # right
                replies.append(call(name, args))
                expected["names"] += 1; expected["args"] += 1; expected["both"] += 1  # noqa: E702
            elif kind == 1:  # right tool, wrong arguments
                replies.append(call(name, {**args, "extra": 1}))
                expected["names"] += 1
            elif kind == 2:  # the call twice: the list is wrong
                replies.append(call(name, args)[:-len("<|eot_id|>")] + "; " + call(name, args))
            else:  # JSON cut short: a parse error, no call
                replies.append(call(name, args)[:12] + "<|eot_id|>")
                expected["errors"] += 1
        elif k % 2:
            replies.append(" " + t["content"] + "<|eot_id|>")
            expected["content_only"] += 1; expected["content"] += 1  # noqa: E702
        else:
            replies.append("Something else.<|eot_id|>")
            expected["content_only"] += 1
    n_calls = sum(bool(t["calls"]) for t in turns)
    n_content = len(turns) - n_calls
    report = evaluate_model(_ScriptedModel(tokenizer, replies), tokenizer, template, records, batch_size=3,
                            max_new_tokens=64)
    assert [r["reply"] for r in report["turns"]] == replies
    assert report["metrics"] == {
        "turns": len(turns), "call_turns": n_calls, "content_turns": n_content,
        "tool_name": round(expected["names"] / n_calls, 4), "arguments": round(expected["args"] / n_calls, 4),
        "call_list": round(expected["both"] / n_calls, 4), "content_only": round(expected["content_only"] / n_content, 4),
        "content_exact": round(expected["content"] / n_content, 4), "parse_errors": expected["errors"]}
    assert 0 < expected["both"] < expected["names"] < n_calls and 0 < expected["content"] < n_content
