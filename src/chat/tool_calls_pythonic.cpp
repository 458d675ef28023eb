// Tool-call families whose arguments are not JSON: LFM2's Python calls
// ([name(key='value', ...)]) and Gemma 4's call:NAME{key:<|"|>value<|"|>,...}.
// Values nest at most kMaxToolCallDepth levels (bounded recursion).
#include <cctype>

#include "tool_calls_internal.hpp"

namespace qforge::chat::tool_calls_detail {

namespace {

constexpr size_t kMaxIdentifierBytes = 256;

size_t identifier_end(std::string_view s, size_t p) {
  size_t start = p;
  while (p < s.size() && p - start < kMaxIdentifierBytes &&
         (std::isalnum(static_cast<unsigned char>(s[p])) || s[p] == '_' || s[p] == '.' || s[p] == '-'))
    ++p;
  return p;
}

// LFM2 prints top-level string arguments as '...' without escaping quotes
// inside them: such a string ends at the quote followed by `)` or by
// `, key=`. Escapes read as in Python.
bool lfm2_string(std::string_view s, size_t& p, Value& out) {
  char q = s[p];
  std::string v;
  for (size_t i = p + 1; i < s.size(); ++i) {
    char c = s[i];
    if (c == '\\' && i + 1 < s.size()) {
      size_t at = 0;
      Value one;
      std::string escaped(1, q), why;  // the escape alone, read as a Python string
      escaped.append(s.substr(i, 2)).push_back(q);
      if (python_literal(escaped, at, one, why)) v += one.str();
      ++i;
      continue;
    }
    if (c == q) {
      size_t k = skip_ws(s, i + 1);
      bool ends = k < s.size() && s[k] == ')';
      if (!ends && k < s.size() && s[k] == ',') {
        size_t id = skip_ws(s, k + 1);
        size_t e = identifier_end(s, id);
        ends = e > id && skip_ws(s, e) < s.size() && s[skip_ws(s, e)] == '=';
      }
      if (ends) {
        p = i + 1;
        out = Value(std::move(v));
        return true;
      }
    }
    v += c;
  }
  return false;
}

// name(key=value, ...) at s[p]; advances p.
bool python_call(std::string_view s, size_t& p, Value& out, std::string& error) {
  p = skip_ws(s, p);
  size_t e = identifier_end(s, p);
  if (e == p || e >= s.size() || s[e] != '(') {
    error = "expected name(...) at offset " + std::to_string(p);
    return false;
  }
  std::string name(s.substr(p, e - p));
  Value args = Value::dict();
  p = e + 1;
  while (true) {
    p = skip_ws(s, p);
    if (p < s.size() && s[p] == ')') break;
    size_t k = identifier_end(s, p);
    size_t eq = skip_ws(s, k);
    if (k == p || eq >= s.size() || s[eq] != '=') {
      error = "expected key=value in the call of '" + name + "'";
      return false;
    }
    std::string key(s.substr(p, k - p));
    p = skip_ws(s, eq + 1);
    Value v;
    bool ok = p < s.size() && (s[p] == '\'' || s[p] == '"') ? lfm2_string(s, p, v) : python_literal(s, p, v, error);
    if (!ok) {
      error = "malformed value of '" + key + "' in the call of '" + name + "'" + (error.empty() ? "" : ": " + error);
      return false;
    }
    args.set(Value(key), std::move(v));
    p = skip_ws(s, p);
    if (p < s.size() && s[p] == ',') ++p;
    else if (p >= s.size() || s[p] != ')') {
      error = "expected ',' or ')' in the call of '" + name + "'";
      return false;
    }
  }
  ++p;
  out = make_call(Value(name), std::move(args));
  return true;
}

const std::string_view kGemmaQuote = "<|\"|>";

bool gemma_value(std::string_view s, size_t& p, Value& out, std::string& error, int depth) {
  p = skip_ws(s, p);
  if (starts_with(s.substr(p), kGemmaQuote)) {
    size_t e = s.find(kGemmaQuote, p + kGemmaQuote.size());
    if (e == std::string_view::npos) {
      error = "unterminated <|\"|> string";
      return false;
    }
    out = Value(s.substr(p + kGemmaQuote.size(), e - p - kGemmaQuote.size()));
    p = e + kGemmaQuote.size();
    return true;
  }
  if (p < s.size() && (s[p] == '{' || s[p] == '[')) {
    if (depth >= kMaxToolCallDepth) {
      error = "tool call arguments nest deeper than " + std::to_string(kMaxToolCallDepth) + " levels";
      return false;
    }
    bool obj = s[p] == '{';
    char close = obj ? '}' : ']';
    Value coll = obj ? Value::dict() : Value(List{});
    ++p;
    while (true) {
      p = skip_ws(s, p);
      if (p < s.size() && s[p] == close) break;
      Value key, item;
      if (obj) {
        if (starts_with(s.substr(p), kGemmaQuote)) {
          if (!gemma_value(s, p, key, error, depth + 1)) return false;
        } else {
          size_t e = s.find(':', p);
          if (e == std::string_view::npos) {
            error = "expected key: in a Gemma call";
            return false;
          }
          key = Value(trim(s.substr(p, e - p)));
          p = e;
        }
        p = skip_ws(s, p);
        if (p >= s.size() || s[p] != ':') {
          error = "expected ':' after a key in a Gemma call";
          return false;
        }
        ++p;
      }
      if (!gemma_value(s, p, item, error, depth + 1)) return false;
      if (obj) coll.set(std::move(key), std::move(item));
      else coll.push_back(std::move(item));
      p = skip_ws(s, p);
      if (p < s.size() && s[p] == ',') ++p;
      else if (p >= s.size() || s[p] != close) {
        error = std::string("expected ',' or '") + close + "' in a Gemma call";
        return false;
      }
    }
    ++p;
    out = std::move(coll);
    return true;
  }
  size_t start = p;
  while (p < s.size() && s[p] != ',' && s[p] != '}' && s[p] != ']') ++p;
  size_t at = 0;
  std::string_view tok = trim(s.substr(start, p - start));
  if (tok.empty() || !python_literal(tok, at, out, error) || at != tok.size()) {
    error = "not a value at offset " + std::to_string(start) + " of a Gemma call";
    return false;
  }
  return true;
}

}  // namespace

// LFM2: <|tool_call_start|>[name(k=v, ...), ...]<|tool_call_end|>
void parse_lfm2(std::string_view text, ParsedToolCalls& r) {
  parse_marked(text, r, "<|tool_call_start|>", [&](size_t p) {
    p = skip_ws(text, p);
    bool list = p < text.size() && text[p] == '[';
    if (list) ++p;
    std::string error;
    while (true) {
      p = skip_ws(text, p);
      if (list && p < text.size() && text[p] == ']') {
        ++p;
        break;
      }
      Value call;
      if (!python_call(text, p, call, error)) return failed(r, "malformed LFM2 tool call: " + error);
      r.tool_calls.push_back(std::move(call));
      p = skip_ws(text, p);
      if (!list) break;
      if (p < text.size() && text[p] == ',') ++p;
      else if (p >= text.size() || text[p] != ']') return failed(r, "malformed LFM2 tool call list: expected ',' or ']'");
    }
    return past_close(text, p, "<|tool_call_end|>", r, "the calls");
  });
}

// Gemma 4: <|tool_call>call:NAME{key:value,...}<tool_call|>
void parse_gemma4(std::string_view text, ParsedToolCalls& r) {
  const std::string_view open = "<|tool_call>";
  parse_marked(text, r, open, [&](size_t p) {
    p = skip_ws(text, p);
    if (!starts_with(text.substr(p), "call:")) return failed(r, "a <|tool_call> block does not start with call:");
    p += 5;
    size_t brace = text.find('{', p);
    if (brace == std::string_view::npos || brace > text.find(open, p)) return failed(r, "a Gemma tool call has no {arguments}");
    std::string name(trim(text.substr(p, brace - p)));
    Value args;
    std::string error;
    p = brace;
    if (name.empty() || !gemma_value(text, p, args, error, 0))
      return failed(r, "malformed Gemma tool call '" + name + "': " + error);
    r.tool_calls.push_back(make_call(Value(name), std::move(args)));
    return past_close(text, p, "<tool_call|>", r, "the call of '" + name + "'");
  });
}

}  // namespace qforge::chat::tool_calls_detail
