// Reading tool calls back out of generated text, into OpenAI-style
// tool_calls: Llama 3.x JSON calls and <|python_tag|> builtin calls, and
// Hermes / Qwen <tool_call> blocks (JSON inside, or Qwen3-Coder's
// <function=...><parameter=...> form). Never throws on malformed model output:
// the raw text comes back as content with `error` set.
//
// Any text is safe to hand over: a parse is linear in the text's length (at
// most kMaxToolCallScanFactor scanner steps per byte, beyond which the text
// comes back as content with `error` set), keeps at most about 20 bytes of
// working memory per byte of text, and never recurses: JSON is scanned with an
// explicit stack of at most kMaxToolCallDepth levels.
// Text that is not valid UTF-8 reads as if decoded with U+FFFD for each
// maximal invalid sequence (Python's errors="replace"), except that a UTF-8
// encoded surrogate (ED A0..BF xx, what Python's "surrogatepass" writes for a
// lone surrogate) is one U+FFFD; a JSON escape of a lone surrogate ("\ud800"
// without its pair) also reads as U+FFFD. Every string of a result is valid
// UTF-8.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>

#include "qforge/chat/value.hpp"

namespace qforge::chat {

enum class ToolCallFormat { Auto, Llama3, Hermes };

// Arrays and objects nested deeper than this in a call's JSON make it
// malformed (real calls nest a few levels; the result stays printable by
// json.dumps and readable by json.loads, which stop near 500-1000).
inline constexpr int kMaxToolCallDepth = 64;
// Longer text is not searched for calls: it comes back as content, `error` set.
inline constexpr size_t kMaxToolCallTextBytes = size_t{8} << 20;
// Scanner steps per byte of text after which the search for JSON calls stops
// (error set). Linear inputs take at most a few per byte.
inline constexpr size_t kMaxToolCallScanFactor = 16;

struct ParsedToolCalls {
  Value content;     // str (text around the calls) or None
  Value tool_calls;  // list of {"type": "function", "function": {"name", "arguments": dict}}
  std::string stop;  // "eom" (<|eom_id|>: the model waits for a tool result), "eot", or ""
  std::string error; // why the text could not be parsed as calls ("" when fine)
  Value to_json() const;
};

ParsedToolCalls parse_tool_calls(std::string_view text, ToolCallFormat format = ToolCallFormat::Auto);
ToolCallFormat tool_call_format(std::string_view name);  // "auto" | "llama3" | "hermes" | "qwen"; throws otherwise

// `text` with each invalid UTF-8 sequence replaced by U+FFFD as described
// above; `text` itself (no copy, `storage` untouched) when it is valid.
std::string_view scrub_utf8(std::string_view text, std::string& storage);

}  // namespace qforge::chat
