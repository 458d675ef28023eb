"""Chat templates and tool calling, rendered by qforge's C++ Jinja engine.

`ChatTemplate(source).apply(messages, tools=..., add_generation_prompt=...)`
renders byte-for-byte what transformers' `tokenizer.apply_chat_template(...,
tokenize=False)` renders. `parse_tool_calls(text)` reads tool calls back out
of generated text. `patch_tokenizer` and `assistant_masks` prepare training
data (loss only on the assistant's turns).
"""
from __future__ import annotations

import bisect
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .ops import chat as chat_ops
from .ops.chat import TemplateError  # re-exported: the error of every template call


# JSON for the engine: ASCII-escaped (Python's encoder is twice as fast so) and compact.
_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))
# Without the circular check (a dict entry per container): a cycle recurses to
# RecursionError, then the checked encoder names it. Before Python 3.12 the
# recursion limit also bounds the encoder's native stack (about 100 bytes a
# level), so a raised limit keeps the check.
_UNCHECKED_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), check_circular=False)
_UNCHECKED_MAX_RECURSION_LIMIT = 10_000


def engine_json(obj: Any) -> bytes:
    """`obj` as the JSON the C++ engine reads (qforge.ops.chat): ASCII-escaped, compact."""
    if sys.version_info >= (3, 12) or sys.getrecursionlimit() <= _UNCHECKED_MAX_RECURSION_LIMIT:
        try:
            return _UNCHECKED_ENCODER.encode(obj).encode("ascii")
        except RecursionError:
            pass  # circular or too deep: the checked encoder says which
    return _ENCODER.encode(obj).encode("ascii")


def tool_schema(tool: dict | Callable) -> dict:
    """A tool as a JSON schema: dicts pass through, Python functions are
    converted exactly as transformers does (get_json_schema)."""
    if isinstance(tool, dict):
        return tool
    if inspect.isfunction(tool) or inspect.ismethod(tool):
        from transformers.utils import get_json_schema

        return get_json_schema(tool)
    raise ValueError(
        "Tools should either be a JSON schema, or a callable function with type hints "
        "and a docstring suitable for auto-conversion to a schema."
    )


class ChatTemplate:
    """A compiled chat template (Jinja source as in tokenizer_config.json).

    The keyword limits bound every render (docs/chat.md, "Limits"; None keeps
    the engine's default): max_steps (loop iterations, calls and items walked
    by filters, 10M), max_output_bytes (the output and any one string or list,
    64 MiB), max_call_depth (nested macro calls and blocks, 200),
    max_stack_bytes (native stack of nested macro calls, 2 MiB). Reaching one
    raises TemplateError naming it (kind StepLimit, OutputLimit or
    RecursionError)."""

    def __init__(
        self,
        source: str,
        *,
        max_steps: int | None = None,
        max_output_bytes: int | None = None,
        max_call_depth: int | None = None,
        max_stack_bytes: int | None = None,
    ):
        self.source = source
        limits = {"max_steps": max_steps, "max_output_bytes": max_output_bytes,
                  "max_call_depth": max_call_depth, "max_stack_bytes": max_stack_bytes}
        for name, value in limits.items():
            bound = (1 << 31) if name == "max_call_depth" else (1 << 63)
            if value is not None and (type(value) is not int or not 0 < value < bound):
                raise ValueError(f"ChatTemplate: {name} must be a positive int below {bound}, got {value!r}")
        self._handle = chat_ops.compile_template(source.encode("utf-8", "surrogatepass"))
        if any(v is not None for v in limits.values()):
            chat_ops.set_limits(self._handle, *(v or 0 for v in limits.values()))

    def __del__(self):
        if getattr(self, "_handle", None):
            chat_ops.free_template(self._handle)
            self._handle = None

    def apply(
        self,
        messages: Sequence[dict],
        tools: Iterable[dict | Callable] | None = None,
        documents: Sequence[dict] | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        return_assistant_spans: bool = False,
        now: int | None = None,
        **kwargs,
    ):
        """Render like transformers' apply_chat_template(tokenize=False).
        With return_assistant_spans, also returns the {% generation %} spans
        as [(start, end)] string offsets. `now` (epoch seconds, UTC) fixes
        what strftime_now() sees."""
        request = {
            "messages": list(messages),
            "tools": None if tools is None else [tool_schema(t) for t in tools],
            "documents": documents,
            "add_generation_prompt": bool(add_generation_prompt),
            "continue_final_message": continue_final_message,
        }
        for key, value in kwargs.items():
            if key in request:
                raise TypeError(f"render() got multiple values for keyword argument '{key}'")
            request[key] = value
        text, spans = chat_ops.apply_template(self._handle, engine_json(request), now, return_assistant_spans)
        return (text, spans) if return_assistant_spans else text

    def apply_batch(
        self,
        conversations: Sequence[Sequence[dict]],
        tools: Iterable[dict | Callable] | None = None,
        documents: Sequence[dict] | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        threads: int = 0,
        now: int | None = None,
        **kwargs,
    ) -> list[str]:
        """apply() over many conversations that share tools/documents/kwargs,
        rendered in C++ on `threads` threads (0: all cores)."""
        shared = {
            "tools": None if tools is None else [tool_schema(t) for t in tools],
            "documents": documents,
            "add_generation_prompt": bool(add_generation_prompt),
            "continue_final_message": continue_final_message,
            **kwargs,
        }
        convs = conversations if isinstance(conversations, (list, tuple)) else list(conversations)
        if not all(isinstance(c, (list, tuple)) for c in convs):  # other sequences: copied into lists
            convs = [list(c) for c in convs]
        convs = engine_json(convs)
        return chat_ops.split_batch(*chat_ops.apply_batch_raw(self._handle, engine_json(shared), convs, len(conversations),
                                                              now, threads))

    @property
    def tool_call_format(self) -> str:
        """The tool-call format this template's model writes (detect_tool_call_format)."""
        return detect_tool_call_format(self.source)

    def parse(self, text: str | bytes, tools: Iterable[dict | Callable] | None = None) -> dict:
        """Tool calls (and reasoning) in text this template's model generated,
        read with the format detected from the template (parse_tool_calls)."""
        return parse_tool_calls(text, self.tool_call_format, tools)

    def stream_parser(self, tools: Iterable[dict | Callable] | None = None) -> "ToolCallStream":
        """An incremental parser for this template's model's streamed output."""
        return ToolCallStream(self.tool_call_format, tools)

    def render(self, now: int | None = None, **variables) -> str:
        """Render with exactly these template variables."""
        return chat_ops.render(self._handle, engine_json(variables), now)


def json_dumps(obj: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False) -> str:
    """Python's json.dumps, computed by the C++ value type (for tests)."""
    return chat_ops.json_dumps(engine_json(obj), ensure_ascii, indent, sort_keys)


def _utf8(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")


def tool_call_formats() -> list[str]:
    """The names parse_tool_calls accepts as `format` (besides "auto")."""
    return json.loads(chat_ops.tool_call_formats())


def stop_tokens() -> list[str]:
    """The tokens that end an assistant turn in the template families the parsers
    know (the parsers drop them from the end of a reply): where generation stops."""
    return json.loads(chat_ops.stop_tokens())


def detect_tool_call_format(template_source: str) -> str:
    """The tool-call format a chat template's model writes, told from markers
    in the template source; "auto" when none is known."""
    return chat_ops.detect_tool_call_format(template_source.encode("utf-8"))


def _tools_json(tools) -> bytes | None:
    return None if tools is None else engine_json([tool_schema(t) for t in tools])


def parse_tool_calls(text: str | bytes, format: str = "auto", tools: Iterable[dict | Callable] | None = None) -> dict:
    """Tool calls in generated text -> {"content", "reasoning_content",
    "tool_calls", "stop", "error", "format"}. `format` is "auto" (told from
    the text) or one of tool_call_formats(); ChatTemplate.parse picks it from
    the template. Never raises for any text (only for an unknown format):
    malformed calls come back as content with "error" set. `text` may also be bytes (UTF-8 as the model produced it);
    invalid UTF-8, lone surrogates in `text` and lone surrogate JSON escapes
    ("\\ud800") read as U+FFFD (docs/chat.md, "Tool-call parsing"). `tools`
    (the schemas the model was given) keep parameters declared strings as
    strings in formats that print values raw (XML parameters, GLM, MiniMax)."""
    return json.loads(chat_ops.parse_tool_calls(_utf8(text), format, _tools_json(tools)))


class ToolCallStream:
    """Incremental tool-call parsing of streamed text: feed(chunk) returns the
    content, reasoning and calls complete so far (a call still being written
    is not reported); finish() returns what parse_tool_calls gives for the
    whole text."""

    def __init__(self, format: str = "auto", tools: Iterable[dict | Callable] | None = None):
        self._handle = chat_ops.stream_new(format, _tools_json(tools))

    def __del__(self):
        if getattr(self, "_handle", None):
            chat_ops.stream_free(self._handle)
            self._handle = None

    def feed(self, chunk: str | bytes) -> dict:
        return json.loads(chat_ops.stream_feed(self._handle, _utf8(chunk)))

    def finish(self) -> dict:
        return json.loads(chat_ops.stream_finish(self._handle))


# ------------------------------------------------------------ tokenizers
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<|eom_id|>", "<|python_tag|>",
)
# An original Llama 3 tokenizer holds these placeholders where Llama 3.1 put
# the tool-calling tokens (same ids: 128008, 128010, 128004).
LLAMA3_RENAMES = {
    "<|reserved_special_token_4|>": "<|eom_id|>",
    "<|reserved_special_token_5|>": "<|python_tag|>",
    "<|reserved_special_token_2|>": "<|finetune_right_pad_id|>",
}


def _rename_fast_tokenizer_tokens(tokenizer, renames: dict[str, str]) -> list[str]:
    """Rename added tokens of a fast tokenizer in place, keeping their ids."""
    from tokenizers import Tokenizer

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    present = {t["content"] for t in state.get("added_tokens", [])}
    done = []
    for old, new in renames.items():
        if old not in present or new in present:
            continue
        for t in state["added_tokens"]:
            if t["content"] == old:
                t["content"] = new
                t["special"] = True
        vocab = state.get("model", {}).get("vocab")
        if isinstance(vocab, dict) and old in vocab:
            vocab[new] = vocab.pop(old)
        done.append(new)
    if done:
        tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))
        decoder = getattr(tokenizer, "_added_tokens_decoder", None)
        if isinstance(decoder, dict):
            for idx, tok in list(decoder.items()):
                content = str(tok)
                if content in renames and renames[content] in done:
                    from tokenizers import AddedToken

                    decoder[idx] = AddedToken(renames[content], special=True, normalized=False)
        encoder = getattr(tokenizer, "_added_tokens_encoder", None)
        if isinstance(encoder, dict):
            for old, new in renames.items():
                if new in done and old in encoder:
                    encoder[new] = encoder.pop(old)
    return done


def patch_tokenizer(tokenizer, model=None, tokens: Sequence[str] = LLAMA3_SPECIAL_TOKENS,
                    renames: dict[str, str] | None = None) -> dict:
    """Make sure every token in `tokens` exists as a special token of a Hugging
    Face tokenizer, found by content (never by id). Placeholders named in
    `renames` (default: the Llama 3 reserved tokens at the ids Llama 3.1 uses
    for <|eom_id|>/<|python_tag|>) are renamed in place rather than duplicated.
    Only tokens that are truly new are appended, and only then is the model's
    embedding resized (model.resize_token_embeddings). Returns
    {"renamed": [...], "added": [...], "resized": bool}."""
    renames = LLAMA3_RENAMES if renames is None else renames
    vocab = tokenizer.get_vocab()
    wanted = {renames[old]: old for old in renames if renames[old] in tokens}
    to_rename = {old: new for new, old in wanted.items() if new not in vocab and old in vocab}
    renamed = _rename_fast_tokenizer_tokens(tokenizer, to_rename) if to_rename else []
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    added = []
    if missing:
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
        added = missing
    resized = False
    if added and model is not None:
        embeddings = model.get_input_embeddings()
        if embeddings.weight.shape[0] < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
            resized = True
    return {"renamed": renamed, "added": added, "resized": resized}


# ------------------------------------------------------------ loss masks
# The old method (full prefixes rendered per assistant turn) is used where
# windows do not reproduce the full render; it may render at most this many
# messages in all, plus EXACT_SPAN_RENDERS_PER_MESSAGE per message of the
# conversation, before assistant_spans gives up (ValueError).
EXACT_SPAN_RENDER_BUDGET = 65536
EXACT_SPAN_RENDERS_PER_MESSAGE = 8


def assistant_spans(template: ChatTemplate, messages: Sequence[dict], **kwargs) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) string spans of the
    assistant's turns (tool calls included; tool/ipython results excluded).
    Uses the template's {% generation %} blocks when it has them, else the
    rendered-offset method: turn i spans from the end of the conversation up
    to it rendered with add_generation_prompt=True to the end of the
    conversation through it, which must both be prefixes of the full render.

    Time is linear in the conversation's length: turn k is rendered in a
    window (a leading system message, then the messages from after turn k-2
    through turn k, started at the same parity so role-alternation checks
    hold), and its text must appear in the full render right where turn k-1
    ended. Where it does not (a template that renders a turn differently
    depending on messages outside the window), the turn falls back to full
    prefixes, within EXACT_SPAN_RENDER_BUDGET."""
    kwargs.pop("add_generation_prompt", None)
    kwargs.pop("continue_final_message", None)
    if re.search(r"\{%-?\s*generation\s*-?%\}", template.source):
        text, spans = template.apply(messages, return_assistant_spans=True, **kwargs)
        return text, [tuple(s) for s in spans]
    text = template.apply(messages, **kwargs)
    turns = [i for i, message in enumerate(messages) if message.get("role") == "assistant"]
    head = 1 if messages and messages[0].get("role") == "system" else 0
    windows = {}  # turn number k -> first message of its window after the head
    for k in range(1, len(turns)):
        first = turns[k - 2] + 1 if k >= 2 else 0
        first -= (first - head) % 2
        if first > head:
            windows[k] = first
    order = list(windows)
    # for window j: [through turn k-1, through turn k] without, [up to turn k] with the generation prompt
    closed = [messages[:head] + messages[windows[k]:turns[k - 1] + 1] for k in order]
    closed += [messages[:head] + messages[windows[k]:turns[k] + 1] for k in order]
    opened = [messages[:head] + messages[windows[k]:turns[k]] for k in order]
    closed = _render_each(template, closed, False, kwargs)
    opened = _render_each(template, opened, True, kwargs)
    budget = EXACT_SPAN_RENDER_BUDGET + EXACT_SPAN_RENDERS_PER_MESSAGE * len(messages)
    spans, end = [], 0  # end: where turn k-1 ends in text
    slot = {k: j for j, k in enumerate(order)}
    for k, i in enumerate(turns):
        found = None
        if k in slot:
            before, after, prompt = closed[slot[k]], closed[len(order) + slot[k]], opened[slot[k]]
            if None not in (before, after, prompt) and after.startswith(prompt) and prompt.startswith(before):
                turn = after[len(before):]  # the messages after turn k-1 through turn k
                if text.startswith(turn, end):
                    found = (end + len(prompt) - len(before), end + len(turn))
        if found is None:
            budget -= 2 * i + 1
            if budget < 0:
                raise ValueError(
                    f"cannot locate assistant message {i} in linear time: the template renders turns differently "
                    "depending on messages outside a window, and the full-prefix method's budget "
                    f"(EXACT_SPAN_RENDER_BUDGET = {EXACT_SPAN_RENDER_BUDGET}) is spent; add {{% generation %}} "
                    "blocks to the template instead")
            prefix = template.apply(messages[:i], add_generation_prompt=True, **kwargs) if i else ""
            full = template.apply(messages[: i + 1], **kwargs)
            if not (full.startswith(prefix) and text.startswith(full)):
                raise ValueError(
                    f"cannot locate assistant message {i} by rendered offsets: the template does not render "
                    "conversations as prefixes of each other (e.g. it rewrites earlier turns); add "
                    "{% generation %} blocks to the template instead")
            found = (len(prefix), len(full))
        if found[1] > found[0]:
            spans.append(found)
        end = found[1]
    return text, spans


def _render_each(template: ChatTemplate, conversations: list, add_generation_prompt: bool, kwargs: dict) -> list:
    """Each conversation rendered, None where the template refuses it."""
    try:
        return template.apply_batch(conversations, add_generation_prompt=add_generation_prompt, threads=1, **kwargs)
    except ValueError:  # TemplateError is one: find which, one by one
        out = []
        for messages in conversations:
            try:
                out.append(template.apply(messages, add_generation_prompt=add_generation_prompt, **kwargs))
            except ValueError:
                out.append(None)
        return out


def train_on_responses_only(template: ChatTemplate, messages: Sequence[dict], tokenizer,
                            ignore_index: int = -100, **kwargs) -> dict:
    """Tokenize a conversation for training with the loss on the assistant's
    turns only: {"input_ids", "attention_mask", "labels", "assistant_masks"};
    labels are ignore_index outside the assistant's spans. As transformers
    does, the tokenizer's special tokens (bos_token, ...) are template
    variables unless kwargs override them."""
    kwargs = {**getattr(tokenizer, "special_tokens_map", {}), **kwargs}
    text, spans = assistant_spans(template, messages, **kwargs)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    inside = _span_membership(spans)
    mask = [1 if inside(start, end) else 0 for start, end in enc["offset_mapping"]]
    ids = list(enc["input_ids"])
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": [t if m else ignore_index for t, m in zip(ids, mask)],
        "assistant_masks": mask,
    }


def _span_membership(spans: Sequence[tuple[int, int]]) -> Callable[[int, int], bool]:
    """inside(start, end): whether the token [start, end) overlaps a span (an
    empty token: lies in one), in O(log spans) per token."""
    merged = []  # the union of the non-empty spans, as sorted disjoint [start, end)
    for s, e in sorted(sp for sp in spans if sp[1] > sp[0]):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    starts = [s for s, _ in merged]
    points = sorted(s for s, e in spans if s == e)  # empty spans overlap the tokens around them

    def inside(start: int, end: int) -> bool:
        if end > start:
            j = bisect.bisect_left(starts, end) - 1
            if j >= 0 and merged[j][1] > start:
                return True
            p = bisect.bisect_right(points, start)
            return p < len(points) and points[p] < end
        j = bisect.bisect_right(starts, start) - 1
        return j >= 0 and start < merged[j][1]

    return inside


# ------------------------------------------------------------ tokenizer_config.json
def llama3_template(version: str = "3.1") -> str:
    """The official Llama 3.1 / 3.2 / 3.3 chat template (for tokenizers without one)."""
    minor = {"3.1": 1, "3.2": 2, "3.3": 3}.get(str(version))
    raw = chat_ops.llama3_template(minor) if minor else None
    if not raw:
        raise ValueError(f"no shipped Llama template for version {version!r} (have 3.1, 3.2, 3.3)")
    return raw.decode("utf-8")


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def select_chat_template(templates, name: str | None = None, tools=None) -> str | None:
    """The template source to render with, as transformers' get_chat_template
    picks it: `templates` is one source (str), named sources (a dict, or
    tokenizer_config.json's list of {"name", "template"}), or None (then None).
    Among named ones: `name`, else "tool_use" when tools are given (any
    non-None `tools`) and it exists, else "default"; ValueError naming the
    templates there are otherwise."""
    if isinstance(templates, list):
        templates = {t["name"]: t["template"] for t in templates}
    if not isinstance(templates, dict):
        if name not in (None, "default"):
            raise ValueError(f"tokenizer config has a single chat template, not one named {name!r}")
        return templates
    if name is None:
        name = "tool_use" if tools is not None and "tool_use" in templates else "default"
    if name not in templates:
        raise ValueError(f"tokenizer config has no chat template named {name!r} (has {sorted(templates)})")
    return templates[name]


def load_tokenizer_config(config: str | Path | dict, name: str | None = None, tools=None,
                          fallback: str | None = None) -> tuple[ChatTemplate, dict]:
    """(template, special tokens) from a tokenizer_config.json (path or dict).
    Named templates are chosen by select_chat_template(`name`, `tools`). `fallback` is a
    Llama version ("3.1", ...) whose shipped template is used when the config
    has none."""
    folder = None
    if not isinstance(config, dict):
        folder = Path(config).parent
        config = json.loads(Path(config).read_text(encoding="utf-8"))
    source = config.get("chat_template")
    if source is None and folder is not None:
        # newer checkpoints keep the template(s) beside the config: chat_template.jinja,
        # additional_chat_templates/<name>.jinja
        named = {p.stem: p.read_text(encoding="utf-8") for p in sorted((folder / "additional_chat_templates").glob("*.jinja"))}
        if (folder / "chat_template.jinja").is_file():
            named["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if named:
            source = named["default"] if list(named) == ["default"] else [{"name": k, "template": v} for k, v in named.items()]
    source = select_chat_template(source, name, tools)
    if source is None:
        if fallback is None:
            raise ValueError("tokenizer config has no chat_template (pass a Llama version to use a shipped one)")
        source = llama3_template(fallback)
    special = {}
    for key in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
        text = _token_text(config.get(key))
        if text is not None:
            special[key] = text
    return ChatTemplate(source), special


# ------------------------------------------------------------ command line
def _read_json(path: str):
    import sys

    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    return json.loads(text)


def _cmd_render(args) -> int:
    import sys

    data = _read_json(args.messages)
    messages = data["messages"] if isinstance(data, dict) else data
    tools = _read_json(args.tools) if args.tools else (data.get("tools") if isinstance(data, dict) else None)
    try:  # a template that does not compile is reported like one that fails to render
        if args.template:
            tmpl, special = ChatTemplate(Path(args.template).read_text(encoding="utf-8")), {}
        else:
            tmpl, special = load_tokenizer_config(args.tokenizer_config, args.template_name, tools, args.llama_fallback)
    except TemplateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    variables = dict(special)
    for item in args.var or []:
        key, _, value = item.partition("=")
        try:
            variables[key] = json.loads(value)
        except json.JSONDecodeError:
            variables[key] = value
    try:
        if args.show_assistant:
            text, spans = assistant_spans(tmpl, messages, tools=tools, **variables)
        else:
            text = tmpl.apply(messages, tools=tools, add_generation_prompt=args.add_generation_prompt,
                              continue_final_message=args.continue_final_message, **variables)
    except (TemplateError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.show_assistant:
        out, last = [], 0
        for s, e in spans:  # assistant (trained-on) text between >>> and <<<
            out += [text[last:s], ">>>", text[s:e], "<<<"]
            last = e
        out.append(text[last:])
        text = "".join(out)
    sys.stdout.write(text)  # exactly the rendered text, no newline added
    return 0


def _cmd_parse(args) -> int:
    import sys

    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    fmt = detect_tool_call_format(Path(args.template).read_text(encoding="utf-8")) if args.template else args.format
    result = parse_tool_calls(text, fmt)
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return 0 if result["error"] is None else 1


def add_cli(subparsers) -> None:
    """`qforge chat render|parse`: check conversations before training."""
    chat = subparsers.add_parser("chat", help="render chat templates, parse tool calls")
    sub = chat.add_subparsers(dest="chat_command", required=True)
    render = sub.add_parser("render", help="render a conversation exactly as transformers' apply_chat_template")
    src = render.add_mutually_exclusive_group(required=True)
    src.add_argument("--template", help="a Jinja chat template file")
    src.add_argument("--tokenizer-config", help="a tokenizer_config.json (its chat_template and special tokens)")
    render.add_argument("--template-name", help="named template in the config (default / tool_use)")
    render.add_argument("--llama-fallback", help="Llama version (3.1/3.2/3.3) whose template to use if the config has none")
    render.add_argument("--messages", required=True, help="JSON list of messages (or {messages, tools}); - for stdin")
    render.add_argument("--tools", help="JSON list of tool schemas")
    render.add_argument("--add-generation-prompt", action="store_true")
    render.add_argument("--continue-final-message", action="store_true")
    render.add_argument("--show-assistant", action="store_true",
                        help="mark the assistant spans that train_on_responses_only keeps with >>> <<<")
    render.add_argument("--var", action="append", metavar="KEY=JSON", help="extra template variable (date_string=...)")
    render.set_defaults(func=_cmd_render)
    parse = sub.add_parser("parse", help="parse tool calls out of generated text (prints JSON)")
    parse.add_argument("file", nargs="?", default="-", help="text file; - for stdin")
    fmt = parse.add_mutually_exclusive_group()
    fmt.add_argument("--format", default="auto",
                     help="auto, or a tool-call format (llama3, hermes, mistral, deepseek, ...; see docs/chat.md)")
    fmt.add_argument("--template", help="a Jinja chat template file: parse in the format its model writes")
    parse.set_defaults(func=_cmd_parse)
