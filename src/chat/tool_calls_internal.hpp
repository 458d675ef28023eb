// Shared pieces of the tool-call parsers (src/chat/tool_calls*.cpp); not part
// of the public API. Every reader here is linear in the text it reads and
// never throws on model output: malformed text is reported through `error`.
#pragma once
#include <string>
#include <string_view>

#include "qforge/chat/tool_calls.hpp"

namespace qforge::chat::tool_calls_detail {

inline bool is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
std::string_view trim(std::string_view s);
bool starts_with(std::string_view s, std::string_view prefix);
size_t skip_ws(std::string_view s, size_t p);

// {"type": "function", "function": {"name": name, "arguments": args}}
Value make_call(const Value& name, Value args);
// One whole JSON document with the tool-call limits (depth, surrogates);
// false with `error` set when it is not one.
bool load_json(std::string_view json, Value& out, std::string& error);
// The JSON value that starts at text[pos] (after whitespace): true with `out`
// and `end` (one past it) set; false with `error` set when none starts there.
bool json_value_at(std::string_view text, size_t pos, Value& out, size_t& end, std::string& error);
// A JSON object shaped like a call: {"name"|"tool_name": str, "arguments"|"parameters": dict|json-string}
// or {"function": {...}}; with name_keyed, also Apertus' {"NAME": {args}}.
// False (with `error` set when it is a call with bad arguments) when it is not a call.
bool call_from_json(const Value& obj, Value& out, std::string& error, bool name_keyed = false);
// A value printed raw by a template for parameter `key` of tool `tool`: the
// raw string when the tools given to parse_tool_calls declare the parameter a
// string; else the JSON (or, with python, Python literal) value it reads as
// when that is not a string; else the raw string.
Value typed_param(std::string_view raw, bool python, std::string_view tool, std::string_view key);
// A Python literal (str, int, float, True/False/None, list, tuple, dict; JSON's
// true/false/null too) at s[p]; advances p. Depth is bounded by kMaxToolCallDepth.
bool python_literal(std::string_view s, size_t& p, Value& out, std::string& error, int depth = 0);

// Results: `content` is the text outside the calls, trimmed, None when empty.
void set_content(ParsedToolCalls& r, std::string_view content);
void fail(ParsedToolCalls& r, std::string why);
// A reader's "stop here": r.error set, the parse fails.
inline constexpr size_t kFailed = std::string_view::npos;
inline size_t failed(ParsedToolCalls& r, std::string why) {
  fail(r, std::move(why));
  return kFailed;
}
// r.content without any of `tokens` (a family's wrappers and turn separators).
void drop_tokens(ParsedToolCalls& r, std::initializer_list<std::string_view> tokens);
// A tool name as models write them: 1..256 bytes, no whitespace or markup.
bool plausible_name(std::string_view name);
// After a call ending at p: one past `close` (whitespace skipped first), or
// the text's end when the text ends there (an unwritten close), else kFailed.
size_t past_close(std::string_view text, size_t p, std::string_view close, ParsedToolCalls& r, std::string_view what);

// The frame every marker family shares: each `open` in the text, searched
// from where the last call ended, is handed to read(offset past the marker),
// which adds the call(s) there to r and returns where they end (kFailed: stop,
// r.error set). The text outside is the content (all of it when no calls).
template <class Read>
void parse_marked(std::string_view text, ParsedToolCalls& r, std::string_view open, Read read) {
  std::string content;
  size_t pos = 0;
  for (size_t a; (a = text.find(open, pos)) != std::string_view::npos;) {
    content.append(text.substr(pos, a - pos));
    pos = read(a + open.size());
    if (pos == kFailed) return;
  }
  content.append(text.substr(pos));
  set_content(r, r.tool_calls.list().empty() ? text : std::string_view(content));
}

// Family parsers: fill r.tool_calls and r.content, or set r.error.
void parse_llama3(std::string_view text, ParsedToolCalls& r);
void parse_hermes(std::string_view text, ParsedToolCalls& r);
void parse_mistral(std::string_view text, ParsedToolCalls& r);
void parse_json_section(std::string_view text, ParsedToolCalls& r, std::string_view open, std::string_view close,
                        bool name_keyed = false);
void parse_deepseek(std::string_view text, ParsedToolCalls& r);
void parse_kimi_k2(std::string_view text, ParsedToolCalls& r);
void parse_solar_open(std::string_view text, ParsedToolCalls& r);
void parse_functionary_v3_1(std::string_view text, ParsedToolCalls& r);
void parse_functionary_v3_2(std::string_view text, ParsedToolCalls& r);
void parse_glm4(std::string_view text, ParsedToolCalls& r);
void parse_minimax_m2(std::string_view text, ParsedToolCalls& r);
void parse_deepseek_v3_2(std::string_view text, ParsedToolCalls& r);
void parse_seed_oss(std::string_view text, ParsedToolCalls& r);
void parse_lfm2(std::string_view text, ParsedToolCalls& r);
void parse_gemma4(std::string_view text, ParsedToolCalls& r);
void parse_harmony(std::string_view text, ParsedToolCalls& r);
// Qwen3-Coder's <function=name><parameter=key>value</parameter></function>
// (body: one block); false with `error` empty when body is not of that shape.
bool xml_function_call(std::string_view body, Value& out, std::string& error, bool python_values = false);

}  // namespace qforge::chat::tool_calls_detail
