"""Extract the Jinja template cases (template source + context) from other
projects' engine tests, to render them with qforge's engine and with jinja2
(tests/python/test_chat_peer_suites.py). Only the cases are taken: their
expected outputs are ignored (jinja2 in transformers' configuration is the
oracle) and none of their code is used.

    python3 tests/chat/peer_suites/extract.py --sources DIR --out DIR

DIR/<owner>+<name>/<path> holds each source file at the commit SOURCES pins
(a `fetch` of the repository, `git show COMMIT:PATH`). Each source file gives
OUT/<owner>+<name>+<path with / as _>.json:
    {"source": {repo, path, commit, license, sha256}, "cases": [{"id", "template", "context"}], "skipped": N}
A case whose template or context is not a literal the extractor understands
(a C++ variable it cannot resolve, a Python object) is counted in "skipped".
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import sys
from pathlib import Path

SOURCES = [
    # repo, path, commit, license, how its cases are written
    ("google/minja", "tests/test-syntax.cpp", "021c2293c187789ef13d56c6cfd89c9b134fd80f", "MIT", "cpp:render"),
    # llama.cpp's snapshot is too large to fetch whole: the file's first 45,946 characters (every
    # test_template case; the rest is its hasher, stats and fuzz tests) are read from the search
    # index's copy at this commit
    ("ggml-org/llama.cpp", "tests/test-jinja.cpp", "01eac57fe149a36e9560978a783dba7ad76a0861", "MIT", "cpp:test_template"),
    ("pallets/jinja", "tests/test_filters.py", "5ef70112a1ff19c05324ff889dd30405b1002044", "BSD-3-Clause", "py"),
    ("pallets/jinja", "tests/test_tests.py", "5ef70112a1ff19c05324ff889dd30405b1002044", "BSD-3-Clause", "py"),
    ("pallets/jinja", "tests/test_core_tags.py", "5ef70112a1ff19c05324ff889dd30405b1002044", "BSD-3-Clause", "py"),
    ("pallets/jinja", "tests/test_lexnparse.py", "5ef70112a1ff19c05324ff889dd30405b1002044", "BSD-3-Clause", "py"),
    ("pallets/jinja", "tests/test_regression.py", "5ef70112a1ff19c05324ff889dd30405b1002044", "BSD-3-Clause", "py"),
]


class Unsupported(Exception):
    """A template or context written as something other than a literal."""


# ------------------------------------------------------------------ C++ side
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"', "'": "'", "a": "\a", "b": "\b",
            "f": "\f", "v": "\v", "?": "?"}


def _cpp_string(src: str, i: int) -> tuple[str, int]:
    """The C++ string literal at src[i] (plain or raw); returns (text, end)."""
    if src.startswith('R"', i):
        d_end = src.index("(", i + 2)
        delim = src[i + 2:d_end]
        close = src.index(")" + delim + '"', d_end)
        return src[d_end + 1:close], close + len(delim) + 2
    assert src[i] == '"'
    out, i = [], i + 1
    while src[i] != '"':
        c = src[i]
        if c == "\\":
            e = src[i + 1]
            if e == "\n":  # a line continuation (translation phase 2)
                i += 2
                continue
            if e == "x":
                m = re.match(r"[0-9a-fA-F]+", src[i + 2:])
                out.append(chr(int(m.group(0), 16)))
                i += 2 + len(m.group(0))
                continue
            if e == "u":
                out.append(chr(int(src[i + 2:i + 6], 16)))
                i += 6
                continue
            out.append(_ESCAPES[e])
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out), i + 1


def _skip_literal(src: str, i: int) -> int:
    if src.startswith('R"', i) or src[i] == '"':
        return _cpp_string(src, i)[1]
    if src[i] == "'":
        j = i + 1
        while src[j] != "'":
            j += 2 if src[j] == "\\" else 1
        return j + 1
    return i + 1


def _split_args(src: str, i: int) -> tuple[list[str], int]:
    """Top-level comma-separated arguments of the call whose '(' is at src[i - 1]."""
    args, depth, start = [], 0, i
    while True:
        c = src[i]
        if c in "\"'" or src.startswith('R"', i):
            i = _skip_literal(src, i)
            continue
        if src.startswith("//", i):
            i = src.index("\n", i)
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            if depth == 0:
                args.append(src[start:i].strip())
                return args, i + 1
            depth -= 1
        elif c == "," and depth == 0:
            args.append(src[start:i].strip())
            start = i + 1
        i += 1


def _cpp_value(expr: str, variables: dict):
    """A C++ expression built of string literals and nlohmann::json
    initialisers, as the JSON value it makes."""
    expr = expr.strip()
    if not expr:
        raise Unsupported("empty")
    if expr[0] == '"' or expr.startswith('R"'):  # adjacent literals concatenate
        parts, i = [], 0
        while i < len(expr):
            if expr[i].isspace():
                i += 1
                continue
            if expr.startswith("//", i):
                i = expr.index("\n", i) if "\n" in expr[i:] else len(expr)
                continue
            if not (expr[i] == '"' or expr.startswith('R"', i)):
                raise Unsupported(expr)
            s, i = _cpp_string(expr, i)
            parts.append(s)
        return "".join(parts)
    if expr.startswith("json(") and expr.endswith(")"):  # json({...}): the initialiser's value
        return _cpp_value(expr[len("json("):-1], variables)
    for prefix, kind in (("json::array(", list), ("json::object(", dict), ("json::parse(", "parse")):
        if expr.startswith(prefix) and expr.endswith(")"):
            inner = expr[len(prefix):-1].strip()
            if kind == "parse":
                return json.loads(_cpp_value(inner, variables))
            if not inner:
                return kind()
            v = _cpp_value(inner, variables)
            if kind is dict and isinstance(v, list):
                v = dict(v)
            if kind is list and isinstance(v, dict):  # json::array({{"a", 1}}): the pairs stay lists
                v = [list(kv) for kv in v.items()]
            return v
    if expr.startswith("{") and expr.endswith("}"):
        inner, end = _split_args(expr, 1)
        if end != len(expr):
            raise Unsupported(expr)
        items = [_cpp_value(a, variables) for a in inner if a]
        if not items:
            return {}
        # nlohmann: a list of [string, value] pairs is an object
        if all(isinstance(x, list) and len(x) == 2 and isinstance(x[0], str) for x in items):
            return {x[0]: x[1] for x in items}
        return items
    if expr in ("true", "false"):
        return expr == "true"
    if expr in ("nullptr", "json()", "json(nullptr)"):
        return None
    if re.fullmatch(r"-?\d+", expr):
        return int(expr)
    if re.fullmatch(r"-?(\d+\.\d*|\.\d+)([eE][-+]?\d+)?f?", expr):
        return float(expr.rstrip("f"))
    if re.fullmatch(r"[A-Za-z_]\w*", expr) and expr in variables:
        return variables[expr]
    raise Unsupported(expr)


def _cpp_variables(src: str) -> dict:
    """`std::string NAME = "literal" ...;` definitions, for cases that pass a name."""
    out = {}
    for m in re.finditer(r"(?:std::string|auto|const char\s*\*)\s+(\w+)\s*=\s*", src):
        end = src.find(";", m.end())
        try:
            out[m.group(1)] = _cpp_value(src[m.end():end], {})
        except (Unsupported, ValueError, IndexError, KeyError):
            pass
    return out


def cpp_cases(src: str, function: str) -> tuple[list[dict], int]:
    """Every call `function(...)`; render(TEMPLATE, CONTEXT, OPTIONS) or
    test_template(t, NAME, TEMPLATE, CONTEXT, EXPECTED)."""
    variables = _cpp_variables(src)
    cases, skipped = [], 0
    for m in re.finditer(r"\b" + function + r"\(", src):
        before = src[max(0, m.start() - 40):m.start()]
        if re.search(r"(static|void|std::string)\s+$", before):
            continue  # the definition
        if "//" in src[src.rfind("\n", 0, m.start()) + 1:m.start()]:
            continue  # commented out
        try:
            args, _ = _split_args(src, m.end())
        except (ValueError, IndexError):
            skipped += 1
            continue
        if function == "render":
            if len(args) != 3:
                continue  # root->render(context)
            tmpl_arg, ctx_arg, name = args[0], args[1], None
        else:
            if len(args) != 5:
                skipped += 1
                continue
            tmpl_arg, ctx_arg = args[2], args[3]
            try:
                name = _cpp_value(args[1], variables)
            except Unsupported:
                name = None
        try:
            template = _cpp_value(tmpl_arg, variables)
            context = _cpp_value(ctx_arg, variables) if ctx_arg not in ("{}", "json::object()") else {}
        except (Unsupported, ValueError, IndexError, KeyError):
            skipped += 1
            continue
        if not isinstance(template, str) or not isinstance(context, dict):
            skipped += 1
            continue
        line = src.count("\n", 0, m.start()) + 1
        cases.append({"id": f"L{line}" + (f" {name}" if name else ""), "template": template, "context": context})
    return cases, skipped


# --------------------------------------------------------------- Python side
def _py_value(node: ast.AST, params: dict):
    """A literal, a parametrize argument, or list(range(...)) / range(...) /
    dict(...) of those."""
    if isinstance(node, ast.Name) and node.id in params:
        return params[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not any(
            isinstance(a, ast.Starred) for a in node.args):
        args = [_py_value(a, params) for a in node.args]
        kwargs = {k.arg: _py_value(k.value, params) for k in node.keywords if k.arg}
        if len(kwargs) != len(node.keywords):
            raise Unsupported("**kwargs")
        if node.func.id == "range" and not kwargs:
            return list(range(*args))
        if node.func.id == "list" and len(args) == 1 and not kwargs:
            return list(args[0])
        if node.func.id == "dict":
            return dict(*args, **kwargs)
        raise Unsupported(node.func.id)
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_py_value(e, params) for e in node.elts]
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_py_value(k, params): _py_value(v, params) for k, v in zip(node.keys, node.values)}
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError) as e:
        raise Unsupported(ast.dump(node)[:80]) from e


def _json_safe(v) -> bool:
    try:
        return json.loads(json.dumps(v)) == v
    except (TypeError, ValueError):
        return False


def _template_text(node: ast.AST, params: dict):
    """A str literal, or an f-string over parametrize arguments; else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if not isinstance(node, ast.JoinedStr):
        return None
    out = []
    for part in node.values:
        if isinstance(part, ast.Constant):
            out.append(part.value)
        elif isinstance(part, ast.FormattedValue) and isinstance(part.value, ast.Name) and part.value.id in params \
                and part.format_spec is None:
            v = params[part.value.id]
            out.append(repr(v) if part.conversion == ord("r") else str(v))
        else:
            return None
    return "".join(out)


def _from_string(node: ast.AST, params: dict):
    """The literal template of `x.from_string(LITERAL)`, else None."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_string" and node.args:
        return _template_text(node.args[0], params)
    return None


def _render_context(call: ast.Call, params: dict) -> dict:
    ctx = {}
    for a in call.args:
        v = _py_value(a, params)
        if not isinstance(v, dict):
            raise Unsupported("positional")
        ctx.update(v)
    for k in call.keywords:
        v = _py_value(k.value, params)
        if k.arg is None:
            ctx.update(v)
        else:
            ctx[k.arg] = v
    if not _json_safe(ctx):
        raise Unsupported("not JSON")  # tuples, sets, ...: the engine takes JSON
    return ctx


def _parametrizations(fn: ast.FunctionDef) -> list[dict]:
    """The argument sets of the function's literal @pytest.mark.parametrize decorators."""
    combos = [{}]
    for d in fn.decorator_list:
        if not (isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "parametrize"):
            continue
        try:
            names = ast.literal_eval(d.args[0])
            values = ast.literal_eval(d.args[1])
        except (ValueError, SyntaxError, TypeError, IndexError):
            return []
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        rows = [dict(zip(names, v if len(names) > 1 else (v,))) for v in values]
        combos = [dict(c, **r) for c in combos for r in rows]
    return combos


def _function_cases(fn: ast.FunctionDef, params: dict, tag: str) -> tuple[list[dict], int]:
    templates: dict[str, str] = {}  # variable -> template
    found: list[tuple[str, int, dict]] = []  # template, line, context
    skipped = 0
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            t = _from_string(node.value, params)
            if t is not None:
                templates[node.targets[0].id] = t
    for node in ast.walk(fn):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "render"):
            continue
        owner = node.func.value
        t = _from_string(owner, params)
        if t is None and isinstance(owner, ast.Name) and owner.id in templates:
            t = templates[owner.id]
        if t is None:
            continue
        try:
            found.append((t, node.lineno, _render_context(node, params)))
        except Unsupported:
            skipped += 1
    for node in ast.walk(fn):  # templates only compiled (syntax error cases) or rendered with objects
        t = _from_string(node, params) if isinstance(node, ast.Call) else None
        if t is not None and not any(f[0] == t for f in found):
            found.append((t, node.lineno, {}))
    cases, seen = [], set()
    for t, line, ctx in sorted(found, key=lambda f: f[1]):
        key = (t, json.dumps(ctx, sort_keys=True))
        if key not in seen:
            seen.add(key)
            cases.append({"id": f"{fn.name}{tag} L{line}", "template": t, "context": ctx})
    return cases, skipped


def py_cases(src: str) -> tuple[list[dict], int]:
    cases, skipped = [], 0
    for fn in ast.walk(ast.parse(src)):
        if not isinstance(fn, ast.FunctionDef):
            continue
        combos = _parametrizations(fn)
        for i, params in enumerate(combos):
            c, s = _function_cases(fn, params, f"[{i}]" if len(combos) > 1 else "")
            cases += c
            skipped += s
    return cases, skipped


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    for repo, path, commit, license_, style in SOURCES:
        f = a.sources / repo.replace("/", "+") / path
        if not f.exists():
            print(f"missing {f}: not extracted", file=sys.stderr)
            continue
        raw = f.read_bytes()
        src = raw.decode()
        cases, skipped = cpp_cases(src, style.split(":")[1]) if style.startswith("cpp") else py_cases(src)
        doc = {"source": {"repo": repo, "path": path, "commit": commit, "license": license_,
                          "sha256": hashlib.sha256(raw).hexdigest()},
               "cases": cases, "skipped": skipped}
        name = repo.replace("/", "+") + "+" + path.replace("/", "_") + ".json"
        (a.out / name).write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        print(f"{name}: {len(cases)} cases, {skipped} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
