// Tool-call parsing, checked against what the model families' own templates
// render for a tool call (those renderings equal jinja2's: test_chat_engine).
#include <gtest/gtest.h>

#include "chat_test_util.hpp"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "qforge/chat/apply.hpp"
#include "qforge/chat/template.hpp"
#include "qforge/chat/tool_calls.hpp"

using namespace qforge::chat;
namespace fs = std::filesystem;

namespace {

using chat_test::chat_dir;
using chat_test::slurp;

// The first assistant turn that carries tool calls, as the template rendered it.
std::string assistant_turn(const std::string& text, const std::string& header, const std::vector<std::string>& ends,
                           size_t nth = 0) {
  size_t a = std::string::npos, from = 0;
  for (size_t k = 0; k <= nth; ++k) {
    a = text.find(header, from);
    if (a == std::string::npos) return {};
    from = a + header.size();
  }
  a += header.size();
  size_t best = std::string::npos, best_len = 0;
  for (auto& e : ends) {
    size_t b = text.find(e, a);
    if (b < best) {
      best = b;
      best_len = e.size();
    }
  }
  return best == std::string::npos ? text.substr(a) : text.substr(a, best - a + best_len);
}

void expect_calls(const ParsedToolCalls& got, const Value& message) {
  EXPECT_TRUE(got.error.empty()) << got.error;
  const List& want = message.get("tool_calls")->list();
  ASSERT_EQ(got.tool_calls.list().size(), want.size()) << json_dumps(got.to_json());
  for (size_t i = 0; i < want.size(); ++i) {
    const Value& fn = *want[i].get("function");
    const Value& gfn = *got.tool_calls.list()[i].get("function");
    EXPECT_EQ(gfn.get("name")->str(), fn.get("name")->str());
    Value args = *fn.get("arguments");
    if (args.is_string()) args = json_loads(args.str());
    EXPECT_TRUE(py_equal(*gfn.get("arguments"), args)) << json_dumps(*gfn.get("arguments")) << " vs " << json_dumps(args);
  }
}

struct Family {
  const char* file;
  const char* header;
  std::vector<std::string> ends;
  ToolCallFormat format;
};

const Family kFamilies[] = {
    {"meta-llama-Llama-3.1-8B-Instruct.jinja", "<|start_header_id|>assistant<|end_header_id|>\n\n", {"<|eot_id|>", "<|eom_id|>"}, ToolCallFormat::Llama3},
    {"meta-llama-Llama-3.2-3B-Instruct.jinja", "<|start_header_id|>assistant<|end_header_id|>\n\n", {"<|eot_id|>", "<|eom_id|>"}, ToolCallFormat::Llama3},
    {"meta-llama-Llama-3.3-70B-Instruct.jinja", "<|start_header_id|>assistant<|end_header_id|>\n\n", {"<|eot_id|>", "<|eom_id|>"}, ToolCallFormat::Llama3},
    {"vllm-tool_chat_template_llama3.1_json.jinja", "<|start_header_id|>assistant<|end_header_id|>\n\n", {"<|eot_id|>", "<|eom_id|>"}, ToolCallFormat::Llama3},
    {"NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja", "<|im_start|>assistant\n", {"<|im_end|>"}, ToolCallFormat::Hermes},
    {"NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja", "<|im_start|>assistant\n", {"<|im_end|>"}, ToolCallFormat::Hermes},
    {"Qwen-Qwen2.5-7B-Instruct.jinja", "<|im_start|>assistant\n", {"<|im_end|>"}, ToolCallFormat::Hermes},
    {"Qwen-Qwen3-0.6B.jinja", "<|im_start|>assistant\n", {"<|im_end|>"}, ToolCallFormat::Hermes},
    {"Qwen-QwQ-32B.jinja", "<|im_start|>assistant\n", {"<|im_end|>"}, ToolCallFormat::Hermes},
    {"Qwen3-Coder.jinja", "<|im_start|>assistant\n", {"<|im_end|>"}, ToolCallFormat::Hermes},
};

}  // namespace

TEST(ChatToolCalls, ParsesWhatEachFamilysTemplateRenders) {
  Value requests = json_loads(slurp(chat_dir() / "conversations.json"));
  int checked = 0;
  for (const Family& fam : kFamilies) {
    Template tmpl(slurp(chat_dir() / "templates" / fam.file));
    for (const char* conv : {"one_tool_call", "several_tool_calls", "string_arguments", "nested_json_args"}) {
      SCOPED_TRACE(std::string(fam.file) + " / " + conv);
      ChatRequest req = chat_request_from_json(*requests.get(conv));
      std::string text;
      try {
        text = apply_chat_template(tmpl, req).text;
      } catch (const TemplateError& e) {
        // e.g. Llama 3.x refuses several calls in one message: so does Python (the goldens say so)
        std::string stem = std::string(fam.file).substr(0, std::string(fam.file).size() - 6);
        Value golden = json_loads(slurp(chat_dir() / "goldens" / (stem + ".json")));
        EXPECT_TRUE(golden.get("cases")->get(conv)->get("error")) << e.what();
        continue;
      }
      // the assistant message with tool calls is the first one that has them
      const List& msgs = req.messages.list();
      size_t nth = 0;
      const Value* msg = nullptr;
      for (auto& m : msgs)
        if (m.get("role")->str() == "assistant") {
          if (m.get("tool_calls")) {
            msg = &m;
            break;
          }
          ++nth;
        }
      ASSERT_TRUE(msg);
      std::string turn = assistant_turn(text, fam.header, fam.ends, nth);
      ASSERT_FALSE(turn.empty()) << text;
      expect_calls(parse_tool_calls(turn, fam.format), *msg);
      expect_calls(parse_tool_calls(turn, ToolCallFormat::Auto), *msg);
      ++checked;
    }
  }
  EXPECT_GE(checked, 33);
}

TEST(ChatToolCalls, Llama31BuiltinToolsRoundTrip) {
  Template tmpl(llama3_template(1));
  ChatRequest req = chat_request_from_json(json_loads(R"({
    "messages": [{"role": "user", "content": "Latest news?"},
                 {"role": "assistant", "tool_calls": [{"type": "function", "function":
                   {"name": "brave_search", "arguments": {"query": "Llama \"4\" release"}}}]}],
    "builtin_tools": ["brave_search", "wolfram_alpha"], "bos_token": "<|begin_of_text|>"})"));
  std::string text = apply_chat_template(tmpl, req).text;
  std::string turn = assistant_turn(text, "<|start_header_id|>assistant<|end_header_id|>\n\n", {"<|eom_id|>", "<|eot_id|>"});
  ASSERT_EQ(turn, "<|python_tag|>brave_search.call(query=\"Llama \"4\" release\")<|eom_id|>");
  ParsedToolCalls p = parse_tool_calls("<|python_tag|>brave_search.call(query=\"Llama 4 release\")<|eom_id|>");
  EXPECT_EQ(p.stop, "eom");
  ASSERT_EQ(p.tool_calls.list().size(), 1u);
  EXPECT_EQ(json_dumps(p.tool_calls),
            R"([{"type": "function", "function": {"name": "brave_search", "arguments": {"query": "Llama 4 release"}}}])");
  EXPECT_TRUE(p.content.is_none());
}

TEST(ChatToolCalls, Llama3Variants) {
  auto p = parse_tool_calls(R"({"name": "a", "parameters": {"x": 1}}; {"name": "b", "arguments": "{\"y\": [2]}"}<|eot_id|>)");
  EXPECT_EQ(p.stop, "eot");
  EXPECT_EQ(json_dumps(p.tool_calls),
            R"([{"type": "function", "function": {"name": "a", "arguments": {"x": 1}}}, )"
            R"({"type": "function", "function": {"name": "b", "arguments": {"y": [2]}}}])");
  p = parse_tool_calls(R"(Let me check. [{"name": "a", "parameters": {}}, {"name": "b", "parameters": {"k": "v"}}])");
  EXPECT_EQ(p.tool_calls.list().size(), 2u);
  EXPECT_EQ(p.content.str(), "Let me check.");
  p = parse_tool_calls("<|python_tag|>{\"name\": \"f\", \"parameters\": {\"q\": \"é\"}}<|eom_id|>");
  ASSERT_EQ(p.tool_calls.list().size(), 1u);
  EXPECT_EQ(p.stop, "eom");
  p = parse_tool_calls("<|python_tag|>import math\nprint(math.pi)<|eom_id|>");
  ASSERT_EQ(p.tool_calls.list().size(), 1u);
  EXPECT_EQ(p.tool_calls.list()[0].get("function")->get("name")->str(), "code_interpreter");
  EXPECT_EQ(p.tool_calls.list()[0].get("function")->get("arguments")->get("code")->str(), "import math\nprint(math.pi)");
  p = parse_tool_calls("Plain answer with {braces} and [1, 2].<|eot_id|>");
  EXPECT_TRUE(p.tool_calls.list().empty());
  EXPECT_EQ(p.content.str(), "Plain answer with {braces} and [1, 2].");
  EXPECT_TRUE(p.error.empty());
}

TEST(ChatToolCalls, MalformedOutputKeepsRawTextAndSaysWhy) {
  for (const char* bad : {R"({"name": "f", "parameters": {"x": )", "<tool_call>\n{\"name\": \"f\", \"arguments\": {oops}}\n</tool_call>",
                          "<tool_call>{\"no_name\": 1}</tool_call>", "<tool_call>{\"name\": \"f\", \"arguments\": \"{bad\"}",
                          R"({"name": "f", "parameters": "not json"})"}) {
    SCOPED_TRACE(bad);
    ParsedToolCalls p = parse_tool_calls(bad);
    EXPECT_FALSE(p.error.empty());
    EXPECT_TRUE(p.tool_calls.list().empty());
    EXPECT_EQ(p.content.str(), bad);
  }
}

TEST(ChatToolCalls, HermesKeepsSurroundingText) {
  auto p = parse_tool_calls("I'll look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n"
                            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call><|im_end|>");
  EXPECT_EQ(p.content.str(), "I'll look.");
  EXPECT_EQ(p.tool_calls.list().size(), 2u);
  EXPECT_EQ(p.stop, "eot");
  EXPECT_THROW(tool_call_format("xml"), qforge::InvalidArgument);
}
