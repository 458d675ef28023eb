// Tool-call families whose arguments are JSON: marker + JSON list sections
// (Mistral's old form, Apriel, Nemotron, Apertus, Command R7B / R+, Granite,
// GigaChat, FireFunction), and name + JSON calls between special tokens
// (Mistral's name[ARGS]{...}, DeepSeek, Kimi K2, Solar Open, Functionary).
// Each marker search starts where the last call ended (parse_marked) or the
// parse fails at once, so a parse is linear in the text.
#include "tool_calls_internal.hpp"

namespace qforge::chat::tool_calls_detail {

namespace {

// The calls a JSON value holds: one call object, or a list of them.
bool collect_calls(const Value& v, ParsedToolCalls& r, std::string& error, bool name_keyed) {
  if (v.is_dict()) {
    Value call;
    if (!call_from_json(v, call, error, name_keyed)) return false;
    r.tool_calls.push_back(std::move(call));
    return true;
  }
  if (!v.is_list()) return false;
  for (const Value& item : v.list()) {
    Value call;
    if (!call_from_json(item, call, error, name_keyed)) return false;
    r.tool_calls.push_back(std::move(call));
  }
  return true;
}

// ``` or ```json before a JSON value (Command R+, DeepSeek R1 fence theirs)
size_t skip_fence(std::string_view text, size_t p) {
  p = skip_ws(text, p);
  if (starts_with(text.substr(p), "```json")) return p + 7;
  if (starts_with(text.substr(p), "```")) return p + 3;
  return p;
}

// The JSON object of `name`'s arguments at text[p] added as a call; one past it, or kFailed.
size_t json_arguments(std::string_view text, size_t p, const std::string& name, ParsedToolCalls& r) {
  Value args;
  size_t end;
  std::string error;
  if (!json_value_at(text, p, args, end, error)) return failed(r, "malformed JSON arguments of '" + name + "': " + error);
  if (!args.is_dict()) return failed(r, "the arguments of '" + name + "' are not a JSON object");
  r.tool_calls.push_back(make_call(Value(name), std::move(args)));
  return end;
}

// name + JSON arguments between begin / sep / end tokens; name_of turns the
// text between begin and sep into the tool's name ("" when it is not one).
// DeepSeek R1 writes "function<sep>NAME\n```json\n{...}\n```": a head of
// "function" takes the name from the first line after sep.
template <class NameOf>
void parse_delimited(std::string_view text, ParsedToolCalls& r, std::string_view begin, std::string_view sep,
                     std::string_view end, NameOf name_of) {
  parse_marked(text, r, begin, [&](size_t a) {
    size_t s = text.find(sep, a);
    size_t next = text.find(begin, a);
    if (s == std::string_view::npos || s > next)
      return failed(r, "a tool call's " + std::string(begin) + " has no " + std::string(sep));
    std::string_view head = trim(text.substr(a, s - a));
    size_t p = s + sep.size();
    std::string name;
    if (head == "function") {
      size_t nl = text.find('\n', p);
      if (nl == std::string_view::npos || nl > next) return failed(r, "a DeepSeek tool call has no name line");
      name = std::string(trim(text.substr(p, nl - p)));
      p = nl + 1;
    } else {
      name = name_of(head);
    }
    if (!plausible_name(name)) return failed(r, "a tool call has no valid name before " + std::string(sep));
    size_t e = json_arguments(text, skip_fence(text, p), name, r);
    if (e == kFailed) return kFailed;
    e = skip_ws(text, e);
    if (starts_with(text.substr(e), "```")) e += 3;
    return past_close(text, e, end, r, "the arguments of '" + name + "'");
  });
}

}  // namespace

void parse_json_section(std::string_view text, ParsedToolCalls& r, std::string_view open, std::string_view close,
                        bool name_keyed) {
  parse_marked(text, r, open, [&](size_t p) {
    Value v;
    size_t end;
    std::string error;
    if (!json_value_at(text, skip_fence(text, p), v, end, error))
      return failed(r, "malformed JSON after " + std::string(open) + ": " + error);
    if (!collect_calls(v, r, error, name_keyed))
      return failed(r, error.empty() ? "the JSON after " + std::string(open) + " is not a call or a list of calls" : error);
    end = skip_ws(text, end);
    if (starts_with(text.substr(end), "```")) end += 3;
    return close.empty() ? end : past_close(text, end, close, r, "the calls");
  });
}

// Mistral: [TOOL_CALLS][{"name", "arguments"}, ...] (Nemo) or, per call,
// [TOOL_CALLS]name[ARGS]{...} (Small 3.2 adds [CALL_ID]id before [ARGS]).
void parse_mistral(std::string_view text, ParsedToolCalls& r) {
  const std::string_view open = "[TOOL_CALLS]", args_tag = "[ARGS]", id_tag = "[CALL_ID]";
  parse_marked(text, r, open, [&](size_t p) {
    p = skip_ws(text, p);
    if (p < text.size() && (text[p] == '[' || text[p] == '{')) {
      Value v;
      size_t end;
      std::string error;
      if (!json_value_at(text, p, v, end, error)) return failed(r, "malformed JSON after [TOOL_CALLS]: " + error);
      if (!collect_calls(v, r, error, false))
        return failed(r, error.empty() ? "the JSON after [TOOL_CALLS] is not a list of calls" : error);
      return end;
    }
    size_t g = text.find(args_tag, p);
    if (g == std::string_view::npos) return failed(r, "a [TOOL_CALLS] call has no [ARGS]");
    std::string_view head = text.substr(p, g - p);
    std::string name(trim(head.substr(0, head.find(id_tag))));
    if (!plausible_name(name)) return failed(r, "a [TOOL_CALLS] call has no valid name before [ARGS]");
    return json_arguments(text, g + args_tag.size(), name, r);
  });
}

// DeepSeek V3 / R1 (function<sep>NAME + ```json fences) and V3.1 (NAME<sep>{...}).
void parse_deepseek(std::string_view text, ParsedToolCalls& r) {
  parse_delimited(text, r, "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>",
                  [](std::string_view head) { return std::string(head); });
  drop_tokens(r, {"<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"});
}

// Kimi K2: <|tool_call_begin|>functions.NAME:INDEX<|tool_call_argument_begin|>{...}<|tool_call_end|>
void parse_kimi_k2(std::string_view text, ParsedToolCalls& r) {
  parse_delimited(text, r, "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>",
                  [](std::string_view head) {
                    if (starts_with(head, "functions.")) head.remove_prefix(10);
                    return std::string(head.substr(0, head.rfind(':')));
                  });
  drop_tokens(r, {"<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"});
}

// Solar Open: <|tool_call:begin|>ID<|tool_call:name|>NAME<|tool_call:args|>{...}<|tool_call:end|>
void parse_solar_open(std::string_view text, ParsedToolCalls& r) {
  parse_delimited(text, r, "<|tool_call:begin|>", "<|tool_call:args|>", "<|tool_call:end|>", [](std::string_view head) {
    const std::string_view tag = "<|tool_call:name|>";
    size_t at = head.find(tag);
    return at == std::string_view::npos ? std::string() : std::string(trim(head.substr(at + tag.size())));
  });
  drop_tokens(r, {"<|tool_calls|>", "<|calls|>"});
}

// Functionary v3.1: <function=NAME>{...}</function>
void parse_functionary_v3_1(std::string_view text, ParsedToolCalls& r) {
  parse_delimited(text, r, "<function=", ">", "</function>", [](std::string_view head) { return std::string(head); });
}

// Functionary v3.2: >>>RECIPIENT\nBODY segments; "all" is text for the user,
// any other recipient a tool called with the JSON body. The prompt ends with
// the first ">>>", so generated text starts with a recipient.
void parse_functionary_v3_2(std::string_view text, ParsedToolCalls& r) {
  std::string_view t = starts_with(text, ">>>") ? text.substr(3) : text;
  std::string content;
  size_t pos = 0;
  while (pos < t.size()) {
    size_t nl = t.find('\n', pos);
    std::string name(trim(t.substr(pos, nl == std::string_view::npos ? std::string_view::npos : nl - pos)));
    if (nl == std::string_view::npos || !plausible_name(name)) {
      if (pos == 0) return set_content(r, text);  // a plain reply, no recipient
      return fail(r, "a >>> segment has no recipient line");
    }
    if (name == "all") {
      size_t next = t.find(">>>", nl + 1);
      content.append(t.substr(nl + 1, next == std::string_view::npos ? std::string_view::npos : next - nl - 1));
      pos = next == std::string_view::npos ? t.size() : next + 3;
      continue;
    }
    size_t e = json_arguments(t, nl + 1, name, r);
    if (e == kFailed) return;
    e = skip_ws(t, e);
    if (e < t.size() && !starts_with(t.substr(e), ">>>")) return fail(r, "expected >>> after the arguments of '" + name + "'");
    pos = e + 3;
  }
  set_content(r, content);
}

}  // namespace qforge::chat::tool_calls_detail
