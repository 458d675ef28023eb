"""`qforge eval`: how well a fine-tuned adapter calls tools on held-out chat data.

Every assistant turn of every held-out conversation is generated (greedy,
batched) from the conversation before it, read back by the C++ tool-call
parser in the format detected from the model's own chat template, and scored
against the turn in the data: exact match of the tool names, of the arguments
(as JSON values) and of the whole call list for turns that call tools, and
for content-only turns whether the model answered without a call (and with
the same text). The report is a table and eval.json.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

__all__ = ["evaluate", "evaluate_model", "score_turn", "summarize", "report_table", "MAX_NEW_TOKENS_LIMIT",
           "MAX_BATCH_SIZE"]

# Bounds on a run's work: tokens generated per turn and conversations per batch.
MAX_NEW_TOKENS_LIMIT = 4096
MAX_BATCH_SIZE = 256


def _expected_calls(message: dict) -> list[dict]:
    calls = []
    for call in message.get("tool_calls") or []:
        fn = call.get("function", call)
        args = fn.get("arguments", {})
        if isinstance(args, str):
            args = json.loads(args) if args.strip() else {}
        calls.append({"name": fn["name"], "arguments": args})
    return calls


def held_out_turns(records: Sequence[dict]) -> list[dict]:
    """Each assistant turn of each conversation: the messages before it (the
    prompt), the tools, and what the turn holds."""
    turns = []
    for r, rec in enumerate(records):
        for i, message in enumerate(rec["messages"]):
            if message.get("role") == "assistant" and i > 0:
                turns.append({"record": r, "turn": i, "prompt": rec["messages"][:i], "tools": rec.get("tools"),
                              "calls": _expected_calls(message), "content": message.get("content") or ""})
    return turns


def score_turn(expected_calls: list[dict], expected_content: str, parsed: dict) -> dict:
    """One turn's scores. For a turn with calls: names (the list of tool names
    equal, in order), arguments (the list of argument objects equal as JSON
    values), calls (both). For a content-only turn: content_only (no call and
    no parse error), content (the same text, surrounding whitespace aside)."""
    got = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in parsed["tool_calls"]]
    if expected_calls:
        names = [c["name"] for c in got] == [c["name"] for c in expected_calls]
        arguments = [c["arguments"] for c in got] == [c["arguments"] for c in expected_calls]
        return {"kind": "call", "names": names, "arguments": arguments, "calls": names and arguments,
                "parse_error": parsed["error"]}
    content_only = not got and parsed["error"] is None
    same = content_only and (parsed["content"] or "").strip() == expected_content.strip()
    return {"kind": "content", "content_only": content_only, "content": same, "parse_error": parsed["error"]}


def summarize(scores: Sequence[dict]) -> dict:
    """Exact-match rates over the turns (None where there are no such turns)."""
    calls = [s for s in scores if s["kind"] == "call"]
    content = [s for s in scores if s["kind"] == "content"]

    def rate(rows, key):
        return round(sum(bool(s[key]) for s in rows) / len(rows), 4) if rows else None

    return {"turns": len(scores), "call_turns": len(calls), "content_turns": len(content),
            "tool_name": rate(calls, "names"), "arguments": rate(calls, "arguments"), "call_list": rate(calls, "calls"),
            "content_only": rate(content, "content_only"), "content_exact": rate(content, "content"),
            "parse_errors": sum(s["parse_error"] is not None for s in scores)}


def report_table(metrics: dict, fmt: str) -> str:
    def pct(v):
        return "   n/a" if v is None else f"{100 * v:5.1f}%"

    rows = [("tool name exact match", metrics["tool_name"], metrics["call_turns"]),
            ("arguments exact match", metrics["arguments"], metrics["call_turns"]),
            ("whole call list exact match", metrics["call_list"], metrics["call_turns"]),
            ("content-only turns without a call", metrics["content_only"], metrics["content_turns"]),
            ("content-only turns, same text", metrics["content_exact"], metrics["content_turns"])]
    lines = [f"tool-call eval: {metrics['turns']} assistant turns, parsed as '{fmt}' "
             f"({metrics['parse_errors']} parse errors)"]
    lines += [f"  {name:<36} {pct(value)}  of {n} turns" for name, value, n in rows]
    return "\n".join(lines)


def _stop_ids(tokenizer) -> list[int]:
    """The ids of the tokens that end an assistant turn (the tool-call parsers' list,
    chat.stop_tokens) that the tokenizer has, and its eos token: they stop generation."""
    from .chat import stop_tokens

    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in stop_tokens() if t in vocab]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def generate_replies(model, tokenizer, template, turns: Sequence[dict], batch_size: int = 8,
                     max_new_tokens: int = 256) -> list[str]:
    """Greedy replies to each turn's prompt, batch_size prompts at a time
    (left-padded), each up to and including its stop token."""
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be in 1..{MAX_BATCH_SIZE}, got {batch_size}")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise ValueError(f"max_new_tokens must be in 1..{MAX_NEW_TOKENS_LIMIT}, got {max_new_tokens}")
    stops = _stop_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    special = getattr(tokenizer, "special_tokens_map", {})
    device = next(p for p in model.parameters() if p.is_floating_point()).device
    replies = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(turns), batch_size):
                batch = turns[start:start + batch_size]
                prompts = [tokenizer(template.apply(t["prompt"], tools=t["tools"], add_generation_prompt=True,
                                                    **special), add_special_tokens=False).input_ids for t in batch]
                width = max(map(len, prompts))
                ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, eos_token_id=stops, pad_token_id=pad)
                for row in out[:, width:].tolist():
                    end = next((k + 1 for k, tok in enumerate(row) if tok in stops), len(row))
                    replies.append(tokenizer.decode(row[:end], skip_special_tokens=False))
    finally:
        model.train(was_training)
    return replies


def evaluate_model(model, tokenizer, template, records: Sequence[dict], batch_size: int = 8,
                   max_new_tokens: int = 256) -> dict:
    """{"format", "metrics", "turns": [per-turn prompt position, reply, parse, scores]}."""
    from .chat import parse_tool_calls

    fmt = template.tool_call_format
    turns = held_out_turns(records)
    if not turns:
        raise ValueError("the held-out data has no assistant turns to generate")
    replies = generate_replies(model, tokenizer, template, turns, batch_size, max_new_tokens)
    rows = []
    for t, reply in zip(turns, replies):
        parsed = parse_tool_calls(reply, fmt, t["tools"])  # the schemas type raw-printed values
        rows.append({"record": t["record"], "turn": t["turn"], "expected_calls": t["calls"],
                     "expected_content": t["content"], "reply": reply, "parsed": parsed,
                     "scores": score_turn(t["calls"], t["content"], parsed)})
    return {"format": fmt, "metrics": summarize([r["scores"] for r in rows]), "turns": rows}


def evaluate(model: str, adapter: str, data: str, output: Optional[str] = None, batch_size: int = 8,
             max_new_tokens: int = 256, device: Optional[str] = None, dtype: str = "auto",
             log: Callable[[str], None] = print) -> dict:
    """Load the base model and adapter, evaluate them on held-out JSONL, write
    eval.json (into `output`, default the adapter's run directory) and return
    the report."""
    from .data import read_jsonl, template_for
    from .models import default_device, load, load_tokenizer
    from .peft_io import adapter_dir as find_adapter_dir, load_adapter

    records = read_jsonl(data)
    adapter_dir = find_adapter_dir(adapter)
    model_dir = Path(model)
    dev = torch.device(device) if device else default_device()
    torch_dtype = (torch.bfloat16 if dev.type == "cuda" else torch.float32) if dtype == "auto" else getattr(torch, dtype)
    tokenizer = load_tokenizer(adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else model_dir)
    model_type = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["model_type"]
    template = template_for(tokenizer, model_type, with_tools=any(r.get("tools") is not None for r in records))
    net = load(model_dir, dtype=torch_dtype, device=dev)
    load_adapter(net, adapter_dir)
    start = time.perf_counter()
    report = evaluate_model(net, tokenizer, template, records, batch_size, max_new_tokens)
    report.update({"model": str(model_dir), "adapter": str(adapter_dir), "data": str(data),
                   "seconds": round(time.perf_counter() - start, 2)})
    out_dir = Path(output) if output else adapter_dir.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    log(report_table(report["metrics"], report["format"]))
    log(f"per-turn results: {out_dir / 'eval.json'}")
    return report


def add_cli(subparsers) -> None:
    """`qforge eval`: registered by qforge.cli."""
    p = subparsers.add_parser("eval", help="tool-call exact match of a fine-tuned adapter on held-out chat JSONL",
                              description=__doc__)
    p.add_argument("--model", required=True, help="the base model directory the adapter was trained on")
    p.add_argument("--adapter", required=True, help="a run directory (its adapter/) or a PEFT adapter directory")
    p.add_argument("--data", required=True, help="held-out chat JSONL (the training format)")
    p.add_argument("--output", help="where eval.json goes (default: the run directory)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--device", help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto")
    p.set_defaults(func=lambda ns: 0 if evaluate(ns.model, ns.adapter, ns.data, ns.output, ns.batch_size,
                                                 ns.max_new_tokens, ns.device, ns.dtype) else 1)
