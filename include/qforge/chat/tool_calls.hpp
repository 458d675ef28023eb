// Reading tool calls back out of generated text, into OpenAI-style
// tool_calls: Llama 3.x JSON calls and <|python_tag|> builtin calls, and
// Hermes / Qwen <tool_call> blocks (JSON inside, or Qwen3-Coder's
// <function=...><parameter=...> form). Never throws on malformed model output:
// the raw text comes back as content with `error` set.
#pragma once
#include <string>
#include <string_view>

#include "qforge/chat/value.hpp"

namespace qforge::chat {

enum class ToolCallFormat { Auto, Llama3, Hermes };

struct ParsedToolCalls {
  Value content;     // str (text around the calls) or None
  Value tool_calls;  // list of {"type": "function", "function": {"name", "arguments": dict}}
  std::string stop;  // "eom" (<|eom_id|>: the model waits for a tool result), "eot", or ""
  std::string error; // why the text could not be parsed as calls ("" when fine)
  Value to_json() const;
};

ParsedToolCalls parse_tool_calls(std::string_view text, ToolCallFormat format = ToolCallFormat::Auto);
ToolCallFormat tool_call_format(std::string_view name);  // "auto" | "llama3" | "hermes" | "qwen"; throws otherwise

}  // namespace qforge::chat
