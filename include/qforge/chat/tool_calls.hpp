// Reading tool calls back out of generated text, into OpenAI-style
// tool_calls, for every chat-template family in tests/chat/templates (the
// formats are listed in docs/chat.md, "Tool-call parsing"): Llama 3.x JSON and
// <|python_tag|> builtin calls, Hermes / Qwen <tool_call> (JSON or Qwen3-Coder
// XML), Mistral [TOOL_CALLS], DeepSeek, Command R7B, GLM 4.x, Kimi K2, MiniMax
// M2, gpt-oss harmony, LFM2, Functionary, Apertus, Seed-OSS, Nemotron, ...
// Reasoning blocks go to reasoning_content. Never throws on malformed model
// output: the raw text comes back as content with `error` set.
//
// Any text is safe to hand over: a parse is linear in the text's length (at
// most kMaxToolCallScanFactor scanner steps per byte, beyond which the text
// comes back as content with `error` set), keeps at most about 20 bytes of
// working memory per byte of text, and never recurses: JSON is scanned with an
// explicit stack of at most kMaxToolCallDepth levels (Python-literal and
// Gemma 4 arguments recurse, at most kMaxToolCallDepth frames).
// Text that is not valid UTF-8 reads as if decoded with U+FFFD for each
// maximal invalid sequence (Python's errors="replace"), except that a UTF-8
// encoded surrogate (ED A0..BF xx, what Python's "surrogatepass" writes for a
// lone surrogate) is one U+FFFD; a JSON escape of a lone surrogate ("\ud800"
// without its pair) also reads as U+FFFD. Every string of a result is valid
// UTF-8.
#pragma once
#include "qforge/export.hpp"
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "qforge/chat/value.hpp"

namespace qforge::chat {

enum class ToolCallFormat {
  Auto,  // told from markers in the text itself (Llama 3 JSON when none)
  Llama3, Hermes, Mistral, DeepSeek, DeepSeekV32, CommandR7B, CommandRPlus, Granite, Glm4, KimiK2, MiniMaxM2, GptOss, Lfm2,
  FunctionaryV31, FunctionaryV32, Apertus, SeedOss, NemotronV2, Apriel, SolarOpen, Gemma4, GigaChat, FireFunction,
};

// Arrays and objects nested deeper than this in a call's JSON make it
// malformed (real calls nest a few levels; the result stays printable by
// json.dumps and readable by json.loads, which stop near 500-1000).
inline constexpr int kMaxToolCallDepth = 64;
// Longer text is not searched for calls: it comes back as content, `error` set.
inline constexpr size_t kMaxToolCallTextBytes = size_t{8} << 20;
// Scanner steps per byte of text after which the search for JSON calls stops
// (error set). Linear inputs take at most a few per byte.
inline constexpr size_t kMaxToolCallScanFactor = 16;

struct QFORGE_API ParsedToolCalls {
  Value content;     // str (text around the calls) or None
  Value reasoning_content;  // str (the family's thinking block) or None
  Value tool_calls;  // list of {"type": "function", "function": {"name", "arguments": dict}}
  std::string stop;  // "eom" (<|eom_id|>: the model waits for a tool result), "eot", or ""
  std::string error; // why the text could not be parsed as calls ("" when fine)
  std::string format;  // the family the text was read as
  Value to_json() const;
};

// `tools` (optional): the OpenAI tool schemas the model was given. Formats
// that print values raw (Qwen3-Coder / Seed-OSS / Nemotron 3 XML, GLM,
// MiniMax) then keep a parameter declared {"type": "string"} as the string it
// spells ("75001", "true") instead of reading it as a number or bool.
QFORGE_API ParsedToolCalls parse_tool_calls(std::string_view text, ToolCallFormat format = ToolCallFormat::Auto,
                                 const Value* tools = nullptr);
// "auto" or a family's name (tool_call_format_names(); a few aliases: "qwen",
// "llama", ...); throws InvalidArgument otherwise.
QFORGE_API ToolCallFormat tool_call_format(std::string_view name);
QFORGE_API const char* tool_call_format_name(ToolCallFormat format);
QFORGE_API std::vector<std::string> tool_call_format_names();
// The tokens that end a turn in some family (the parser drops them from the end
// of a text): where generation stops.
QFORGE_API std::vector<std::string> stop_tokens();
// The format a chat template's model writes calls in, from markers in the
// template source (as llama.cpp's common/chat does); Auto when none is known.
QFORGE_API ToolCallFormat detect_tool_call_format(std::string_view template_source);

// Incremental parsing of streamed text: feed() chunks, read the content and
// reasoning so far and the calls completed so far; finish() is exactly
// parse_tool_calls of the whole text. A call is reported only once its text
// is complete (a truncated call is held back, not reported, not an error),
// and text that may start a call marker is held back from content. Each
// feed() re-reads the text so far (linear in it; the text is bounded by
// kMaxToolCallTextBytes like any parse).
class QFORGE_API ToolCallStream {
 public:
  explicit ToolCallStream(ToolCallFormat format = ToolCallFormat::Auto, Value tools = Value())
      : format_(format), tools_(std::move(tools)) {
    last_.tool_calls = Value(List{});
  }
  const ParsedToolCalls& feed(std::string_view chunk);
  ParsedToolCalls finish() const;
  const ParsedToolCalls& current() const { return last_; }

 private:
  const Value* tools_ptr() const { return tools_.is_none() ? nullptr : &tools_; }
  ToolCallFormat format_;
  Value tools_;  // as parse_tool_calls' tools (None: not given)
  std::string text_;
  ParsedToolCalls last_;
};

// `text` with each invalid UTF-8 sequence replaced by U+FFFD as described
// above; `text` itself (no copy, `storage` untouched) when it is valid.
QFORGE_API std::string_view scrub_utf8(std::string_view text, std::string& storage);

}  // namespace qforge::chat
