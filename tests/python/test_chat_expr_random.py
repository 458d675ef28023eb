"""Random Jinja expressions (operators, filters, tests, methods, slicing,
literals) over a fixed context: qforge and jinja2 (transformers' config) must
print the same text, or both fail with the same exception class and message.
QF_EXPR_N sets how many (default 300)."""
from __future__ import annotations

import os
import random

import pytest

from qforge.chat import ChatTemplate, TemplateError

jinja2 = pytest.importorskip("jinja2")
ctu = pytest.importorskip("transformers.utils.chat_template_utils")

CTX = {"s": " Héllo, wörld ", "t": "a,b,,c", "n": 7, "m": -3, "f": 2.5, "z": 0, "b": True, "no": None,
       "l": [3, "x", None, 2.5, [1, 2]], "li": [4, 1, 3], "d": {"k": "v", "n": 1, "l": [1]}, "e": "", "el": []}
ATOMS = ["s", "t", "n", "m", "f", "z", "b", "no", "l", "li", "d", "e", "el", "undef", "'str'", "\"q'uote\"", "3", "-1",
         "0.5", "1e3", "true", "none", "[1, 'a']", "{'a': 1}", "(1, 2)", "d.k", "d['n']", "l[1]", "li[-1]", "s[1:4]",
         "li[::-1]", "t.split(',')", "s.strip()", "d.get('x', 'dflt')", "d.items()|list", "range(3)|list"]
BINOPS = ["+", "-", "*", "/", "//", "%", "~", "==", "!=", "<", ">=", "in", "not in", "and", "or"]
FILTERS = ["length", "trim", "upper", "lower", "string", "list", "first", "last", "join(',')", "tojson",
           "tojson(indent=2)", "default('D')", "sort", "unique|list", "reverse|list", "int", "float", "abs", "title",
           "capitalize", "replace('l', 'L')", "sum", "min", "max", "items|list", "dictsort", "indent(2)", "center(9)",
           "map('string')|list", "select|list", "reject('none')|list", "selectattr('k')|list", "count", "e", "safe",
           "round(1)", "wordcount", "batch(2)|list", "format"]
TESTS = ["defined", "undefined", "none", "string", "number", "integer", "float", "mapping", "iterable", "sequence",
         "boolean", "true", "false", "odd", "even", "divisibleby(2)", "in([1, 'x'])", "eq(7)", "lower", "upper",
         "callable", "sameas(none)"]


METHODS = ["s.split()", "s.rsplit(',', 1)", "t.split(',', 1)", "s.lstrip(' H')", "s.rstrip()", "s.upper()",
           "s.title()", "s.startswith(' H')", "s.endswith(('d ', 'x'))", "s.find('l')", "s.rfind('l')", "s.count('l')",
           "t.replace(',', ';', 2)", "'-'.join(['a', 'b'])", "s.center(20, '*')", "s.zfill(20)", "t.partition(',')",
           "s[::-2]", "s[-3:]", "li[1:]", "l[::2]", "t.splitlines()", "'%s|%d|%r' % ('a', 3, 'b')",
           "'{}-{x}'.format(1, x=2)", "d.keys()|list", "d.values()|list", "li.index(3)", "l.count(None)",
           "'a b'.title()", "s.isspace()", "'12'.isdigit()", "s.casefold()", "s.swapcase()"]


def expr(rng, depth=0):
    r = rng.random()
    if depth > 2 or r < 0.35:
        return rng.choice(ATOMS + METHODS)
    if r < 0.6:
        return f"({expr(rng, depth + 1)} {rng.choice(BINOPS)} {expr(rng, depth + 1)})"
    if r < 0.8:
        return f"({expr(rng, depth + 1)})|{rng.choice(FILTERS)}"
    if r < 0.9:
        return f"({expr(rng, depth + 1)} is {rng.choice(['', 'not '])}{rng.choice(TESTS)})"
    return f"({expr(rng, depth + 1)} if {expr(rng, depth + 1)} else {expr(rng, depth + 1)})"


def render_py(source):
    try:
        return "ok", ctu._compile_jinja_template(source).render(**CTX)
    except jinja2.TemplateSyntaxError as e:
        return "error", "TemplateSyntaxError"
    except Exception as e:  # noqa: BLE001
        return "error", f"{type(e).__name__}: {e}"


def render_qf(source):
    try:
        return "ok", ChatTemplate(source).render(**CTX)
    except TemplateError as e:  # same class and message as Python (syntax errors: class only)
        return "error", e.kind if e.kind == "TemplateSyntaxError" else f"{e.kind}: {e.message}"


def test_random_expressions_match_jinja2():
    rng = random.Random(os.environ.get("QF_EXPR_SEED", "qforge"))
    n = int(os.environ.get("QF_EXPR_N", "300"))
    mismatches = []
    for _ in range(n):
        source = "{{ " + expr(rng) + " }}"
        py, qf = render_py(source), render_qf(source)
        if py[1].startswith("<") or "object at 0x" in str(py[1]):
            continue  # CPython object reprs (generators, bound methods) cannot match byte for byte
        if py[0] != qf[0] or (py[0] == "ok" and py[1] != qf[1]):
            mismatches.append((source, py, qf))
    assert not mismatches, "\n".join(map(repr, mismatches[:10]))



def stmt(rng, depth=0):
    r = rng.random()
    body = lambda: "".join(stmt(rng, depth + 1) for _ in range(rng.randint(1, 3)))  # noqa: E731
    if depth > 2 or r < 0.3:
        return "{{ " + rng.choice(METHODS + ATOMS) + " }}" + rng.choice(["", " ", "\n", "  \n"])
    if r < 0.45:
        return "{% for x in " + rng.choice(["li", "l", "s", "d", "el", "t.split(',')", "range(3)"]) + \
               rng.choice(["", " if x"]) + " %}" + rng.choice(["{{ loop.index }}", "{{ x }}", "{{ loop.last }}"]) + \
               body() + rng.choice(["", "{% else %}E"]) + "{% endfor %}"
    if r < 0.6:
        return "{% if " + expr(rng, 2) + " %}" + body() + rng.choice(["", "{% else %}" + body()]) + "{% endif %}"
    if r < 0.7:
        return "{% set v = " + expr(rng, 2) + " %}{{ v }}"
    if r < 0.8:
        return "{%- set ns = namespace(c=0) -%}{% for x in li %}{% set ns.c = ns.c + x %}{% endfor %}{{ ns.c }}"
    if r < 0.9:
        return "{% macro mm(a, b='B') %}[{{ a }}{{ b }}]{% endmacro %}{{ mm(" + rng.choice(ATOMS) + ") }}"
    return rng.choice(["  {%- if b %} x {% endif -%}  \n", "\n  {% if b %}\n  y\n  {% endif %}\n",
                       "{# c #}\n", "{%+ if b %}z{% endif +%}\n", "{% raw %}{{ r }}{% endraw %}"])


def test_random_statements_match_jinja2():
    rng = random.Random(os.environ.get("QF_EXPR_SEED", "qforge") + "stmt")
    n = int(os.environ.get("QF_EXPR_N", "300")) // 2
    mismatches = []
    for _ in range(n):
        source = "".join(stmt(rng) for _ in range(rng.randint(1, 4)))
        py, qf = render_py(source), render_qf(source)
        if "object at 0x" in str(py[1]) or "<generator" in str(py[1]):
            continue
        if py[0] != qf[0] or (py[0] == "ok" and py[1] != qf[1]):
            mismatches.append((source, py, qf))
    assert not mismatches, "\n".join(map(repr, mismatches[:10]))
