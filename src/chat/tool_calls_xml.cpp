// Tool-call families with XML-like parameters: GLM 4.x (<arg_key>/<arg_value>),
// MiniMax M2 and DeepSeek V3.2 DSML (<invoke name=...><parameter name=...>),
// Seed-OSS (<seed:tool_call> around Qwen3-Coder's <function=...>). Templates
// print string values raw and others as JSON (Seed-OSS: Python reprs), so a
// value that reads as a non-string value is one; DSML says which with string="true|false".
// Every search stays inside the block being read, so a parse is linear.
#include "tool_calls_internal.hpp"

namespace qforge::chat::tool_calls_detail {

namespace {

std::string_view strip_one_newline(std::string_view v) {
  if (!v.empty() && v.front() == '\n') v.remove_prefix(1);
  if (!v.empty() && v.back() == '\n') v.remove_suffix(1);
  return v;
}

// Blocks open ... close in text: each body handed to read_block (false: stop,
// r.error set); the text around them is the content.
template <class ReadBlock>
void parse_blocks(std::string_view text, ParsedToolCalls& r, std::string_view open, std::string_view close,
                  ReadBlock read_block) {
  parse_marked(text, r, open, [&](size_t a) {
    size_t b = text.find(close, a);
    if (b == std::string_view::npos) return failed(r, "a " + std::string(open) + " block is not closed");
    return read_block(text.substr(a, b - a)) ? b + close.size() : kFailed;
  });
}

// a + b + c (one allocation; GCC 12 misreads chained operator+ as overlapping memcpy)
std::string concat(std::string_view a, std::string_view b, std::string_view c) {
  std::string out;
  out.reserve(a.size() + b.size() + c.size());
  out.append(a).append(b).append(c);
  return out;
}

// An element <OPEN"NAME"ATTRS>BODY</CLOSE> (OPEN ends with the opening quote).
struct Element {
  std::string name;
  std::string_view attrs, body;
  size_t end;  // one past CLOSE
};
enum class Found { None, Element, Unclosed };

// The first such element in s from pos (an unclosed one ends the parse, so no
// byte is searched again and again).
Found next_element(std::string_view s, size_t pos, std::string_view open, std::string_view close, Element& out) {
  size_t a = s.find(open, pos);
  if (a == std::string_view::npos) return Found::None;
  size_t q = s.find('"', a + open.size());
  size_t gt = q == std::string_view::npos ? q : s.find('>', q);
  size_t e = gt == std::string_view::npos ? gt : s.find(close, gt);
  if (e == std::string_view::npos) return Found::Unclosed;
  out.name = std::string(s.substr(a + open.size(), q - a - open.size()));
  out.attrs = s.substr(q + 1, gt - q - 1);
  out.body = s.substr(gt + 1, e - gt - 1);
  out.end = e + close.size();
  return Found::Element;
}

// <PREFIXinvoke name="NAME"><PREFIXparameter name="KEY" [string="true|false"]>VALUE</PREFIXparameter>...</PREFIXinvoke>
bool read_invokes(std::string_view body, ParsedToolCalls& r, std::string_view prefix) {
  const std::string invoke_open = concat("<", prefix, "invoke name=\""), invoke_close = concat("</", prefix, "invoke>");
  const std::string param_open = concat("<", prefix, "parameter name=\""), param_close = concat("</", prefix, "parameter>");
  Element invoke, param;
  for (size_t pos = 0;; pos = invoke.end) {
    Found f = next_element(body, pos, invoke_open, invoke_close, invoke);
    if (f == Found::None) return true;
    if (f == Found::Unclosed) {
      fail(r, "an " + invoke_open + "...\"> block is not closed");
      return false;
    }
    Value args = Value::dict();
    for (size_t p = 0;; p = param.end) {
      Found g = next_element(invoke.body, p, param_open, param_close, param);
      if (g == Found::None) break;
      if (g == Found::Unclosed) {
        fail(r, "a " + param_open + "...\"> block of '" + invoke.name + "' is not closed");
        return false;
      }
      std::string_view raw = strip_one_newline(param.body);
      Value v;
      if (param.attrs.find("string=\"true\"") != std::string_view::npos) {
        v = Value(raw);
      } else if (param.attrs.find("string=\"false\"") != std::string_view::npos) {
        std::string error;
        if (!load_json(trim(raw), v, error)) {
          fail(r, "parameter '" + param.name + "' of '" + invoke.name + "' is marked string=\"false\" but is not JSON: " +
                      error);
          return false;
        }
      } else {
        v = typed_param(raw, false, invoke.name, param.name);
      }
      args.set(Value(param.name), std::move(v));
    }
    r.tool_calls.push_back(make_call(Value(invoke.name), std::move(args)));
  }
}

}  // namespace

// GLM 4.x: <tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>
void parse_glm4(std::string_view text, ParsedToolCalls& r) {
  parse_blocks(text, r, "<tool_call>", "</tool_call>", [&](std::string_view body) {
    const std::string_view k_open = "<arg_key>", k_close = "</arg_key>", v_open = "<arg_value>", v_close = "</arg_value>";
    size_t first = body.find(k_open);
    std::string name(trim(body.substr(0, first)));
    if (name.empty()) {
      fail(r, "a <tool_call> block has no tool name");
      return false;
    }
    Value args = Value::dict();
    for (size_t p = first; p != std::string_view::npos; p = body.find(k_open, p)) {
      size_t ke = body.find(k_close, p);
      size_t vs = ke == std::string_view::npos ? ke : body.find(v_open, ke);
      size_t ve = vs == std::string_view::npos ? vs : body.find(v_close, vs);
      if (ve == std::string_view::npos) {
        fail(r, "an <arg_key> of '" + name + "' has no closed <arg_value>");
        return false;
      }
      std::string key(trim(body.substr(p + k_open.size(), ke - p - k_open.size())));
      args.set(Value(key), typed_param(body.substr(vs + v_open.size(), ve - vs - v_open.size()), false, name, key));
      p = ve + v_close.size();
    }
    r.tool_calls.push_back(make_call(Value(name), std::move(args)));
    return true;
  });
}

// MiniMax M2: <minimax:tool_call><invoke name="..."><parameter name="...">v</parameter></invoke></minimax:tool_call>
void parse_minimax_m2(std::string_view text, ParsedToolCalls& r) {
  parse_blocks(text, r, "<minimax:tool_call>", "</minimax:tool_call>",
               [&](std::string_view body) { return read_invokes(body, r, ""); });
}

// DeepSeek V3.2: the same under <｜DSML｜function_calls>, values marked string="true|false".
void parse_deepseek_v3_2(std::string_view text, ParsedToolCalls& r) {
  parse_blocks(text, r, "<｜DSML｜function_calls>", "</｜DSML｜function_calls>",
               [&](std::string_view body) { return read_invokes(body, r, "｜DSML｜"); });
}

// Seed-OSS: <seed:tool_call><function=NAME><parameter=K>V</parameter></function></seed:tool_call>
void parse_seed_oss(std::string_view text, ParsedToolCalls& r) {
  parse_blocks(text, r, "<seed:tool_call>", "</seed:tool_call>", [&](std::string_view body) {
    Value call;
    std::string error;
    if (!xml_function_call(trim(body), call, error, true)) {
      fail(r, error.empty() ? "a <seed:tool_call> block holds no <function=...>" : error);
      return false;
    }
    r.tool_calls.push_back(std::move(call));
    return true;
  });
}

}  // namespace qforge::chat::tool_calls_detail
