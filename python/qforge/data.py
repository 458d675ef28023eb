"""Chat training data: JSONL of OpenAI-style conversations (with tools and
tool_calls) -> token ids rendered with the model's chat template by qforge's C++
engine, labels only on the assistant's turns -> packed, padding-free batches.

A JSONL line is ``{"messages": [...], "tools": [...]?}`` (a bare list of
messages is accepted too). Roles: system, user, assistant, tool (or ipython).
Assistant tool calls follow OpenAI: ``{"type": "function", "function": {"name",
"arguments"}}`` with arguments a JSON object or a JSON-encoded string.
"""
from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

__all__ = ["read_jsonl", "validate_record", "tokenize_records", "PackedBatches", "builtin_dataset",
           "template_for", "Example", "render_texts"]

_ROLES = ("system", "user", "assistant", "tool", "ipython")
IGNORE = -100


# ------------------------------------------------------------------ reading and validation
def validate_record(obj, where: str) -> dict:
    """A checked, normalised copy of one conversation; ValueError naming `where`."""
    if isinstance(obj, list):
        obj = {"messages": obj}
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with 'messages', got {type(obj).__name__}")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        w = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{w}: must be an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in _ROLES:
            raise ValueError(f"{w}: role {role!r} is not one of {', '.join(_ROLES)}")
        m = dict(m)
        content = m.get("content")
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise ValueError(f"{w}: only assistant messages may have tool_calls")
            if not isinstance(calls, list) or not calls:
                raise ValueError(f"{w}: tool_calls must be a non-empty list")
            norm = []
            for j, c in enumerate(calls):
                fn = c.get("function", c) if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise ValueError(f"{w}: tool_calls[{j}] needs a function name")
                args = fn.get("arguments", {})
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{w}: tool_calls[{j}].function.arguments is not valid JSON ({e})") from None
                if not isinstance(args, dict):
                    raise ValueError(f"{w}: tool_calls[{j}].function.arguments must be a JSON object")
                call = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
                if isinstance(c, dict) and "id" in c:
                    call["id"] = c["id"]
                norm.append(call)
            m["tool_calls"] = norm
            if content is None:
                m.pop("content", None)
        elif not isinstance(content, str):
            raise ValueError(f"{w}: content must be a string (got {type(content).__name__})")
        out.append(m)
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: no assistant message (nothing to train on)")
    tools = obj.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise ValueError(f"{where}: 'tools' must be a list of JSON schemas")
    return {"messages": out, "tools": tools}


def read_jsonl(path) -> list[dict]:
    """Every conversation of a JSONL file (blank lines skipped); the first bad
    line raises ValueError('FILE:LINE: reason')."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such data file")
    if not path.is_file():
        raise ValueError(f"{path}: not a file (expected chat JSONL)")
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte offset {e.start} "
                                 "of the line); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise ValueError(f"{where}: JSON nested too deeply for Python's parser (a conversation "
                                 "needs a few levels)") from None
            rec = validate_record(obj, where)
            rec["where"] = where
            records.append(rec)
    if not records:
        raise ValueError(f"{path}: no conversations")
    return records


# ------------------------------------------------------------------ tokenization
@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE outside the assistant's turns (unshifted, like transformers' labels)


def template_for(tokenizer, model_type: Optional[str] = None, with_tools: bool = True):
    """The tokenizer's chat template compiled by the C++ engine (Llama 3.1's
    shipped template when a Llama tokenizer has none). A tokenizer with named
    templates gives the one chat.select_chat_template picks, as transformers'
    apply_chat_template does: "tool_use" (when it has one) for conversations
    that carry tools (`with_tools`, the trainer's data), else "default"."""
    from .chat import ChatTemplate, llama3_template, select_chat_template

    source = select_chat_template(getattr(tokenizer, "chat_template", None), tools=[] if with_tools else None)
    if not source:
        if model_type == "llama":
            source = llama3_template("3.1")
        else:
            raise ValueError("the tokenizer has no chat_template; add one to tokenizer_config.json")
    return ChatTemplate(source)


def tokenize_records(records: Sequence[dict], tokenizer, template, max_seq_length: int,
                     on_too_long: str = "error") -> list[Example]:
    """Render and tokenize each conversation with assistant-only labels.
    ``on_too_long``: 'error' (ValueError naming the line) or 'skip'."""
    from .chat import TemplateError, train_on_responses_only

    out = []
    for k, rec in enumerate(records):
        where = rec.get("where", f"conversation {k}")
        kwargs = {"tools": rec["tools"]} if rec.get("tools") else {}
        try:
            enc = train_on_responses_only(template, rec["messages"], tokenizer, **kwargs)
        except (TemplateError, ValueError) as e:
            raise ValueError(f"{where}: the chat template cannot render this conversation ({e})") from None
        ids, labels = enc["input_ids"], enc["labels"]
        if len(ids) > max_seq_length:
            if on_too_long == "skip":
                continue
            raise ValueError(f"{where}: conversation is {len(ids)} tokens, longer than max_seq_length="
                             f"{max_seq_length} (raise --max-seq-length or shorten it)")
        if all(t == IGNORE for t in labels):
            raise ValueError(f"{where}: no assistant tokens after rendering (nothing to train on)")
        labels = list(labels)
        labels[0] = IGNORE  # never predict a conversation's first token from the previous one (packing)
        out.append(Example(list(ids), labels))
    if not out:
        raise ValueError("no conversation fits max_seq_length")
    return out


# ------------------------------------------------------------------ batching
class PackedBatches:
    """Padding-free batches: conversations shuffled per epoch (seeded) and packed
    greedily into rows of at most ``tokens_per_batch`` tokens; a batch is one row
    [1, T] with position_ids restarting at 0 for each conversation (transformers
    turns that into a block-diagonal causal mask) and the same boundaries as
    int32 ``cu_seqlens`` [0, end of conversation 1, ..., T] (qforge.attention
    takes them as they are, as transformers' ``cu_seq_lens_q``). Batch ``i`` is a pure function
    of (seed, i), so a resumed run sees exactly the batches it would have seen."""

    def __init__(self, examples: Sequence[Example], tokens_per_batch: int, seed: int = 0):
        longest = max(len(e.input_ids) for e in examples)
        if tokens_per_batch < longest:
            raise ValueError(f"tokens_per_batch {tokens_per_batch} is smaller than the longest conversation ({longest})")
        self.examples, self.tokens, self.seed = list(examples), tokens_per_batch, seed
        self._epochs: dict[int, list[list[int]]] = {}

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        rows = self._epochs.get(epoch)
        if rows is None:
            order = list(range(len(self.examples)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            rows, cur, n = [], [], 0
            for i in order:
                length = len(self.examples[i].input_ids)
                if cur and n + length > self.tokens:
                    rows.append(cur)
                    cur, n = [], 0
                cur.append(i)
                n += length
            if cur:
                rows.append(cur)
            self._epochs = {epoch: rows}  # keep one epoch
        return rows

    @property
    def batches_per_epoch(self) -> int:
        return len(self.epoch_rows(0))

    def locate(self, index: int) -> tuple[int, int]:
        epoch = 0
        while True:
            rows = self.epoch_rows(epoch)
            if index < len(rows):
                return epoch, index
            index -= len(rows)
            epoch += 1

    def batch(self, index: int) -> dict:
        epoch, i = self.locate(index)
        members = [self.examples[j] for j in self.epoch_rows(epoch)[i]]
        ids = [t for e in members for t in e.input_ids]
        labels = [t for e in members for t in e.labels]
        pos = [p for e in members for p in range(len(e.input_ids))]
        ends = list(itertools.accumulate(len(e.input_ids) for e in members))
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([pos], dtype=torch.long),
            "cu_seqlens": torch.tensor([0, *ends], dtype=torch.int32),
            "epoch": epoch,
        }

    def __iter__(self) -> Iterator[dict]:
        i = 0
        while True:
            yield self.batch(i)
            i += 1


# ------------------------------------------------------------------ the built-in dataset
_TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "calculate", "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {
            "expression": {"type": "string", "description": "e.g. 2 + 3 * 4"}}, "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Current local time in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}}, "required": ["city"]}}},
]
_CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Sydney", "Toronto", "Berlin", "Nairobi", "Madrid",
           "Seoul", "Dublin", "Quito", "Hanoi", "Prague", "Austin"]
_SKY = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy"]
_GREET = [("Hi!", "Hello! How can I help you today?"),
          ("Thanks, that's all.", "You're welcome! Have a great day."),
          ("Who are you?", "I am a small assistant that can check the weather, the time and do arithmetic."),
          ("What can you do?", "I can look up the weather or the local time in a city, and calculate expressions.")]


def builtin_dataset(n: int = 160, seed: int = 0) -> list[dict]:
    """A small synthetic tool-calling dataset (weather, time, calculator, chit-chat):
    user asks, assistant calls a tool with arguments copied from the question, the
    tool answers, the assistant words the answer. Deterministic for a seed."""
    rng = random.Random(seed)
    records = []
    for k in range(n):
        kind = k % 4
        system = {"role": "system", "content": "You are a helpful assistant with tools."}
        if kind == 0:
            city, unit = rng.choice(_CITIES), rng.choice(["celsius", "fahrenheit"])
            temp, sky = rng.randint(-5, 35) if unit == "celsius" else rng.randint(20, 95), rng.choice(_SKY)
            sym = "C" if unit == "celsius" else "F"
            msgs = [system, {"role": "user", "content": f"What's the weather in {city} in {unit}?"},
                    {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                        "name": "get_weather", "arguments": {"city": city, "unit": unit}}}]},
                    {"role": "tool", "content": json.dumps({"temperature": temp, "sky": sky})},
                    {"role": "assistant", "content": f"It is {temp} {sym} and {sky} in {city}."}]
        elif kind == 1:
            a, b, op = rng.randint(2, 99), rng.randint(2, 99), rng.choice(["+", "-", "*"])
            value = a + b if op == "+" else a - b if op == "-" else a * b
            msgs = [system, {"role": "user", "content": f"Please compute {a} {op} {b}."},
                    {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                        "name": "calculate", "arguments": {"expression": f"{a} {op} {b}"}}}]},
                    {"role": "tool", "content": json.dumps({"result": value})},
                    {"role": "assistant", "content": f"{a} {op} {b} = {value}."}]
        elif kind == 2:
            city, h, m = rng.choice(_CITIES), rng.randint(0, 23), rng.randint(0, 59)
            msgs = [system, {"role": "user", "content": f"What time is it in {city}?"},
                    {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                        "name": "get_time", "arguments": {"city": city}}}]},
                    {"role": "tool", "content": json.dumps({"time": f"{h:02d}:{m:02d}"})},
                    {"role": "assistant", "content": f"It is {h:02d}:{m:02d} in {city}."}]
        else:
            q, a = rng.choice(_GREET)
            msgs = [system, {"role": "user", "content": q}, {"role": "assistant", "content": a}]
        # the tool needed (and sometimes one more), so the model must read which tools it has
        tools = [_TOOLS[kind]] if kind < 3 else []
        if rng.random() < 0.3:
            tools.append(rng.choice([t for t in _TOOLS if t not in tools]))
        records.append({"messages": msgs, "tools": tools or None, "where": f"built-in dataset #{k}"})
    return records


def render_texts(records: Sequence[dict], template, special_tokens: Optional[dict] = None) -> list[str]:
    """The rendered conversations (to train the default tokenizer on)."""
    extra = dict(special_tokens or {})
    return [template.apply(r["messages"], tools=r.get("tools"), **extra) for r in records]
