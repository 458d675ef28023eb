#include "qforge/chat/tool_calls.hpp"
#include "qforge/error.hpp"
namespace qforge::chat {
Value ParsedToolCalls::to_json() const { return Value(); }
ParsedToolCalls parse_tool_calls(std::string_view, ToolCallFormat) { return {}; }
ToolCallFormat tool_call_format(std::string_view) { return ToolCallFormat::Auto; }
}
