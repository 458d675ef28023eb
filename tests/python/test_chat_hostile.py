"""Hostile inputs for the chat engine: long chains and deep nesting, huge
counts and widths, self-referencing values, invalid Unicode. Each case runs in
a child process under an address-space limit (RLIMIT_AS: what the interpreter
and the library already map plus 2 GiB) and a timeout, and must end in a clean
TemplateError naming the limit, or in jinja2's result (jinja2 configured as
transformers configures it), within the documented bounds (docs/chat.md,
"Limits")."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import child_env

jinja2 = pytest.importorskip("jinja2")
ctu = pytest.importorskip("transformers.utils.chat_template_utils")

BUDGET = 2 << 30  # address space a case may add
TIMEOUT = 120  # seconds a case may take (every case here needs far less)

_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    from qforge.chat import ChatTemplate, TemplateError

    case = json.loads(sys.stdin.read())
    variables = eval(case["vars"]) if case["vars"] else {}
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + case["budget"], vm + case["budget"]))
    start = time.monotonic()
    results = []
    for _ in range(case["repeat"]):
        try:
            out = ChatTemplate(case["source"], **case["limits"]).render(**variables)
            results.append({"text": out if len(out) < 4096 else out[:4096], "len": len(out)})
        except TemplateError as e:
            results.append({"kind": e.kind, "message": e.message})
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * resource.getpagesize()
    print(json.dumps({"results": results, "seconds": time.monotonic() - start, "rss": rss}))
    """
)


def run_isolated(source: str, vars: str = "", limits: dict | None = None, repeat: int = 1) -> dict:
    """Compiles and renders `source` (with the variables the Python expression
    `vars` evaluates to) in a child process under RLIMIT_AS and a timeout."""
    env = child_env()
    case = {"source": source, "vars": vars, "limits": limits or {}, "repeat": repeat, "budget": BUDGET}
    proc = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(case), capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)
    assert proc.returncode == 0, f"child died (rc {proc.returncode}): {proc.stderr[-2000:]}"
    report = json.loads(proc.stdout)
    report.update(report["results"][0])
    return report


def jinja_render(source: str, **ctx):
    """jinja2's result as transformers compiles it: ("text", str) or ("error", exception class name)."""
    try:
        return "text", ctu._compile_jinja_template(source).render(**ctx)
    except Exception as e:  # noqa: BLE001 - the class is what is compared
        return "error", type(e).__name__


NESTING = "template nested deeper than 256 levels"

# ---------------------------------------------------------------- chains
CHAINS = {
    "plus": "{{ " + "+".join(["1"] * 15000) + " }}",  # the 30 KB template
    "elif": "{% if false %}" + "{% elif false %}" * 5000 + "{% endif %}",
    "getattr": "{{ x" + ".a" * 20000 + " }}",
    "getitem": "{{ x" + "[0]" * 20000 + " }}",
    "filter": "{{ x" + "|trim" * 20000 + " }}",
    "parens": "{{ " + "(" * 3000 + "x" + ")" * 3000 + " }}",
    "not": "{{ " + "not " * 20000 + "1 }}",
    "neg": "{{ " + "- " * 20000 + "1 }}",
    "list": "{{ " + "[" * 20000 + "]" * 20000 + " }}",
    "dict": "{{ " + "{'a': " * 5000 + "1" + "}" * 5000 + " }}",
    "and": "{{ " + " and ".join(["x"] * 20000) + " }}",
    "concat": "{{ " + "x ~ (" * 2000 + "1" + ")" * 2000 + " }}",
    "condexpr": "{{ " + "1 if x else " * 5000 + "2 }}",
    "call": "{{ x" + "()" * 20000 + " }}",
    "for": "{% for a in x %}" * 2000 + "{% endfor %}" * 2000,
    "pow": "{{ " + "**".join(["1"] * 20000) + " }}",
}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_long_chains_and_deep_nesting_are_a_syntax_error(name):
    source = CHAINS[name]
    r = run_isolated(source)
    assert r.get("kind") == "TemplateSyntaxError", r
    assert NESTING in r["message"], r
    # jinja2 fails too (RecursionError or a MemoryError of its compiler)
    assert jinja_render(source, x=[])[0] == "error"


def test_cli_reports_a_too_deep_template(tmp_path):
    (tmp_path / "t.jinja").write_text(CHAINS["plus"])
    (tmp_path / "m.json").write_text("[]")
    env = child_env()
    proc = subprocess.run([sys.executable, "-m", "qforge.cli", "chat", "render", "--template", str(tmp_path / "t.jinja"),
                           "--messages", str(tmp_path / "m.json")], capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "TemplateSyntaxError: template nested deeper than 256 levels" in proc.stderr


def test_chains_within_the_nesting_limit_render_as_jinja2():
    for source in ["{{ " + "+".join(["1"] * 200) + " }}", "{{ x" + "|trim" * 150 + " }}",
                   "{{ " + "not " * 100 + "1 }}", "{{ " + "[" * 60 + "]" * 60 + " }}",
                   "{% if false %}" + "{% elif false %}" * 200 + "{% else %}e{% endif %}"]:
        r = run_isolated(source, vars="{'x': ' a '}")
        assert ("text", r.get("text")) == jinja_render(source, x=" a "), (source[:40], r)


def test_deep_recursion_through_macros_stops_at_the_stack_limit():
    # 200 nested calls of a macro whose body is 80 brackets deep: more stack
    # than the 2 MiB max_stack_bytes, less than max_call_depth
    source = ("{% macro m(n) %}{% if n > 0 %}{{ " + "[" * 80 + "m(n - 1)" + "]" * 80 +
              " }}{% endif %}{% endmacro %}{{ m(199)|length }}")
    r = run_isolated(source)
    assert r.get("kind") == "RecursionError" and "max_stack_bytes" in r["message"], r
    r = run_isolated(source, limits={"max_stack_bytes": 64 << 20, "max_call_depth": 150})
    assert r.get("kind") == "RecursionError" and "max_call_depth (150)" in r["message"], r
    shallow = source.replace("m(199)", "m(5)").replace("[" * 80, "[" * 40).replace("]" * 80, "]" * 40)
    assert ("text", run_isolated(shallow).get("text")) == jinja_render(shallow)


# ------------------------------------------------------- integer arguments
# jinja2 returns a result: ours must be the same
SAME_AS_JINJA2 = [
    "{{ 'abc'|truncate(9223372036854775807) }}",
    "{{ 'abcdefghijkl'|truncate(3, leeway=9223372036854775807) }}",
    "{{ 'abcdefghijkl'|truncate(5, True, '..', 0) }}|{{ 'ab cd ef gh'|truncate(8, leeway=0) }}",
    "{{ '' * 9223372036854775807 }}|{{ 9223372036854775807 * '' }}",
    "{{ [] * 9223372036854775807 }}|{{ () * 9223372036854775807 }}",
    "{{ 'ab' * -9223372036854775807 }}|{{ [1] * -5 }}",
    "{{ [1, 2, 3]|batch(9223372036854775807)|list }}",
    "{{ 1.5|round(9223372036854775807) }}|{{ 1.5|round(-9223372036854775807) }}|{{ -1.5|round(-400) }}",
    "{{ 2.675|round(2) }}|{{ 123.456|round(-1) }}|{{ 1.25|round(1, 'floor') }}",
    "{{ [1, 2, 3][-9223372036854775807:9223372036854775807:-1] }}",
    "{{ 'abc'[9223372036854775807:-9223372036854775807:-9223372036854775807] }}",
    "{{ [1, 2, 3][::9223372036854775807] }}|{{ 'abcdef'[-9223372036854775807::2] }}",
    "{{ range(0, 9223372036854775807, 4611686018427387904)|list }}",
    "{{ range(9223372036854775807, -9223372036854775807, -4611686018427387904)|list }}",
    "{{ 'a b'.split(' ', 9223372036854775807) }}|{{ 'aaa'.replace('a', 'b', 9223372036854775807) }}",
    "{{ '%.600f' % 1.0 }}",
    "{{ '%600d|%-600d|%0600d' % (1, -2, 3) }}",
    "{{ '%.700e|%1000.3g|%+.0f' % (1.0, 2.5, 2.5) }}",
    "{{ '%10s|%-10r|%.2s|%5.1s|%-3s|' % ('a', 'b', 'xyz', 'pq', 'éé') }}",
    "{{ '%.3d|%5i|%u' % (7, -3, 4) }}|{{ '%d %d' % (3.99, -3.99) }}|{{ '%d' % True }}",
    "{{ '%x|%#x|%#X|%#o|%#06x|%-8x|%+x|% o|%08X|%.5x|%#10.4o' % (-255, 255, -255, 8, 255, 10, 5, 8, -300, 7, 9) }}",
    "{{ '%x|%o' % (-9223372036854775807 - 1, 9223372036854775807) }}|{{ '%c%c%c|%3c|%-3c|' % (65, 'é', 128512, 'x', 'y') }}",
    "{{ 'x'|center(9) }}|{{ 'ab'|indent(3, true) }}|{{ 'x'.ljust(5) }}|{{ 'x'.zfill(4) }}",
    "{{ '{:>10}|{:10}|{:10}|{:*^9.2f}|{:+d}|{:=+8d}|{:08.3f}'.format(1, 1.5, 'ab', 3.14159, 5, -5, -3.14159) }}",
    "{{ '{:.2}|{:.3}|{:.3}|{:%}|{:e}|{!r:>6}|{:>5}|{:}'.format('abc', 1.23456, 1.0, 0.5, 12345.0, 'a', True, none) }}",
    "{{ '{:é<5}|{:^6}|{: d}|{:-^7.1%}|{:10.3e}|{:G}|{:.0f}|{:g}|{:+}'.format('a', 'bc', 3, 0.25, 1234.5, 1e-10, 2.5, 1e20, -0.0) }}",
    "{{ '{:1000}|{:>1000.3f}'.format('x', 2.0) }}",
    "{{ '{:x}|{:#x}|{:#X}|{:#o}|{:#b}|{:b}|{:#010x}|{:>#8x}|{:+#x}|{:c}|{:5c}|{:n}'.format(255, 255, -255, 8, 5, -5, 255, 255, 5, 233, 65, 1234) }}",
    "{{ '{:,}|{:_}|{:_x}|{:_b}|{:,.2f}|{:,}|{:_.1e}|{:,}|{:#}'.format(1234567, -1234567, 4294967295, 255, 1234567.891, 123, 12345.0, 1e20, 1) }}",
    "{{ 9223372036854775807|abs }}|{{ -9223372036854775807|abs }}|{{ 9.2e18|int }}|{{ -9.2e18|int }}",
    "{{ 'nan'|float|int }}|{{ 'x'|int(3) }}|{{ '12'|int }}|{{ ' -7.9 '|int }}",
]


@pytest.mark.parametrize("source", SAME_AS_JINJA2)
def test_huge_integer_arguments_give_jinja2s_result(source):
    r = run_isolated(source)
    assert r["seconds"] < 10, r
    assert ("text", r.get("text")) == jinja_render(source), r


# jinja2 raises (or would need a big int / unbounded memory): a clean error naming what
ERRORS = [
    ("{{ 'x' * 9223372036854775807 }}", "OutputLimit"),
    ("{{ [1] * 9223372036854775807 }}", "OutputLimit"),
    ("{{ 'ab' * 40000000 }}", "OutputLimit"),  # 80 MB > 64 MiB: refused before allocating
    ("{{ [0] * 5000000 }}", "OutputLimit"),  # 80 MB of values
    ("{{ '%.2147483647f' % 1.0 }}", "OutputLimit"),
    ("{{ '%2147483648d' % 1 }}", "OutputLimit"),
    ("{{ '%99999999999999999999999999s' % 'a' }}", "OutputLimit"),
    ("{{ 'x'|center(9223372036854775807) }}", "OutputLimit"),
    ("{{ 'x'|indent(9223372036854775807) }}", "OutputLimit"),
    ("{{ ('\\n' * 1000000)|indent(100) }}", "OutputLimit"),  # width x lines
    ("{{ 'x'|tojson(indent=9223372036854775807) }}", "OutputLimit"),
    ("{{ [1, 2, 3]|batch(9223372036854775807, 0)|list }}", "OutputLimit"),
    ("{{ 'x'.ljust(9223372036854775807) }}", "OutputLimit"),
    ("{{ 'x'.zfill(9223372036854775807) }}", "OutputLimit"),
    ("{{ '{:>9223372036854775807}'.format(1) }}", "OutputLimit"),
    ("{{ '{:.99999999999999999999f}'.format(1.0) }}", "OutputLimit"),
    ("{{ '{:d}'.format(1.5) }}", "ValueError"),
    ("{{ '%x' % 1.5 }}", "TypeError"),
    ("{{ '%c' % 1114112 }}", "OverflowError"),
    ("{{ '%c' % 'ab' }}", "TypeError"),
    ("{{ '%9999999999999999x' % 1 }}", "OutputLimit"),
    ("{{ '{:5}'.format(none) }}", "TypeError"),
    ("{{ '{:,x}'.format(1) }}", "ValueError"),
    ("{{ '{:c}'.format(-1) }}", "OverflowError"),
    ("{{ '{:#>9223372036854775807x}'.format(1) }}", "OutputLimit"),
    ("{{ 'abc'|truncate(-9223372036854775807) }}", "AssertionError"),
    ("{{ 'abcdefghijkl'|truncate(5, leeway=-9223372036854775807) }}", "AssertionError"),
    ("{{ 1.5|round(9223372036854775807, 'ceil') }}", "OverflowError"),
    ("{{ range(-9223372036854775807, 9223372036854775807)|length }}", "OverflowError"),
    ("{{ 9223372036854775807 + 1 }}", "OverflowError"),
    ("{{ (-9223372036854775807 - 1) // -1 }}", "OverflowError"),
    ("{{ -(-9223372036854775807 - 1) }}", "OverflowError"),
    ("{{ 3 ** 41 }}", "OverflowError"),
]


@pytest.mark.parametrize("source,kind", ERRORS)
def test_huge_counts_and_widths_are_a_clean_error(source, kind):
    r = run_isolated(source)
    assert r.get("kind") == kind, r
    assert r["seconds"] < 10, r
    if kind == "OutputLimit":
        assert "max_output_bytes" in r["message"], r


def test_what_python_makes_a_big_int_is_the_documented_overflow_error():
    # docs/chat.md: integers are 64-bit; where Python would return a big int
    # the engine raises OverflowError instead of wrapping
    for source in ["{{ 1e19|int }}", "{{ (-9223372036854775807 - 1)|abs }}", "{{ '%d' % 1e300 }}",
                   "{{ '99999999999999999999'|int }}", "{{ '1e30'|int }}", "{{ -1e19|int }}"]:
        assert jinja_render(source)[0] == "text"
        r = run_isolated(source)
        assert r.get("kind") == "OverflowError" and "64 bits" in r["message"], (source, r)


def test_percent_format_is_exact_at_any_width_within_the_output_bound():
    for width in (511, 512, 4096, 100000):
        for source in [f"{{{{ '%.{width}f' % 1.0 }}}}", f"{{{{ '%{width}d' % -5 }}}}", f"{{{{ '%-{width}s|' % 'é' }}}}"]:
            r = run_isolated(source)
            _, want = jinja_render(source)
            assert r.get("len") == len(want) and r["text"] == want[:4096], (source, r.get("kind"), r.get("len"))
    source = "{{ '%.1000000f' % 1.0 }}"  # 1 MB: over a 500 KB output limit, under the default
    assert run_isolated(source, limits={"max_output_bytes": 500_000}).get("kind") == "OutputLimit"
    assert run_isolated(source).get("len") == 1_000_002


# ------------------------------------------------------ time and memory
def test_steps_are_bounded_and_configurable():
    nested = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    r = run_isolated(nested)
    assert r.get("kind") == "StepLimit" and "max_steps (10000000" in r["message"], r
    assert r["seconds"] < 30, r
    calls = "{% macro f() %}{% endmacro %}{% for i in range(1000) %}{{ f() }}{{ 'a'|upper }}{% endfor %}"
    assert run_isolated(calls, limits={"max_steps": 3900}).get("kind") == "StepLimit"  # 1000 range items + 3 x 1000
    assert run_isolated(calls, limits={"max_steps": 4100}).get("text") == "A" * 1000
    # a filter walks its items: charged one step each
    r = run_isolated("{{ x|sort|length }}", vars="{'x': list(range(100000))}", limits={"max_steps": 50000})
    assert r.get("kind") == "StepLimit", r
    # '' * huge costs nothing; [1] * n costs n steps
    assert run_isolated("{{ ([1] * 2000)|length }}", limits={"max_steps": 1000}).get("kind") == "StepLimit"


def test_work_on_big_values_is_charged_by_size():
    # a step per 64 bytes a filter/method/`in`/`~`/`+` reads or builds, per 64 keys a lookup scans:
    # work over a big value in a long loop ends at the step limit, in seconds
    scans = [
        "{% set s = 'x' * 1000000 %}{% for i in range(100000) %}{% if 'y' in s %}{% endif %}{% endfor %}",
        "{% set s = 'x' * 1000000 %}{% for i in range(100000) %}{% set t = s|upper %}{% endfor %}",
        "{% set s = 'x' * 1000000 %}{% for i in range(100000) %}{% set t = s.replace('y', 'z') %}{% endfor %}",
        "{% set s = 'x' * 1000000 %}{% for i in range(100000) %}{% set t = s[5] %}{% endfor %}",
        "{% set ns = namespace(s='') %}{% for i in range(100000) %}{% set ns.s = ns.s ~ 'x' * 1000 %}{% endfor %}",
        "{% for i in range(100000) %}{% set v = d['99999'] %}{% endfor %}",
    ]
    for source in scans:
        r = run_isolated(source, vars="{'d': {str(i): i for i in range(100000)}}")
        assert r.get("kind") == "StepLimit", (source, r)
        assert r["seconds"] < 15, (source, r)
    # within the budget: what jinja2 renders
    source = "{{ ('x' * 30000000)|length }}|{{ d['99999'] }}|{{ d|length }}"
    r = run_isolated(source, vars="{'d': {str(i): i for i in range(100000)}}")
    assert r.get("text") == "30000000|99999|100000" and r["seconds"] < 10, r


def test_output_limit_is_configurable():
    source = "{% for i in range(1000) %}xxxxxxxxxx{% endfor %}"
    assert run_isolated(source, limits={"max_output_bytes": 1000}).get("kind") == "OutputLimit"
    assert run_isolated(source, limits={"max_output_bytes": 10000}).get("len") == 10000


def test_bad_limits_are_a_clear_error():
    from qforge.chat import ChatTemplate

    for bad in ({"max_steps": 0}, {"max_output_bytes": -1}, {"max_call_depth": 1 << 31}, {"max_stack_bytes": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ChatTemplate("x", **bad)


def test_unique_is_not_quadratic():
    # 4M items: jinja2 takes about 3 s, the quadratic version over 60 s
    r = run_isolated("{{ x|unique|list|length }}", vars="{'x': [i % 1000003 for i in range(4000000)]}")
    assert r.get("text") == "1000003", r
    assert r["seconds"] < 20, r
    source = "{{ [1, 1.0, True, 2, 2.0, 'a', 'A', (1, 2), (1.0, 2), none, none, -0.0, 0]|unique|list }}"
    assert ("text", run_isolated(source).get("text")) == jinja_render(source)
    source = "{{ ['a', 'A', 'b']|unique(case_sensitive=true)|list }}{{ x|unique(attribute='k')|list }}"
    x = "[{'k': 1}, {'k': 1.0}, {'k': 2}]"
    assert ("text", run_isolated(source, vars=f"{{'x': {x}}}").get("text")) == jinja_render(source, x=eval(x))


def test_self_referencing_namespace_is_freed_after_each_render():
    # a namespace holding itself (and 10 MB) must not leak 10 MB a render
    source = ("{% set ns = namespace(big=x) %}{% set ns.me = ns %}{% set ns.l = [ns, [ns]] %}"
              "{% for i in [ns] %}{% set ns.loop = loop %}{{ loop.changed(loop) }}{% endfor %}{{ ns.me.me.big|length }}")
    once = run_isolated(source, vars="{'x': 'y' * 10_000_000}", repeat=1)
    many = run_isolated(source, vars="{'x': 'y' * 10_000_000}", repeat=40)
    assert once.get("text") == "True10000000", once
    assert all(r == once["results"][0] for r in many["results"])
    assert many["rss"] - once["rss"] < 60_000_000, (once["rss"], many["rss"])  # 40 leaks would be 400 MB


def test_lone_surrogates_render_as_jinja2():
    # a lone surrogate travels as its 3-byte form and comes back as the same str
    for source in ["{{ x }}|{{ x|length }}|{{ x[1] }}|{{ x|upper }}|{{ x|reverse|join }}", "{{ x|tojson }}",
                   "{{ '\\ud800' ~ x }}", "{{ x.split('\\udfff') }}"]:
        r = run_isolated(source, vars="{'x': 'a\\ud800b\\udfff'}")
        assert ("text", r.get("text")) == jinja_render(source, x="a\ud800b\udfff"), (source, r)
