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
  std::string content;
  size_t pos = 0;
  while (true) {
    size_t a = text.find(open, pos);
    if (a == std::string_view::npos) break;
    content.append(text.substr(pos, a - pos));
    size_t b = text.find(close, a + open.size());
    if (b == std::string_view::npos) return fail(r, "a " + std::string(open) + " block is not closed");
    if (!read_block(text.substr(a + open.size(), b - a - open.size()))) return;
    pos = b + close.size();
  }
  content.append(text.substr(pos));
  set_content(r, r.tool_calls.list().empty() ? text : std::string_view(content));
}

// <PREFIXinvoke name="NAME"><PREFIXparameter name="KEY" [string="true|false"]>VALUE</PREFIXparameter>...</PREFIXinvoke>
bool read_invokes(std::string_view body, ParsedToolCalls& r, std::string_view prefix) {
  const std::string invoke_open = "<" + std::string(prefix) + "invoke name=\"", invoke_close = "</" + std::string(prefix) + "invoke>";
  const std::string param_open = "<" + std::string(prefix) + "parameter name=\"", param_close = "</" + std::string(prefix) + "parameter>";
  size_t pos = 0;
  while (true) {
    size_t a = body.find(invoke_open, pos);
    if (a == std::string_view::npos) break;
    size_t q = body.find('"', a + invoke_open.size());
    size_t gt = q == std::string_view::npos ? q : body.find('>', q);
    size_t end = gt == std::string_view::npos ? gt : body.find(invoke_close, gt);
    if (end == std::string_view::npos) {
      fail(r, "an " + invoke_open + "...\"> block is not closed");
      return false;
    }
    std::string name(body.substr(a + invoke_open.size(), q - a - invoke_open.size()));
    std::string_view inner = body.substr(gt + 1, end - gt - 1);
    Value args = Value::dict();
    size_t p = 0;
    while (true) {
      size_t s = inner.find(param_open, p);
      if (s == std::string_view::npos) break;
      size_t kq = inner.find('"', s + param_open.size());
      size_t kg = kq == std::string_view::npos ? kq : inner.find('>', kq);
      size_t e = kg == std::string_view::npos ? kg : inner.find(param_close, kg);
      if (e == std::string_view::npos) {
        fail(r, "a " + param_open + "...\"> block of '" + name + "' is not closed");
        return false;
      }
      std::string key(inner.substr(s + param_open.size(), kq - s - param_open.size()));
      std::string_view attrs = inner.substr(kq + 1, kg - kq - 1);
      std::string_view raw = strip_one_newline(inner.substr(kg + 1, e - kg - 1));
      Value v;
      if (attrs.find("string=\"true\"") != std::string_view::npos) {
        v = Value(raw);
      } else if (attrs.find("string=\"false\"") != std::string_view::npos) {
        std::string error;
        if (!load_json(trim(raw), v, error)) {
          fail(r, "parameter '" + key + "' of '" + name + "' is marked string=\"false\" but is not JSON: " + error);
          return false;
        }
      } else {
        v = typed_param(raw, false);
      }
      args.set(Value(key), std::move(v));
      p = e + param_close.size();
    }
    r.tool_calls.push_back(make_call(Value(name), std::move(args)));
    pos = end + invoke_close.size();
  }
  return true;
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
      args.set(Value(key), typed_param(body.substr(vs + v_open.size(), ve - vs - v_open.size()), false));
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
