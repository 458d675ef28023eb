"""The Jinja engine feature by feature: each snippet is rendered by qforge and
by jinja2 configured exactly as transformers configures it (compiled through
transformers' own _compile_jinja_template), outputs or failures compared."""
from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from collections import OrderedDict, UserList

import pytest
from conftest import child_env

from qforge.chat import ChatTemplate, TemplateError, json_dumps

jinja2 = pytest.importorskip("jinja2")
ctu = pytest.importorskip("transformers.utils.chat_template_utils")

CTX = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi 'there' \"you\" \\ é 日本 🚀"},
        {"role": "assistant", "content": " ok ", "tool_calls": [
            {"function": {"name": "f", "arguments": {"a": 1, "b": [1.5, None, True], "c": {"d": "e"}}}}]},
    ],
    "d": {"b": 2, "a": 1, "C": 3, "items": "key-named-items"},
    "l": [3, 1, 2],
    "s": "  Hello, World  ",
    "n": None,
    "f": 2.5,
    "i": -7,
    "big": 1e20,
    "small": 1.5e-7,
    "t": True,
    "e": "",
    "nested": {"x": [{"y": "z"}, {"y": "w"}]},
    "u": "naïve café ÉCOLE ß",
}

SNIPPETS = [
    # whitespace control, trim_blocks / lstrip_blocks
    "a\n  {% if t %}\n    yes\n  {% endif %}\nb",
    "a  {%- if t -%}  yes  {%- endif -%}  b",
    "a\n  {%+ if t %}x{% endif +%}\nb",
    "  {{ 'x' }}  \n  {# comment #}\n  end",
    "{# c -#}   \n  x {#- d #} y",
    "line1\n    {% for x in l %}\n    {{ x }}\n    {% endfor %}\nend\n",
    "{% raw %}{{ not rendered }}{% endraw %}\n  {%- raw -%}  {% x %}  {%- endraw %}!",
    "x\r\ny\r\n",
    "trailing newline kept? \n\n",
    "{{- '  a  ' -}}   b",
    # expressions and operators
    "{{ 1 + 2 * 3 - 4 / 2 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 2 ** 10 }} {{ 7 / 2 }}",
    "{{ 'a' ~ 1 ~ none ~ t ~ f }} {{ 'ab' * 3 }} {{ [1] + [2] }} {{ (1, 2) + (3,) }}",
    "{{ 1 < 2 < 3 }} {{ 1 < 3 < 2 }} {{ 'a' in 'cat' }} {{ 1 not in l }} {{ 'b' in d }} {{ not e }}",
    "{{ t and 'yes' or 'no' }} {{ e or 'default' }} {{ n and 1 }} {{ 'x' if t else 'y' }} {{ 'x' if e }}!",
    "{{ 1 == 1.0 }} {{ t == 1 }} {{ 'a' != 'b' }} {{ [1, 2] == [1, 2] }} {{ d == d }} {{ n == none }}",
    "{{ f }} {{ i }} {{ big }} {{ small }} {{ 0.1 + 0.2 }} {{ 1e16 }} {{ 123456789.0 }} {{ -0.0 }} {{ 3.0 }}",
    "{{ [1, 'a', none, t, 1.5, [2], {'k': 'v'}] }} {{ (1,) }} {{ () }} {{ d }} {{ {'a': \"it's\"} }}",
    "{{ 'a\\nb\\t\\'q\\'' }} {{ \"x\\\"y\" }} {{ 'a' 'b' }} {{ '\\u00e9\\x41' }}",
    # attribute / item access, slicing
    "{{ messages[0].role }} {{ messages[-1]['content'] }} {{ messages[1].content[:5] }} {{ l[::-1] }} {{ l[1:] }}",
    "{{ s[2:7] }}|{{ s[-3:] }}|{{ u[::2] }}|{{ u[1] }}|{{ l[10] }}|{{ d.missing }}|{{ d['missing'] }}|",
    "{{ d.items is callable }}{{ d['items'] }}|{{ nested.x[1].y }}|{{ nested['x'][0]['y'] }}|{{ l.0 }}",
    # filters
    "{{ s|trim }}|{{ s|trim('  H') }}|{{ s|upper }}|{{ s|lower }}|{{ u|upper }}|{{ u|title }}|{{ s|capitalize }}",
    "{{ l|length }} {{ d|length }} {{ s|length }} {{ u|length }} {{ undefined_var|length }} {{ l|count }}",
    "{{ l|join(', ') }} {{ l|sort|list }} {{ l|sort(reverse=true)|list }} {{ l|first }} {{ l|last }} {{ l|sum }}",
    "{{ d|dictsort }} {{ d|dictsort(reverse=true) }} {{ d|items|list }} {{ d|list }} {{ 'abc'|list }}",
    "{{ messages|map(attribute='role')|join('/') }} {{ messages|selectattr('role', 'equalto', 'user')|list|length }}",
    "{{ messages|rejectattr('role', 'in', ['system'])|map(attribute='role')|list }} {{ l|select('odd')|list }}",
    "{{ l|reject('even')|list }} {{ ['a', 'B', 'a']|unique|list }} {{ l|min }} {{ l|max }} {{ [1,2,3,4,5]|batch(2)|list }}",
    "{{ n|default('dflt') }} {{ undefined_var|default('dflt') }} {{ e|default('dflt', true) }} {{ 0|d(5, boolean=true) }}",
    "{{ 'a\\nb\\n\\nc'|indent }}|{{ 'a\\nb'|indent(2, true) }}|{{ 'a\\n\\nb'|indent(width='> ', blank=true) }}",
    "{{ '3'|int + 1 }} {{ '3.7'|int }} {{ 'x'|int }} {{ 'x'|int(9) }} {{ '2.5'|float }} {{ 3|float }} {{ -3|abs }}",
    "{{ s|replace('l', 'L') }} {{ s|replace('l', 'L', 1) }} {{ 'x'|center(9) }}| {{ 'a b  c'|wordcount }} {{ 2.567|round(2) }}",
    "{{ '<a href=\"x\">'|escape }} {{ '%s-%d'|format('a', 3) }} {{ 'abc'|reverse }} {{ l|reverse|list }} {{ l|string }}",
    # tojson (transformers' override)
    "{{ messages[2].tool_calls[0].function.arguments|tojson }}",
    "{{ CTX_D|tojson(indent=2) }}|{{ d|tojson(sort_keys=true) }}|{{ u|tojson }}|{{ u|tojson(ensure_ascii=true) }}",
    "{{ l|tojson(separators=(',', ':')) }} {{ d|tojson(indent=4, separators=(',', ': ')) }} {{ n|tojson }} {{ [f, big, small]|tojson }}",
    "{{ '<script>&'|tojson }} {{ {'nested': {'empty': {}, 'list': []}}|tojson(indent=1) }} {{ 'tab\\tnl\\n\\u0001'|tojson }}",
    # tests
    "{{ n is none }} {{ s is string }} {{ d is mapping }} {{ l is iterable }} {{ l is sequence }} {{ 3 is number }}",
    "{{ undefined_var is defined }} {{ d.a is defined }} {{ t is true }} {{ 1 is true }} {{ t is boolean }} {{ f is float }}",
    "{{ 4 is divisibleby 2 }} {{ 3 is odd }} {{ 'abc' is lower }} {{ 'ABC' is upper }} {{ 2 is in l }} {{ d is not none }}",
    "{{ i is integer }} {{ t is integer }} {{ 1 is sameas 1 }} {{ 1 is eq 1 }} {{ 2 is gt 1 }} {{ 'trim' is filter }}",
    # str / list / dict methods
    "{{ s.strip() }}|{{ s.lstrip() }}|{{ s.rstrip() }}|{{ 'xxaxx'.strip('x') }}|{{ s.split(',') }}|{{ 'a b  c'.split() }}",
    "{{ 'a,b,c'.split(',', 1) }} {{ 'a,b,c'.rsplit(',', 1) }} {{ 'a\\nb\\r\\nc'.splitlines() }} {{ s.startswith('  H') }}",
    "{{ s.endswith(('x', '  ')) }} {{ s.replace(' ', '_') }} {{ s.find('World') }} {{ u.find('café') }} {{ s.count('l') }}",
    "{{ '-'.join(['a', 'b']) }} {{ 'ab'.upper() }} {{ 'Ab'.lower() }} {{ 'hello world'.title() }} {{ 'hELLO'.capitalize() }}",
    "{{ '{} and {name}'.format(1, name='x') }} {{ '%s=%r' % ('k', 'v') }} {{ '42'.isdigit() }} {{ 'ab'.isalpha() }}",
    "{{ d.get('a') }} {{ d.get('zz') }} {{ d.get('zz', 5) }} {{ d.keys()|list }} {{ d.values()|list }} {{ l.index(1) }}",
    "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %} {{ 'a:b'.partition(':') }} {{ '7'.zfill(3) }}",
    "{{ 'abc'.removeprefix('a') }} {{ 'abc'.removesuffix('c') }} {{ 'ab'.ljust(4, '.') }}| {{ 'ab'.rjust(4) }}",
    # loops
    "{% for m in messages %}{{ loop.index }}/{{ loop.length }}:{{ loop.first }}{{ loop.last }}{{ loop.revindex }} {% endfor %}",
    "{% for x in l if x > 1 %}{{ x }}{{ loop.index }}{% else %}empty{% endfor %}|{% for x in [] %}x{% else %}empty{% endfor %}",
    "{% for x in l %}{% if x == 1 %}{% continue %}{% endif %}{% if x == 2 %}{% break %}{% endif %}{{ x }}{% endfor %}",
    "{% for x in l %}{{ loop.previtem }}-{{ loop.nextitem }}-{{ loop.cycle('a', 'b') }} {% endfor %}",
    "{% for x in [1, 1, 2, 2, 1] %}{{ loop.changed(x) }}{% endfor %}",
    "{% for a, b in [(1, 2), (3, 4)] %}{{ a + b }}{% endfor %} {% for c in 'héllo' %}{{ c }}.{% endfor %} {% for k in d %}{{ k }}{% endfor %}",
    "{% for x in [1, 2] %}{% for y in [3, 4] %}{{ loop.index }}{{ x }}{{ y }} {% endfor %}{% endfor %}",
    # scoping, set, namespace, macros
    "{% set x = 1 %}{% for i in l %}{% set x = x + i %}{{ x }}{% endfor %}{{ x }}",
    "{% set ns = namespace(total=0, items=[]) %}{% for i in l %}{% set ns.total = ns.total + i %}{% endfor %}{{ ns.total }} {{ ns.items }}",
    "{% set a, b = 1, 2 %}{{ a }}{{ b }}{% set c = [1, 2] %}{{ c }}{% set block %}  inner {{ a }}  {% endset %}[{{ block }}]",
    "{% set x %}  A  {% endset %}{% set y | trim %}  B  {% endset %}[{{ x }}][{{ y }}]",
    "{% macro m(a, b='B', c=none) %}[{{ a }}{{ b }}{{ c }}]{% endmacro %}{{ m(1) }}{{ m(1, 2) }}{{ m(a=3, c=4) }}{{ m() }}",
    "{% macro rec(n) %}{% if n > 0 %}{{ n }}{{ rec(n - 1) }}{% endif %}{% endmacro %}{{ rec(5) }}",
    "{% macro outer() %}{{ varargs }}{{ kwargs }}{% endmacro %}{{ outer(1, 2, k=3) }}",
    "{% macro lst() %}{{ caller() }}!{% endmacro %}{% call lst() %}inside{% endcall %}",
    "{% filter upper %}shout {{ 'this' }}{% endfilter %}",
    "{% if t %}a{% elif n %}b{% else %}c{% endif %}{% if n %}a{% elif t %}b{% else %}c{% endif %}{% if n %}a{% elif e %}b{% else %}c{% endif %}",
    "{% set d2 = dict(a=1, b=2) %}{{ d2 }} {{ dict(d2, c=3) }} {{ range(3)|list }} {{ range(1, 10, 3)|list }} {{ range(5, 0, -2)|list }}",
    "{{ strftime_now('%Y-%m-%d %H:%M %B %A %d %b') }}",
    "{% set comma = joiner(' | ') %}{% for x in l %}{{ comma() }}{{ x }}{% endfor %}",
    "{% set c = cycler('odd', 'even') %}{% for x in l %}{{ c.next() }}{{ c.current }} {% endfor %}{{ c.reset() }}{{ c.current }}",
    "{% generation %}gen {{ 1 }}{% endgeneration %} after",
    # undefined semantics
    "[{{ undefined_var }}] [{{ undefined_var ~ 'x' }}] {{ undefined_var is undefined }} {% for x in undefined_var %}x{% endfor %}",
    "{{ d.missing is defined }} {{ d.missing|default('z') }} {{ n|string }} {{ undefined_var|string }}|{{ undefined_var|trim }}|",
    "{{ undefined_var == undefined_var }} {{ d.nope == none }} {{ 'x' in undefined_var }}",
]

ERRORS = [
    "{{ raise_exception('custom failure message') }}",
    "{% if %}",
    "{% for x in l %}",
    "{{ x + }}",
    "{% endif %}",
    "{% do l.append(1) %}",
    "{{ l.append(4) }}",
    "{{ d.update({'a': 2}) }}",
    "{{ ''.__class__.__mro__ }}",
    "{% set ns = namespace() %}{% set ns._private = 1 %}",
    "{% set x = 1 %}{% set x.attr = 2 %}",
    "{{ undefined_var.attr }}",
    "{{ undefined_var + 1 }}",
    "{{ undefined_var() }}",
    "{{ 'a' + 1 }}",
    "{{ 1 / 0 }}",
    "{{ l < 'a' }}",
    "{{ n|length }}",
    "{{ 5|items|list }}",
    "{{ undefined_var|tojson }}",
    "{{ range(200000)|length }}",
    "{{ x|no_such_filter }}",
    "{{ x is no_such_test }}",
    "{% macro m(a) %}{% endmacro %}{{ m(1, 2) }}",
    "{% for a, b in [1] %}{% endfor %}",
    "{{ 'abc'.no_method() }}",
    "{% break %}",
    "{{ {'a': 1}['b'].c }}",
    "{% set x = [1, 2 %}",
    "{{ 'unterminated }}",
    "{% raw %}never closed",
    "{# never closed",
]


def jinja_render(source, **ctx):
    tmpl = ctu._compile_jinja_template(source)
    tmpl.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime(2026, 1, 15, 9, 30, 5).strftime(fmt)
    return tmpl.render(**ctx)


NOW = 1768469405  # 2026-01-15 09:30:05 UTC


@pytest.mark.parametrize("source", SNIPPETS, ids=range(len(SNIPPETS)))
def test_snippet_matches_jinja2(source):
    ctx = dict(CTX, CTX_D={"k": [1, {"z": None}], "é": "ü"})
    expected = jinja_render(source, **ctx)
    assert ChatTemplate(source).render(now=NOW, **ctx) == expected


@pytest.mark.parametrize("source", ERRORS, ids=range(len(ERRORS)))
def test_error_matches_jinja2(source):
    with pytest.raises(Exception) as py_info:
        jinja_render(source, **CTX)
    with pytest.raises(TemplateError) as info:
        ChatTemplate(source).render(**CTX)
    py_exc = py_info.value
    err = info.value
    if isinstance(py_exc, jinja2.TemplateSyntaxError):
        assert err.kind == type(py_exc).__name__  # TemplateSyntaxError or its TemplateAssertionError
        assert err.line == py_exc.lineno
    elif isinstance(py_exc, SyntaxError):  # jinja2's generated Python code was rejected
        assert err.kind == "SyntaxError"
    else:  # same exception class and message
        assert (err.kind, err.message) == (type(py_exc).__name__, str(py_exc))
    assert err.line >= 1 and err.column >= 1


def test_error_position_is_line_and_column():
    with pytest.raises(TemplateError) as info:
        ChatTemplate("line one\n{% for m in messages %}\n  {{ m.content + 1 }}\n{% endfor %}").render(
            messages=[{"content": "x"}])
    assert (info.value.kind, info.value.line, info.value.column) == ("TypeError", 3, 16)


@pytest.mark.parametrize("value", [
    {"a": [1, 2.5, None, True, False, "é\n\"\\", {"b": {}}, []], "z": 1e-7, "big": 1e300, "neg": -0.0},
    [1234567890123456789, 1.0, 0.1, 100.0, 1e16, 1.7976931348623157e308, 5e-324, "\u2028\x7f\x1f"],
    "🚀 plain",
])
@pytest.mark.parametrize("opts", [{}, {"indent": 2}, {"sort_keys": True}, {"ensure_ascii": True, "indent": 0}])
def test_json_dumps_matches_python(value, opts):
    import json

    assert json_dumps(value, **opts) == json.dumps(value, **{"ensure_ascii": False, **opts})


# ------------------------------------------------- apply_batch's JSON input
BATCH_SOURCE = "{% for m in messages %}{{ m['content'] }}|{{ m['content'] | tojson }}|{{ m.get('extra') }}\n{% endfor %}"
PIECES = ["a", "wörld", "日本語", "🚀", "\n", '"', "\\", "\u2028", "\x00", "role", "content"]


def random_value(rng, depth=0):
    r = rng.random()
    if depth > 3 or r < 0.4:
        return rng.choice([
            "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 300 if rng.random() < 0.1 else 6))),
            rng.randint(-2**31, 2**31 - 1), rng.randint(-2**63, 2**63 - 1), rng.choice([2**63 - 1, -2**63]),
            rng.uniform(-1e6, 1e6), 1e300, -0.0, True, False, None])
    if r < 0.7:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(PIECES) + str(i): random_value(rng, depth + 1) for i in range(rng.randint(0, 4))}


@pytest.mark.parametrize("seed", range(6))
def test_batch_of_random_values_equals_jinja2(seed):
    """apply_batch hands the conversations over as one JSON list: nested values
    reach the template as jinja2 sees the Python objects (str() and tojson)."""
    rng = random.Random(seed)
    convs = []
    for _ in range(20):
        msgs = []
        for _ in range(rng.randint(1, 4)):
            m = {"role": "user", "content": random_value(rng)}
            if rng.random() < 0.5:
                m["extra"] = random_value(rng)
            msgs.append(m)
        convs.append(msgs)
    expected = [ctu._compile_jinja_template(BATCH_SOURCE).render(messages=m) for m in convs]
    for threads in (1, 3):
        assert ChatTemplate(BATCH_SOURCE).apply_batch(convs, threads=threads) == expected


def test_batch_takes_any_sequence_and_dict_subclasses():
    convs = ((OrderedDict(role="user", content="hi"),), [{"role": "user", "content": "yo"}])
    assert ChatTemplate("{{ messages[0].content }}").apply_batch(convs) == ["hi", "yo"]
    # sequences JSON has no list for are read into lists first, outside and in
    convs = UserList([convs[1], UserList([{"role": "user", "content": "ok"}])])
    assert ChatTemplate("{{ messages[0].content }}").apply_batch(convs) == ["yo", "ok"]


def test_batch_refuses_values_json_cannot_carry():
    with pytest.raises(TypeError, match="bytes is not JSON serializable"):
        ChatTemplate("{{ messages }}").apply_batch([[{"role": "user", "content": b"bytes"}]])


def test_a_circular_value_is_named_and_a_too_deep_one_refused():
    # values are encoded without json's circular check; a cycle must still be its ValueError
    msg = {"role": "user", "content": []}
    msg["content"].append(msg)
    with pytest.raises(ValueError, match="Circular reference detected"):
        ChatTemplate("{{ messages }}").apply_batch([[msg]])
    with pytest.raises(ValueError, match="Circular reference detected"):
        ChatTemplate("{{ messages }}").apply([msg])
    deep = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(RecursionError):
        ChatTemplate("{{ messages }}").apply_batch([[{"role": "user", "content": deep}]])


def test_a_circular_value_is_named_under_a_raised_recursion_limit():
    # before Python 3.12 the encoder would follow the cycle that deep on the native stack, and crash
    code = textwrap.dedent("""
        import sys
        sys.setrecursionlimit(1_000_000)
        from qforge.chat import ChatTemplate
        msg = {"role": "user", "content": []}
        msg["content"].append(msg)
        try:
            ChatTemplate("{{ messages }}").apply_batch([[msg]])
        except ValueError as e:
            print(e)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout.strip()) == (0, "Circular reference detected"), proc.stderr[-2000:]
