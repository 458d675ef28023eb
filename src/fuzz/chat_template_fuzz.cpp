// libFuzzer target for the chat engine: lexer, parser, evaluator, JSON and
// the tool-call parsers (every format, one-shot and streamed). Any input must end in a rendered string or a
// qforge::InvalidArgument (TemplateError) — never a crash, a hang, unbounded
// recursion or memory. The input is "<template>\x00<context JSON>" (the
// context part optional); its bytes also go through json_loads and
// parse_tool_calls in every format and a ToolCallStream fed in chunks.
//
// Build and run (clang):
//   clang++ -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -Iinclude -Isrc \
//     src/fuzz/chat_template_fuzz.cpp src/chat/*.cpp -o build-chat/chat_fuzz
//   build-chat/chat_fuzz -max_total_time=300 -timeout=10 -rss_limit_mb=2048 build-chat/corpus \
//     tests/fuzz/chat_template tests/chat/templates tests/chat/tool_call_corpus
// (add -fno-sanitize-recover=all to the build so that undefined behaviour
// stops the run). tests/fuzz/chat_template/ holds the hostile inputs of
// tests/python/test_chat_hostile.py as seeds, tests/chat/tool_call_corpus/ the
// tool-call texts of every template; runs are recorded in docs/chat.md.
// Without libFuzzer, -DQF_FUZZ_STANDALONE builds a driver that runs files given
// on the command line (and every template with random mutations).
#include <cstdint>
#include <cstring>
#include <vector>
#include <string>
#include <string_view>

#include "qforge/chat/apply.hpp"
#include "qforge/chat/template.hpp"
#include "qforge/chat/tool_calls.hpp"

namespace {

const char* kDefaultContext = R"({"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi é"},
  {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"a": [1, 2.5, null]}}}]},
  {"role": "tool", "content": "{\"r\": 1}"}], "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
  "add_generation_prompt": true, "bos_token": "<s>", "eos_token": "</s>"})";

void run_one(std::string_view data) {
  using namespace qforge::chat;
  size_t split = data.find('\0');
  std::string_view source = data.substr(0, split);
  std::string_view ctx = split == std::string_view::npos ? std::string_view(kDefaultContext) : data.substr(split + 1);
  RenderOptions opt;
  opt.now = 0;
  opt.limits.max_output_bytes = 1 << 20;
  opt.limits.max_steps = 1000000;
  opt.limits.max_call_depth = 64;
  try {
    Value context = json_loads(ctx);
    Template t(source);
    if (context.is_dict() && context.get("messages")) {
      try {
        apply_chat_template(t, chat_request_from_json(context), opt);
      } catch (const qforge::InvalidArgument&) {
      }
    }
    if (context.is_dict()) t.render(context, opt);
    try {  // the same bytes as a batch of conversations (the splitter and per-item parse)
      ChatRequest shared;
      shared.messages = Value(List{});
      apply_chat_template_batch_json(t, shared, data, opt, 1);
    } catch (const qforge::InvalidArgument&) {
    }
  } catch (const qforge::InvalidArgument&) {
  }
  try {
    json_dumps(json_loads(data));
  } catch (const qforge::InvalidArgument&) {
  }
  // every tool-call format, and the text streamed in chunks of a size the data picks
  std::vector<ToolCallFormat> formats{ToolCallFormat::Auto};
  for (auto& name : tool_call_format_names()) formats.push_back(tool_call_format(name));
  for (ToolCallFormat f : formats) parse_tool_calls(data, f);
  ToolCallStream stream(formats[data.size() % formats.size()]);
  size_t step = 1 + data.size() % 13;
  for (size_t i = 0; i < data.size(); i += step) stream.feed(data.substr(i, step));
  stream.finish();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  run_one(std::string_view(reinterpret_cast<const char*>(data), size));
  return 0;
}

#ifdef QF_FUZZ_STANDALONE
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>

int main(int argc, char** argv) {
  std::mt19937_64 rng(argc > 1 ? 1 : 0);
  long runs = 0;
  for (int i = 1; i < argc; ++i) {
    std::ifstream f(argv[i], std::ios::binary);
    std::stringstream s;
    s << f.rdbuf();
    std::string base = s.str();
    run_one(base);
    for (int k = 0; k < 300; ++k) {  // byte-level mutations: flip, delete, duplicate a slice
      std::string m = base;
      int edits = 1 + static_cast<int>(rng() % 4);
      for (int e = 0; e < edits && !m.empty(); ++e) {
        size_t pos = rng() % m.size();
        switch (rng() % 4) {
          case 0: m[pos] = static_cast<char>(rng() % 256); break;
          case 1: m.erase(pos, 1 + rng() % 16); break;
          case 2: m.insert(pos, m.substr(rng() % m.size(), 1 + rng() % 32)); break;
          default: {
            static const char* toks[] = {"{%", "%}", "{{", "}}", "{#", "-", "(", ")", "[", "]", "|", "'", "\"", "\\", "endfor", "endif", "loop", "namespace(", "macro",
                                         "<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "<think>", "</think>", "<|message|>", "<|\"|>",
                                         "<function=", "</parameter>", "<arg_value>", ">>>", "<｜tool▁sep｜>", "{", "}", ":", ","};
            m.insert(pos, toks[rng() % (sizeof toks / sizeof *toks)]);
          }
        }
      }
      run_one(m);
      ++runs;
    }
  }
  std::cout << "ran " << runs << " mutated inputs without a crash\n";
  return 0;
}
#endif
