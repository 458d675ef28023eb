"""Chat bindings: the ctypes declarations of qforge.h's chat entries (`qf_chat_*`),
each wrapped to take and return Python bytes and str. Template errors come back as
`TemplateError`. The public API is qforge.chat; nothing here imports torch.
"""
from __future__ import annotations

import ctypes
import re

from .._lib import check, declare

_p = ctypes.c_void_p
_compile = declare("qf_chat_template_compile", ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(_p))
_free_tmpl = declare("qf_chat_template_free", _p, restype=None)
_set_limits = declare(
    "qf_chat_template_set_limits", _p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int64
)
_apply = declare(
    "qf_chat_apply_template", _p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int64, ctypes.POINTER(_p),
    ctypes.POINTER(ctypes.c_int64), ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t),
)
_batch = declare(
    "qf_chat_apply_batch", _p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int64,
    ctypes.c_int, ctypes.POINTER(_p), ctypes.POINTER(ctypes.c_int64), ctypes.c_size_t, ctypes.c_int,
)
_render = declare("qf_chat_template_render", _p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int64, ctypes.POINTER(_p))
_formats = declare("qf_chat_tool_call_formats", ctypes.POINTER(_p))
_stop_tokens = declare("qf_chat_stop_tokens", ctypes.POINTER(_p))
_detect = declare("qf_chat_detect_tool_call_format", ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(_p))
_parse_for_tools = declare("qf_chat_parse_tool_calls_for_tools", ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                           ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(_p))
_stream_new = declare("qf_chat_tool_stream_new", ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(_p))
_stream_feed = declare("qf_chat_tool_stream_feed", _p, ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(_p))
_stream_finish = declare("qf_chat_tool_stream_finish", _p, ctypes.POINTER(_p))
_stream_free = declare("qf_chat_tool_stream_free", _p, restype=None)
_dumps = declare(
    "qf_chat_json_dumps", ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(_p)
)
_llama3 = declare("qf_chat_llama3_template", ctypes.c_int, restype=ctypes.c_char_p)
_buf_data = declare("qf_chat_buffer_data", _p, ctypes.POINTER(ctypes.c_size_t), restype=ctypes.c_void_p)
_buf_free = declare("qf_chat_buffer_free", _p, restype=None)

_ERROR_RE = re.compile(r"^(\w+): (.*?)(?: \(line (\d+):(\d+)\))?$", re.S)


class TemplateError(ValueError):
    """A template failed to compile or render. `kind` names the jinja2/Python
    exception it corresponds to (TemplateSyntaxError, TemplateError from
    raise_exception, UndefinedError, SecurityError, TypeError, ...)."""

    def __init__(self, kind: str, message: str, line: int = 0, column: int = 0):
        super().__init__(f"{kind}: {message}" + (f" (line {line}:{column})" if line else ""))
        self.kind, self.message, self.line, self.column = kind, message, line, column


def call(status: int) -> None:
    """_lib.check, with the core's "<Kind>: <message> (line L:C)" errors as TemplateError."""
    try:
        check(status)
    except ValueError as e:
        m = _ERROR_RE.match(str(e))
        if m and m.group(1)[:1].isupper() and m.group(1) not in ("invalid",):
            raise TemplateError(m.group(1), m.group(2), int(m.group(3) or 0), int(m.group(4) or 0)) from None
        raise


def _now(now: int | None) -> int:
    return -1 if now is None else int(now)


def _take(handle: ctypes.c_void_p) -> str:
    """The text of a qf_chat_buffer, which is freed."""
    n = ctypes.c_size_t()
    data = _buf_data(handle, ctypes.byref(n))
    try:
        # lone surrogates (from strings passed in, or '\ud800' in a template)
        # travel as their 3-byte forms: the str jinja2 would render
        return ctypes.string_at(data, n.value).decode("utf-8", "surrogatepass")
    finally:
        _buf_free(handle)


def compile_template(source: bytes) -> ctypes.c_void_p:
    """A compiled template's handle (free it with free_template)."""
    handle = ctypes.c_void_p()
    call(_compile(source, len(source), ctypes.byref(handle)))
    return handle


def free_template(handle: ctypes.c_void_p) -> None:
    _free_tmpl(handle)


def set_limits(handle: ctypes.c_void_p, max_steps: int, max_output_bytes: int, max_call_depth: int,
               max_stack_bytes: int) -> None:
    """qf_chat_template_set_limits (0 keeps a limit as it is)."""
    call(_set_limits(handle, max_steps, max_output_bytes, max_call_depth, max_stack_bytes))


def apply_template(handle: ctypes.c_void_p, request: bytes, now: int | None,
                   with_spans: bool) -> tuple[str, list[tuple[int, int]] | None]:
    """qf_chat_apply_template of a JSON request: (text, the {% generation %} spans
    as [(start, end)] string offsets when with_spans, else None)."""
    cap = 256 if with_spans else 0
    for _ in range(2):  # the first call says how many spans there are
        out = ctypes.c_void_p()
        spans = (ctypes.c_int64 * (2 * cap))() if cap else None
        n = ctypes.c_size_t()
        call(_apply(handle, request, len(request), _now(now), ctypes.byref(out), spans, cap,
                    ctypes.byref(n) if cap else None))
        text = _take(out)
        if not with_spans:
            return text, None
        if n.value <= cap:
            return text, [(spans[2 * i], spans[2 * i + 1]) for i in range(n.value)]
        cap = n.value
    raise ValueError(f"the template rendered more generation blocks ({n.value}) on a second render than the first")


def apply_batch_raw(handle: ctypes.c_void_p, shared: bytes, conversations: bytes, count: int,
                    now: int | None, threads: int) -> tuple[ctypes.c_void_p, ctypes.Array]:
    """One qf_chat_apply_batch of `count` conversations (a JSON list of message
    lists): the output buffer (read it with split_batch, or free it with
    free_buffer) and the count + 1 byte offsets of the texts in it."""
    offsets = (ctypes.c_int64 * (count + 1))()
    out = ctypes.c_void_p()
    call(_batch(handle, shared, len(shared), conversations, len(conversations), _now(now), int(threads),
                ctypes.byref(out), offsets, count + 1, 0))
    return out, offsets


def split_batch(out: ctypes.c_void_p, offsets: ctypes.Array) -> list[str]:
    """The texts of apply_batch_raw's buffer, which is freed."""
    size = ctypes.c_size_t()
    data = _buf_data(out, ctypes.byref(size))
    try:  # each output decoded from its byte range (no n-times larger str of everything)
        view = memoryview((ctypes.c_char * size.value).from_address(data)) if size.value else memoryview(b"")
        bounds = offsets[:]
        return [str(view[bounds[i]:bounds[i + 1]], "utf-8", "surrogatepass") for i in range(len(bounds) - 1)]
    finally:
        _buf_free(out)


def free_buffer(out: ctypes.c_void_p) -> None:
    _buf_free(out)


def render(handle: ctypes.c_void_p, variables: bytes, now: int | None) -> str:
    """qf_chat_template_render of a JSON object of template variables."""
    out = ctypes.c_void_p()
    call(_render(handle, variables, len(variables), _now(now), ctypes.byref(out)))
    return _take(out)


def json_dumps(raw: bytes, ensure_ascii: bool, indent: int | None, sort_keys: bool) -> str:
    out = ctypes.c_void_p()
    call(_dumps(raw, len(raw), int(ensure_ascii), -1 if indent is None else int(indent), int(sort_keys),
                ctypes.byref(out)))
    return _take(out)


def tool_call_formats() -> str:
    """The format names, as a JSON list."""
    out = ctypes.c_void_p()
    call(_formats(ctypes.byref(out)))
    return _take(out)


def stop_tokens() -> str:
    """The tokens that end a turn, as a JSON list."""
    out = ctypes.c_void_p()
    call(_stop_tokens(ctypes.byref(out)))
    return _take(out)


def detect_tool_call_format(source: bytes) -> str:
    out = ctypes.c_void_p()
    call(_detect(source, len(source), ctypes.byref(out)))
    return _take(out)


def parse_tool_calls(text: bytes, format: str, schemas: bytes | None) -> str:
    """qf_chat_parse_tool_calls_for_tools: the parse as JSON text."""
    out = ctypes.c_void_p()
    call(_parse_for_tools(text, len(text), format.encode(), schemas, len(schemas or b""), ctypes.byref(out)))
    return _take(out)


def stream_new(format: str, schemas: bytes | None) -> ctypes.c_void_p:
    """A tool-call stream's handle (free it with stream_free)."""
    handle = ctypes.c_void_p()
    call(_stream_new(format.encode(), schemas, len(schemas or b""), ctypes.byref(handle)))
    return handle


def stream_feed(handle: ctypes.c_void_p, chunk: bytes) -> str:
    out = ctypes.c_void_p()
    call(_stream_feed(handle, chunk, len(chunk), ctypes.byref(out)))
    return _take(out)


def stream_finish(handle: ctypes.c_void_p) -> str:
    out = ctypes.c_void_p()
    call(_stream_finish(handle, ctypes.byref(out)))
    return _take(out)


def stream_free(handle: ctypes.c_void_p) -> None:
    _stream_free(handle)


def llama3_template(minor: int) -> bytes | None:
    """The shipped Llama 3.<minor> template, None for other versions."""
    return _llama3(minor)
