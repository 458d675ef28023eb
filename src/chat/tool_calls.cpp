// Tool-call parsers for generated text (Llama 3.x JSON / <|python_tag|>
// builtin calls, Hermes / Qwen <tool_call> blocks). Malformed output never
// throws: the raw text is returned as content with `error` set.
#include "qforge/chat/tool_calls.hpp"

#include <cctype>

#include "qforge/error.hpp"

namespace qforge::chat {

namespace {

const std::string_view kPythonTag = "<|python_tag|>";
const std::string_view kEom = "<|eom_id|>";
const std::string_view kEot = "<|eot_id|>";

bool is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

std::string_view trim(std::string_view s) {
  while (!s.empty() && is_ws(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_ws(s.back())) s.remove_suffix(1);
  return s;
}

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// {"type": "function", "function": {"name": name, "arguments": args}}
Value make_call(const Value& name, Value args) {
  Value fn = Value::dict();
  fn.set("name", name);
  fn.set("arguments", std::move(args));
  Value call = Value::dict();
  call.set("type", Value("function"));
  call.set("function", std::move(fn));
  return call;
}

// A JSON object shaped like a call: {"name": str, "parameters"|"arguments": dict|json-string}
bool call_from_json(const Value& obj, Value& out, std::string& error) {
  if (!obj.is_dict()) return false;
  const Value* name = obj.get("name");
  const Value* args = obj.get("parameters");
  if (!args) args = obj.get("arguments");
  if (!name || !name->is_string()) return false;
  Value a = args ? *args : Value::dict();
  if (a.is_string()) {
    try {
      a = json_loads(a.str());
    } catch (const InvalidArgument& e) {
      error = std::string("tool call arguments are not valid JSON: ") + e.what();
      return false;
    }
  }
  if (!a.is_dict()) {
    error = "tool call arguments must be a JSON object";
    return false;
  }
  out = make_call(*name, std::move(a));
  return true;
}

// Python literal in a builtin call's keyword arguments: "str", 'str', numbers, True/False/None
bool python_literal(std::string_view s, size_t& p, Value& out) {
  if (p >= s.size()) return false;
  char q = s[p];
  if (q == '"' || q == '\'') {
    std::string v;
    ++p;
    while (p < s.size() && s[p] != q) {
      if (s[p] == '\\' && p + 1 < s.size()) {
        char e = s[p + 1];
        v += e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
        p += 2;
      } else {
        v += s[p++];
      }
    }
    if (p >= s.size()) return false;
    ++p;
    out = Value(std::move(v));
    return true;
  }
  size_t start = p;
  while (p < s.size() && s[p] != ',' && s[p] != ')' && !is_ws(s[p])) ++p;
  std::string_view tok = s.substr(start, p - start);
  if (tok == "True") out = Value(true);
  else if (tok == "False") out = Value(false);
  else if (tok == "None") out = Value();
  else {
    try {
      out = json_loads(tok);
    } catch (const InvalidArgument&) {
      return false;
    }
    if (!out.is_number()) return false;
  }
  return true;
}

// name.call(k="v", ...) -> call; false when `s` is not of that shape
bool builtin_call(std::string_view s, Value& out) {
  s = trim(s);
  size_t dot = s.find(".call(");
  if (dot == std::string_view::npos || dot == 0 || s.back() != ')') return false;
  for (size_t i = 0; i < dot; ++i)
    if (!(std::isalnum(static_cast<unsigned char>(s[i])) || s[i] == '_')) return false;
  Value args = Value::dict();
  size_t p = dot + 6;
  while (true) {
    while (p < s.size() && is_ws(s[p])) ++p;
    if (p < s.size() && s[p] == ')') break;
    size_t k = p;
    while (p < s.size() && (std::isalnum(static_cast<unsigned char>(s[p])) || s[p] == '_')) ++p;
    if (p == k || p >= s.size()) return false;
    std::string key(s.substr(k, p - k));
    while (p < s.size() && is_ws(s[p])) ++p;
    if (p >= s.size() || s[p] != '=') return false;
    ++p;
    while (p < s.size() && is_ws(s[p])) ++p;
    Value v;
    if (!python_literal(s, p, v)) return false;
    args.set(Value(key), std::move(v));
    while (p < s.size() && is_ws(s[p])) ++p;
    if (p < s.size() && s[p] == ',') ++p;
    else if (p < s.size() && s[p] == ')') break;
    else return false;
  }
  if (p != s.size() - 1) return false;
  out = make_call(Value(std::string(s.substr(0, dot))), std::move(args));
  return true;
}

// Llama 3.x: JSON calls anywhere in the text (objects, ';'-separated, or lists).
void parse_llama3(std::string_view text, ParsedToolCalls& r) {
  std::string without_tag;
  size_t tag = text.find(kPythonTag);
  if (tag != std::string_view::npos) {
    std::string_view before = trim(text.substr(0, tag));
    std::string_view body = trim(text.substr(tag + kPythonTag.size()));
    Value call;
    bool builtin = builtin_call(body, call);
    if (!builtin && !body.empty() && body[0] != '{' && body[0] != '[') {
      Value args = Value::dict();
      args.set("code", Value(body));
      call = make_call(Value("code_interpreter"), std::move(args));
      builtin = true;
    }
    if (builtin) {
      r.tool_calls.push_back(std::move(call));
      r.content = before.empty() ? Value() : Value(before);
      return;
    }
    // <|python_tag|>{"name": ...}: JSON calls after the tag
    without_tag = std::string(text.substr(0, tag)) + std::string(text.substr(tag + kPythonTag.size()));
    text = without_tag;
  }
  std::string content;
  size_t pos = 0, copied = 0;
  while (pos < text.size()) {
    size_t open = text.find_first_of("{[", pos);
    if (open == std::string_view::npos) break;
    size_t end = open;
    Value parsed;
    bool ok = true;
    try {
      parsed = json_parse_prefix(text, end);
    } catch (const InvalidArgument&) {
      ok = false;
    }
    List calls;
    std::string error;
    if (ok) {
      if (parsed.is_dict()) {
        Value c;
        if (call_from_json(parsed, c, error)) calls.push_back(std::move(c));
      } else if (parsed.is_list() && !parsed.list().empty()) {
        for (auto& item : parsed.list()) {
          Value c;
          if (!call_from_json(item, c, error)) {
            calls.clear();
            break;
          }
          calls.push_back(std::move(c));
        }
      }
    } else {
      // something that starts like a call but is not valid JSON
      std::string_view rest = trim(text.substr(open + 1));
      if (text[open] == '{' && rest.substr(0, 6) == "\"name\"") error = "malformed JSON tool call";
    }
    if (!error.empty()) {
      r.error = error;
      r.tool_calls = Value(List{});
      return;
    }
    if (calls.empty()) {
      pos = open + 1;
      continue;
    }
    content.append(text.substr(copied, open - copied));
    for (auto& c : calls) r.tool_calls.push_back(std::move(c));
    pos = copied = end;
    while (copied < text.size() && (is_ws(text[copied]) || text[copied] == ';')) ++copied;
    pos = copied;
  }
  content.append(text.substr(copied));
  std::string_view c = trim(content);
  if (r.tool_calls.list().empty()) {
    r.content = Value(text);
    return;
  }
  r.content = c.empty() ? Value() : Value(c);
}

// Qwen3-Coder: <function=name><parameter=key>\nvalue\n</parameter>...</function>.
// The template prints strings raw and other values as JSON, so a value that
// reads as a JSON number/bool/null/object/array is taken as one.
bool xml_function_call(std::string_view body, Value& out, std::string& error) {
  const std::string_view fn_open = "<function=", fn_close = "</function>", p_open = "<parameter=", p_close = "</parameter>";
  if (body.substr(0, fn_open.size()) != fn_open) return false;
  size_t gt = body.find('>');
  if (gt == std::string_view::npos) {
    error = "malformed <function=...> tag";
    return false;
  }
  std::string name(trim(body.substr(fn_open.size(), gt - fn_open.size())));
  size_t end = body.rfind(fn_close);
  if (name.empty() || end == std::string_view::npos || end < gt) {
    error = "a <function=...> block is not closed";
    return false;
  }
  Value args = Value::dict();
  size_t pos = gt + 1;
  while (true) {
    size_t a = body.find(p_open, pos);
    if (a == std::string_view::npos || a > end) break;
    size_t g = body.find('>', a);
    size_t b = body.find(p_close, a);
    if (g == std::string_view::npos || b == std::string_view::npos || g > b) {
      error = "malformed <parameter=...> block";
      return false;
    }
    std::string key(trim(body.substr(a + p_open.size(), g - a - p_open.size())));
    std::string_view raw = body.substr(g + 1, b - g - 1);
    if (!raw.empty() && raw.front() == '\n') raw.remove_prefix(1);
    if (!raw.empty() && raw.back() == '\n') raw.remove_suffix(1);
    Value v(raw);
    std::string_view t = trim(raw);
    if (!t.empty() && (t[0] == '{' || t[0] == '[' || t[0] == '-' || (t[0] >= '0' && t[0] <= '9') || t == "true" ||
                       t == "false" || t == "null")) {
      try {
        v = json_loads(t);
      } catch (const InvalidArgument&) {
      }
    }
    args.set(Value(key), std::move(v));
    pos = b + p_close.size();
  }
  out = make_call(Value(name), std::move(args));
  return true;
}

// Hermes / Qwen: <tool_call>{json}</tool_call> blocks
void parse_hermes(std::string_view text, ParsedToolCalls& r) {
  const std::string_view open_tag = "<tool_call>", close_tag = "</tool_call>";
  std::string content;
  size_t pos = 0;
  while (true) {
    size_t a = text.find(open_tag, pos);
    if (a == std::string_view::npos) break;
    size_t b = text.find(close_tag, a);
    std::string_view body = trim(text.substr(a + open_tag.size(), b == std::string_view::npos ? std::string_view::npos
                                                                                                 : b - a - open_tag.size()));
    content.append(text.substr(pos, a - pos));
    Value call;
    std::string error;
    bool ok = xml_function_call(body, call, error);
    if (!ok && error.empty()) {
      try {
        ok = call_from_json(json_loads(body), call, error);
      } catch (const InvalidArgument& e) {
        error = std::string("malformed JSON in <tool_call>: ") + e.what();
      }
    }
    if (!ok) {
      r.error = error.empty() ? "a <tool_call> block is not a {\"name\", \"arguments\"} object" : error;
      r.tool_calls = Value(List{});
      return;
    }
    if (b == std::string_view::npos && !r.error.empty()) return;
    r.tool_calls.push_back(std::move(call));
    if (b == std::string_view::npos) {
      pos = text.size();
      break;
    }
    pos = b + close_tag.size();
  }
  content.append(text.substr(std::min(pos, text.size())));
  if (r.tool_calls.list().empty()) {
    r.content = Value(text);
    return;
  }
  std::string_view c = trim(content);
  r.content = c.empty() ? Value() : Value(c);
}

}  // namespace

Value ParsedToolCalls::to_json() const {
  Value out = Value::dict();
  out.set("content", content);
  out.set("tool_calls", tool_calls);
  out.set("stop", stop.empty() ? Value() : Value(stop));
  out.set("error", error.empty() ? Value() : Value(error));
  return out;
}

ToolCallFormat tool_call_format(std::string_view name) {
  if (name == "auto") return ToolCallFormat::Auto;
  if (name == "llama3" || name == "llama") return ToolCallFormat::Llama3;
  if (name == "hermes" || name == "qwen") return ToolCallFormat::Hermes;
  throw InvalidArgument("unknown tool-call format '" + std::string(name) + "' (expected auto, llama3, hermes or qwen)");
}

ParsedToolCalls parse_tool_calls(std::string_view text, ToolCallFormat format) {
  ParsedToolCalls r;
  r.tool_calls = Value(List{});
  std::string_view body = text;
  // the stop token tells a tool call awaiting a result (eom) from a finished turn (eot)
  std::string_view t = trim(body);
  for (auto [tok, name] : {std::pair{kEom, "eom"}, std::pair{kEot, "eot"}, std::pair{std::string_view("<|im_end|>"), "eot"},
                           std::pair{std::string_view("<|end_of_text|>"), "eot"}}) {
    if (ends_with(t, tok)) {
      r.stop = name;
      body = t.substr(0, t.size() - tok.size());
      break;
    }
  }
  if (format == ToolCallFormat::Auto)
    format = body.find("<tool_call>") != std::string_view::npos ? ToolCallFormat::Hermes : ToolCallFormat::Llama3;
  try {
    if (format == ToolCallFormat::Hermes) parse_hermes(body, r);
    else parse_llama3(body, r);
  } catch (const std::exception& e) {
    r.error = e.what();
    r.tool_calls = Value(List{});
  }
  if (!r.error.empty()) r.content = Value(body);
  return r;
}

}  // namespace qforge::chat
