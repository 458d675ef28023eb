"""Jinja features a new user tried with other projects' test cases (issue 13)
that rendered differently from jinja2: each compared with live jinja2 as
transformers configures it (test_chat_engine.jinja_render)."""
from __future__ import annotations

import pytest

from qforge.chat import ChatTemplate, TemplateError
from test_chat_engine import NOW, jinja2, jinja_render

SNIPPETS = [
    # int's base= argument (it was ignored), Python's prefixes and underscores
    "{{ 'ff'|int(base=16) }} {{ '0x1F'|int(base=16) }} {{ '0b101'|int(base=0) }} {{ '0o17'|int(base=0) }} "
    "{{ '1_000'|int }} {{ 'z'|int(base=36) }} {{ '12'|int(base=8) }} {{ '9'|int(base=8) }} {{ ' -7 '|int }} "
    "{{ '0x'|int(base=16, default=5) }} {{ 'ff'|int(base=99) }} {{ '1__0'|int }} {{ '_1'|int }}",
    # min / max by attribute (they compared whole dicts)
    "{{ [{'a': 2, 'b': 1}, {'a': 1, 'b': 5}]|min(attribute='a') }} {{ [{'a': 2}, {'a': 1}]|max(attribute='a') }} "
    "{{ ['B', 'a']|min }} {{ [{'n': 'B'}, {'n': 'a'}]|max(attribute='n') }} "
    "{{ [{'n': 'B'}, {'n': 'a'}]|max(attribute='n', case_sensitive=true) }}",
    # an int attribute indexes (it gave Undefined)
    "{{ [[1,2],[3,4]]|map(attribute=-1)|list }} {{ [[1,2],[3,4]]|join(',', attribute=0) }} "
    "{{ [[1,2],[3,4]]|sum(attribute=1) }} {{ [[1,2],[3,4]]|map(attribute='1')|list }}",
    # Markup is escaped
    "{{ 'foo'|safe is escaped }} {{ 'foo' is escaped }} {{ 'a'|escape is escaped }} {{ 1 is escaped }}",
    # a namespace subscripted by name
    "{% set ns = namespace(a=1) %}{{ ns['a'] }} {{ ns['b'] is defined }} {% set ns.b = 2 %}{{ ns['b'] }}",
    # transformers' strftime_now formats a naive datetime: no zone
    "{{ strftime_now('%Z|%z|%Y-%m-%d') }} {{ strftime_now('%%Z') }}",
    # dict.fromkeys
    "{{ dict.fromkeys(['a', 'b'], 0) }} {{ dict.fromkeys('xy') }} {{ dict.fromkeys([1, 1, 2]) }}",
    # hex, octal and binary literals
    "{{ 0x1F }} {{ 0o17 }} {{ 0b101 }} {{ 0xff_ff }} {{ 0X1f + 1 }} {{ 0B1 }} {{ 0O7 }}",
    # Markup's % and format escape their arguments (they did not)
    "{{ ('<b>%s|%5s|%d</b>'|safe) % ('<i>', '<', 3) }} {{ ('%(a)s'|safe) % {'a': '<'} }} "
    "{{ ('%s'|safe) % ('<x>'|safe) }} {{ ('%s'|safe) % none }} {{ ('%s'|safe) % [1, '<'] }}",
    "{{ ('<b>{}</b>'|safe).format('<i>') }} {{ ('{:>5}|{}'|safe).format('<', '<i>'|safe) }} "
    "{{ ('{}'|safe).format('<') is escaped }} {{ '{}'.format('<') is escaped }}",
    # str.format field access: [key] and .attr (jinja2's sandboxed formatter: getitem / getattr)
    "{{ '{0[k]}'.format({'k': 1}) }} {{ '{0.k}'.format({'k': 1}) }} {{ '{0[1]}'.format([5, 6]) }} "
    "{{ '{a[x][0]}|{a.x[1]:>3}'.format(a={'x': [7, 8]}) }} {{ ('{0[k]}'|safe).format({'k': '<'}) }}",
    # unique is a generator, as jinja2's
    "{{ [1, 2, 2]|unique|list }} {{ [1, 2, 2]|unique|join(',') }} {{ ['a', 'A']|unique|list }}",
    # {% with %}: values see the enclosing scope, names and sets stay inside
    "{% with x = 1 %}{{ x }}{% endwith %}[{{ x }}] {% with %}{% set y = 2 %}{{ y }}{% endwith %}[{{ y }}]",
    "{% set a = 5 %}{% with a = a + 1, b = a %}{{ a }}{{ b }}{% endwith %}{{ a }}",
    "{% for i in [1, 2, 3] %}{% with j = i * 2 %}{% if j > 4 %}{% break %}{% endif %}{{ j }}{% endwith %}{% endfor %}",
    "{% macro m() %}{% with q = 3 %}{{ q }}{% endwith %}{% endmacro %}{{ m() }}",
    # tuple targets holding namespace attributes
    "{% set ns = namespace(a=1, b=2) %}{% set ns.a, ns.b = 3, 4 %}{{ ns.a }}{{ ns.b }}",
    "{% set ns = namespace() %}{% set x, ns.y = 1, 2 %}{{ x }}{{ ns.y }} {% set (p, q) = 'xy' %}{{ q }}",
    # range() is a range: printed, compared, sliced as Python's
    "{{ range(3) }} {{ range(1, 9, 2) }} {{ range(5, 1) }} {{ [range(2)] }} {{ range(3)|string }} {{ range(3)|list }}",
    "{{ range(10)[2:5] }} {{ range(10)[::100] }} {{ range(10)[::-1] }} {{ range(10)[-3:] }} {{ range(0, -10, -3)[1:] }}",
    "{{ range(3) == [0, 1, 2] }} {{ range(3) == range(0, 3, 1) }} {{ range(3)|length }} {{ range(3)[1] }} "
    "{{ range(3)|join(',') }} {{ range(3) is sequence }} {{ range(3)|first }}{{ range(3)|last }} {{ range(3)|sum }}",
    # a macro's caller is its own, never an outer variable (pallets/jinja test_caller_undefined)
    "{% set caller = 42 %}{% macro t() %}{{ caller is not defined }}{% endmacro %}{{ t() }}",
    "{% macro t(caller=none) %}{{ caller is none }}{% endmacro %}{{ t() }}{% call t() %}x{% endcall %}",
    # x.0.1 indexes twice (no float after a dot)
    "{{ [1, 2, 3].0 }}|{{ [[1]].0.0 }}|{{ [[1, [2, 3]]].0.1.1 }}",
    # *args and **kwargs in calls, filters and tests
    "{{ range(*[2, 4])|list }} {% for i in [1, 2, 3] %}{{ loop.cycle(*['a', 'b']) }}{% endfor %} "
    "{{ '%s-%s'|format(*[1, 2]) }} {{ 1 is divisibleby(*[1]) }} {{ 'abc'.replace(*['a', 'x']) }} "
    "{{ namespace(**{'a': 1}).a }} {{ dict(x=1, **{'a': 2}) }} {{ [1, 2]|join(*'-') }} {{ range(3, *u)|list }}",
    "{% macro m(a, b=2) %}{{ a }}-{{ b }}-{{ varargs }}-{{ kwargs }}{% endmacro %}{{ m(*[1, 5, 6], **{'c': 3}) }}"
    "{{ m(1, *(), c=4, **{}) }}{% macro c() %}{{ caller(*[7]) }}{% endmacro %}{% call(x) c() %}{{ x }}{% endcall %}",
    # an unknown filter or test in a conditional expression fails only when reached
    "{{ x|nosuchfilter if x is defined else 'foo' }} {{ x|nosuch if false else 1 }}{{ 'a' if true else 1 is nosuch }}",
]

ERRORS = [
    "{{ dict.fromkeys([[1]]) }}",
    "{{ dict.fromkeys() }}",
    "{{ [1, 2, 2]|unique|length }}",  # a generator has no len()
    "{{ '{0[}'.format([1]) }}",
    "{% with a, b = 1, 2 %}{% endwith %}",
    "{% with x = 1 %}{{ x }}",
    "{% with x %}{% endwith %}",
    "{% set a, = [7] %}",
    "{% set = 1 %}",
    "{% set a, 1 = 2, 3 %}",
    "{% set ns = namespace() %}{% set ns.a, ns._b = 1, 2 %}",
    "{{ range(*5) }}",
    "{{ dict(**[1]) }}",
    "{{ dict(**u) }}",
    "{{ dict(**{1: 2}) }}",
    "{{ f(*a, b) }}",
    "{{ f(**a, *b) }}",
    "{{ f(**a, c=1) }}",
    "{{ f(*a, *b) }}",
    "{{ dict(**{'a': 1}, b=2) }}",
    "{{ range(3)|tojson }}",
    "{{ range(2) + [1] }}",
    "{{ range(2) * 2 }}",
    "{% macro x(caller) %}[{% if caller %}{{ caller() }}{% endif %}]{% endmacro %}",
    "{% macro x(a, caller) %}{% macro y() %}{% endmacro %}{{ caller }}{% endmacro %}",
    "{% macro t(caller) %}{% macro u() %}{{ caller is defined }}{% endmacro %}{{ u() }}{% endmacro %}{{ t() }}",
    "{{ 1|nosuchfilter if true else 'foo' }}",  # reached
    "{{ 1|nosuchfilter }}{% if %}",  # the syntax error comes first, as jinja2 compiles after parsing
    "{{ (1|nosuch if true else 2)|alsonosuch }}",
]


@pytest.mark.parametrize("source", SNIPPETS, ids=range(len(SNIPPETS)))
def test_matches_jinja2(source):
    assert ChatTemplate(source).render(now=NOW) == jinja_render(source)


@pytest.mark.parametrize("source", ERRORS, ids=range(len(ERRORS)))
def test_error_matches_jinja2(source):
    with pytest.raises(Exception) as py_info:
        jinja_render(source)
    with pytest.raises(TemplateError) as info:
        ChatTemplate(source).render(now=NOW)
    assert info.value.kind == type(py_info.value).__name__
    if isinstance(py_info.value, jinja2.TemplateSyntaxError):
        assert info.value.message == py_info.value.message


def test_integer_literals_beyond_64_bits_are_refused_by_name():
    for source in ("{{ 0x8000000000000000 }}", "{{ 0b" + "1" * 64 + " }}"):
        with pytest.raises(TemplateError, match="integer literal too large"):
            ChatTemplate(source)
