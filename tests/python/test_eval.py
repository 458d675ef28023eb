"""`qforge eval`: scoring rules on hand-made parses, and the command end to
end on the tiny default model with an adapter trained in the test."""
from __future__ import annotations

import json

import pytest

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
