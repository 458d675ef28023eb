"""ChatTemplate.apply_batch hands conversations to C++ as Python marshal data
(src/chat/marshal.cpp). Random nested values go through it and must reach
the template exactly as jinja2 sees the Python objects: printed with Python's
str() (tuples stay tuples, floats keep their repr, big ints) and with tojson.
Bad data fails with a clear error."""
from __future__ import annotations

import marshal
import random
import struct
from collections import OrderedDict

import pytest

from qforge import chat as qchat
from qforge.chat import ChatTemplate
from qforge.ops import chat as chat_ops

jinja2 = pytest.importorskip("jinja2")
ctu = pytest.importorskip("transformers.utils.chat_template_utils")

SOURCE = "{% for m in messages %}{{ m['content'] }}|{{ m['content'] | tojson }}|{{ m.get('extra') }}\n{% endfor %}"
PIECES = ["a", "wörld", "日本語", "🚀", "\n", '"', "\\", "\u2028", "\x00", "role", "content"]


def value(rng, depth=0):
    r = rng.random()
    if depth > 3 or r < 0.4:
        return rng.choice([
            "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 300 if rng.random() < 0.1 else 6))),
            rng.randint(-2**31, 2**31 - 1), rng.randint(-2**63, 2**63 - 1), rng.choice([2**63 - 1, -2**63]),
            rng.uniform(-1e6, 1e6), 1e300, -0.0, True, False, None])
    if r < 0.6:
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if r < 0.7:
        return tuple(value(rng, depth + 1) for _ in range(rng.randint(0, 3)))
    return {rng.choice(PIECES) + str(i): value(rng, depth + 1) for i in range(rng.randint(0, 4))}


@pytest.mark.parametrize("seed", range(6))
def test_marshal_batch_equals_jinja2(seed):
    rng = random.Random(seed)
    shared_key = "role"  # the same str object in every message: marshal writes back-references to it
    convs = []
    for _ in range(20):
        msgs = []
        for _ in range(rng.randint(1, 4)):
            m = {shared_key: "user", "content": value(rng)}
            if rng.random() < 0.5:
                m["extra"] = value(rng)
            msgs.append(m)
        convs.append(msgs)
    if seed == 0:  # one object listed twice: a marshal reference to a whole dict
        convs[0].append(convs[0][0])
    py = ctu._compile_jinja_template(SOURCE)
    expected = [py.render(messages=m) for m in convs]
    assert qchat._conversations(convs)[1] == chat_ops.CHAT_MARSHAL
    for threads in (1, 3):
        assert ChatTemplate(SOURCE).apply_batch(convs, threads=threads) == expected


def test_tuples_stay_tuples():
    convs = [[{"role": "user", "content": (1, "a", (2.5,))}]]
    assert ChatTemplate("{{ messages[0].content }}").apply_batch(convs) == ["(1, 'a', (2.5,))"]


def test_unmarshallable_types_fall_back_to_json():
    convs = [[OrderedDict(role="user", content="hi")]]
    assert qchat._conversations(convs)[1] == chat_ops.CHAT_JSON
    assert ChatTemplate("{{ messages[0].content }}").apply_batch(convs) == ["hi"]


def test_non_chat_types_are_refused():
    with pytest.raises(ValueError, match="unsupported type code"):
        ChatTemplate("{{ messages }}").apply_batch([[{"role": "user", "content": b"bytes"}]])


def call_marshal(data: bytes, n: int):
    tmpl = ChatTemplate("x")
    chat_ops.apply_batch_raw(tmpl._handle, b"{}", data, chat_ops.CHAT_MARSHAL, n, now=0, threads=1)


@pytest.mark.parametrize("doc", [b"", b"[", b"[\x02\x00\x00\x00N", b"[\x01\x00\x00\x00r\x00\x00\x00\x00",
                                 b"[\xff\xff\xff\xff", b"NN", b"\xe9\x01\x00", b"{N"])
def test_bad_marshal_data_is_an_error(doc):
    with pytest.raises(ValueError, match="invalid marshal data|messages must be a list"):
        call_marshal(struct.pack("<q", len(doc)) + doc, 1)


@pytest.mark.parametrize("data, n, message", [
    (b"\x01\x00", 1, "cannot hold the sizes of 1 documents"),
    (struct.pack("<q", -1) + b"N", 1, "claims -1 bytes, 1 remain"),
    (struct.pack("<qq", 1, 5) + b"[\x00", 2, "conversation 1 claims 5 bytes, 1 remain"),
    (struct.pack("<q", 1) + b"NN", 1, "1 bytes after the last marshal conversation"),
])
def test_bad_marshal_framing_is_an_error(data, n, message):
    with pytest.raises(ValueError, match=message):
        call_marshal(data, n)


def test_conversations_travel_as_one_marshal_document_each():
    convs = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b" * 300}], []]
    data, fmt = qchat._conversations(convs)
    assert fmt == chat_ops.CHAT_MARSHAL
    sizes = struct.unpack_from("<3q", data)
    docs, at = [], 24
    for size in sizes:
        docs.append(marshal.loads(data[at:at + size]))
        at += size
    assert at == len(data) and docs == convs
