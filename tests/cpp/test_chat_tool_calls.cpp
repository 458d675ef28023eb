// Tool-call parsing, checked against what the model families' own templates
// render for a tool call (those renderings equal jinja2's: test_chat_engine).
#include <gtest/gtest.h>

#include "chat_test_util.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>
#include <thread>

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

// ------------------------------------------------------------ hostile model output
namespace {

double seconds_to_parse(const std::string& text, ParsedToolCalls& out) {
  auto t0 = std::chrono::steady_clock::now();
  out = parse_tool_calls(text);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

bool valid_utf8(const std::string& s) {
  std::string storage;
  return scrub_utf8(s, storage).data() == s.data();
}

}  // namespace

TEST(ChatToolCalls, DeepBracketsAndGarbageParseInLinearTime) {
  std::string garbage;
  uint64_t x = 88172645463325252ull;  // xorshift: JSON punctuation, digits, quotes, escapes
  const char alphabet[] = "{}[]\",:0123456789.-eE truefalsnul\\u";
  for (int i = 0; i < (1 << 20); ++i) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    garbage += alphabet[x % (sizeof(alphabet) - 1)];
  }
  std::string repeated_key;
  for (int i = 0; i < 100000; ++i) repeated_key += "{\"a\":";
  std::string strings_flipped = "[\"[\" , ";  // a bracket inside every string of another reading
  for (int i = 0; i < 200000; ++i) strings_flipped += "\",\" , ";
  for (const std::string& text : {std::string(100000, '['), std::string(1 << 20, '['), std::string(1 << 20, '{'), repeated_key,
                                  strings_flipped, garbage}) {
    SCOPED_TRACE(text.substr(0, 24));
    ParsedToolCalls p;
    double s = seconds_to_parse(text, p);
    EXPECT_LT(s, 1.0);  // 81 s for '[' * 100000 when every bracket was parsed anew
    EXPECT_TRUE(p.tool_calls.list().empty());
    EXPECT_EQ(p.content.str(), text);
  }
}

TEST(ChatToolCalls, NestingDeeperThanTheLimitIsAnErrorKeepingTheText) {
  auto call = [](int depth) {
    std::string args;
    for (int i = 0; i < depth; ++i) args += "{\"a\":";
    args += "1" + std::string(static_cast<size_t>(depth), '}');
    return "{\"name\":\"f\",\"parameters\":" + args + "}";
  };
  ParsedToolCalls ok = parse_tool_calls(call(kMaxToolCallDepth - 1));  // the call's object is a level too
  EXPECT_TRUE(ok.error.empty()) << ok.error;
  EXPECT_EQ(ok.tool_calls.list().size(), 1u);
  for (int depth : {kMaxToolCallDepth, 600, 100000}) {
    std::string text = call(depth);
    for (const std::string& t : {text, "<tool_call>" + text + "</tool_call>"}) {
      ParsedToolCalls p = parse_tool_calls(t);
      EXPECT_NE(p.error.find("deeper than 64"), std::string::npos) << p.error;
      EXPECT_TRUE(p.tool_calls.list().empty());
      EXPECT_EQ(p.content.str(), t);
    }
  }
  // arguments as a JSON string nesting too deep
  std::string deep_string = "{\"name\": \"f\", \"arguments\": \"" + std::string(1000, '[') + "\"}";
  ParsedToolCalls p = parse_tool_calls(deep_string);
  EXPECT_NE(p.error.find("deeper than 64"), std::string::npos) << p.error;
  EXPECT_EQ(p.content.str(), deep_string);
}

TEST(ChatToolCalls, TruncatedJsonIsAnErrorKeepingTheText) {
  for (const char* text : {R"({"name": "f", "parameters": {"a": [1, 2)", R"({"name": "f", "parameters": {"a": "unterminated)",
                           R"({"name": "f", "parameters": {"a": 1})", "<tool_call>{\"name\": \"f\", \"arguments\": {",
                           R"({"name": "f", "parameters": {"a": "\ud8"}})"}) {
    SCOPED_TRACE(text);
    ParsedToolCalls p = parse_tool_calls(text);
    EXPECT_FALSE(p.error.empty());
    EXPECT_TRUE(p.tool_calls.list().empty());
    EXPECT_EQ(p.content.str(), text);
  }
}

TEST(ChatToolCalls, LoneSurrogateEscapesReadAsReplacementCharacter) {
  const std::string fffd = "\xEF\xBF\xBD";
  ParsedToolCalls p = parse_tool_calls(R"({"name":"f","parameters":{"a":"\ud800","b":"x\udc00y","c":"\ud83d\ude00"}})");
  ASSERT_TRUE(p.error.empty()) << p.error;
  const Value& args = *p.tool_calls.list()[0].get("function")->get("arguments");
  EXPECT_EQ(args.get("a")->str(), fffd);
  EXPECT_EQ(args.get("b")->str(), "x" + fffd + "y");
  EXPECT_EQ(args.get("c")->str(), "\xF0\x9F\x98\x80");  // a pair is one code point
  // in a key, in arguments given as a JSON string, in a Hermes block
  for (const char* text : {R"({"name":"f","parameters":{"\udfff":1}})", R"({"name":"f","arguments":"{\"a\": \"\\ud800\"}"})",
                           "<tool_call>{\"name\":\"f\",\"arguments\":{\"a\":\"\\ud800\"}}</tool_call>"}) {
    ParsedToolCalls q = parse_tool_calls(text);
    ASSERT_TRUE(q.error.empty()) << text << ": " << q.error;
    std::string dumped = json_dumps(q.to_json());
    EXPECT_TRUE(valid_utf8(dumped)) << dumped;
    EXPECT_NE(dumped.find(fffd), std::string::npos) << dumped;
  }
}

TEST(ChatToolCalls, InvalidUtf8InTheTextReadsAsReplacementCharacters) {
  const std::string fffd = "\xEF\xBF\xBD";
  std::string storage;
  // as Python's bytes.decode("utf-8", "replace"), except an encoded surrogate is one U+FFFD
  EXPECT_EQ(scrub_utf8("ok \xC3\xA9", storage), "ok \xC3\xA9");
  EXPECT_EQ(scrub_utf8("a\xFF" "b", storage), "a" + fffd + "b");
  EXPECT_EQ(scrub_utf8("\xE2\x82", storage), fffd);                  // truncated: one maximal subpart
  EXPECT_EQ(scrub_utf8("\xE2\x82" "x", storage), fffd + "x");
  EXPECT_EQ(scrub_utf8("\xC0\xAF", storage), fffd + fffd);           // overlong
  EXPECT_EQ(scrub_utf8("\xF4\x90\x80\x80", storage), fffd + fffd + fffd + fffd);  // beyond U+10FFFF
  EXPECT_EQ(scrub_utf8("\xED\xA0\x80", storage), fffd);              // a surrogate, as "surrogatepass" writes it
  EXPECT_EQ(scrub_utf8("\xED\x9F\xBF", storage), "\xED\x9F\xBF");    // U+D7FF is fine
  std::string text = "Sure \xFF\xED\xA0\x80 {\"name\": \"f\", \"parameters\": {\"q\": \"caf\xC3\"}}";
  ParsedToolCalls p = parse_tool_calls(text);
  ASSERT_TRUE(p.error.empty()) << p.error;
  EXPECT_EQ(p.content.str(), "Sure " + fffd + fffd);
  EXPECT_EQ(p.tool_calls.list()[0].get("function")->get("arguments")->get("q")->str(), "caf" + fffd);
  ParsedToolCalls plain = parse_tool_calls("no calls \xC3");
  EXPECT_EQ(plain.content.str(), "no calls " + fffd);
}

TEST(ChatToolCalls, TextBeyondTheSizeLimitIsReturnedAsContent) {
  std::string text(kMaxToolCallTextBytes + 1, 'x');
  text.replace(0, 40, R"({"name": "f", "parameters": {}}         )");
  ParsedToolCalls p = parse_tool_calls(text);
  EXPECT_NE(p.error.find("longer than"), std::string::npos);
  EXPECT_TRUE(p.tool_calls.list().empty());
  EXPECT_EQ(p.content.str().size(), text.size());
}

TEST(ChatToolCalls, CallsNestedInOtherJsonAndAfterBrokenJsonAreFound) {
  // a bracket inside a string of a failed value is tried on its own
  ParsedToolCalls p = parse_tool_calls(R"(["oops {"name": "f", "parameters": {"k": [1]}} and {"x": {"name": "g", "parameters": {}}})");
  ASSERT_TRUE(p.error.empty()) << p.error;
  ASSERT_EQ(p.tool_calls.list().size(), 2u);
  EXPECT_EQ(p.tool_calls.list()[0].get("function")->get("name")->str(), "f");
  EXPECT_EQ(p.tool_calls.list()[1].get("function")->get("name")->str(), "g");
  // "name" that is not a string: not a call, look inside
  p = parse_tool_calls(R"({"name": 1, "inner": {"name": "h", "arguments": {}}})");
  ASSERT_EQ(p.tool_calls.list().size(), 1u);
  EXPECT_EQ(p.tool_calls.list()[0].get("function")->get("name")->str(), "h");
  // the last "name" counts, as in json.loads
  p = parse_tool_calls(R"({"name": 1, "parameters": {}, "name": "k"})");
  ASSERT_EQ(p.tool_calls.list().size(), 1u);
  EXPECT_EQ(p.tool_calls.list()[0].get("function")->get("name")->str(), "k");
}

// ------------------------------------------------------------ batches and spans
TEST(ChatBatch, AbsurdThreadCountsAreClamped) {
  Template tmpl("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}");
  List convs;
  for (int i = 0; i < 600; ++i)
    convs.push_back(json_loads(R"([{"role": "user", "content": "q)" + std::to_string(i) + R"("}])"));
  ChatRequest shared;
  auto one = apply_chat_template_batch(tmpl, shared, convs, {}, 1);
  for (int threads : {1000, 100000, -5}) {
    auto many = apply_chat_template_batch(tmpl, shared, convs, {}, threads);
    ASSERT_EQ(many.size(), one.size());
    for (size_t i = 0; i < one.size(); ++i) EXPECT_EQ(many[i].text, one[i].text);
  }
}

TEST(ChatBatchDeathTest, ThreadsTheSystemRefusesAreNotFatal) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  Template tmpl("{% for m in messages %}{{ m.content }};{% endfor %}");
  List convs;
  for (int i = 0; i < 2000; ++i) convs.push_back(json_loads(R"([{"role": "user", "content": "c)" + std::to_string(i) + R"("}])"));
  ChatRequest shared;
  auto want = apply_chat_template_batch(tmpl, shared, convs, {}, 1);
  // In a child with little address space left, most of 200 threads' stacks
  // cannot be mapped: std::thread throws std::system_error (before: the batch
  // died in std::terminate), and the calling thread renders their share.
  EXPECT_EXIT(
      {
        std::ifstream statm("/proc/self/statm");
        size_t pages = 0;
        statm >> pages;
        rlimit lim{};
        getrlimit(RLIMIT_AS, &lim);
        lim.rlim_cur = pages * static_cast<size_t>(sysconf(_SC_PAGESIZE)) + (64u << 20);
        setrlimit(RLIMIT_AS, &lim);
        std::vector<std::thread> probe;  // the limit bites (else the test proves nothing)
        bool refused = false;
        for (int i = 0; i < 200 && !refused; ++i) {
          try {
            probe.emplace_back([] {});
          } catch (const std::system_error&) {
            refused = true;
          }
        }
        for (auto& t : probe) t.join();
        if (!refused) std::_Exit(2);
        auto got = apply_chat_template_batch(tmpl, shared, convs, {}, 200);
        bool same = got.size() == want.size();
        for (size_t i = 0; same && i < got.size(); ++i) same = got[i].text == want[i].text;
        std::_Exit(same ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "");
}

TEST(ChatSpans, ManyGenerationBlocksGetCodePointOffsets) {
  Template tmpl("{% for m in messages %}é→{% generation %}{{ m.content }}{% endgeneration %}|{% endfor %}");
  ChatRequest req;
  List msgs;
  for (int i = 0; i < 5000; ++i) msgs.push_back(json_loads(R"({"role": "assistant", "content": "ü)" + std::to_string(i) + R"("})"));
  req.messages = Value(std::move(msgs));
  auto t0 = std::chrono::steady_clock::now();
  ChatRendered r = apply_chat_template(tmpl, req);
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 1.0);
  ASSERT_EQ(r.generation.size(), 5000u);
  size_t at = 0;  // in code points: "é→" then "ü<i>" then "|"
  for (int i = 0; i < 5000; ++i) {
    size_t len = 1 + std::to_string(i).size();
    EXPECT_EQ(r.generation[i], std::make_pair(at + 2, at + 2 + len)) << i;
    at += 2 + len + 1;
  }
}

namespace {

struct GoldenParse {
  std::string template_name, format, text;
  Value parse;
};

// tests/chat/goldens' "tool_call_parses" (make_tool_call_goldens.py): the text
// jinja2 renders for an assistant turn with 1-3 calls, and its parse.
std::vector<GoldenParse> golden_parses() {
  std::vector<GoldenParse> out;
  for (auto& entry : fs::directory_iterator(chat_dir() / "goldens")) {
    Value golden = json_loads(slurp(entry.path()));
    const Value* parses = golden.get("tool_call_parses");
    if (!parses) continue;
    for (auto& [n, c] : parses->dict_ref().items)
      out.push_back({golden.get("template")->str(), golden.get("tool_call_format")->str(), c.get("text")->str(),
                     *c.get("parse")});
  }
  return out;
}

}  // namespace

TEST(ChatToolCalls, EveryTemplatesFormatIsDetectedAndItsGoldenTextsParse) {
  auto cases = golden_parses();
  ASSERT_GE(cases.size(), 120u);
  for (auto& c : cases) {
    SCOPED_TRACE(c.template_name + ": " + c.text.substr(0, 200));
    ToolCallFormat f = detect_tool_call_format(slurp(chat_dir() / "templates" / c.template_name));
    EXPECT_EQ(tool_call_format_name(f), c.format);
    ParsedToolCalls got = parse_tool_calls(c.text, f);
    EXPECT_TRUE(got.error.empty()) << got.error;
    EXPECT_TRUE(py_equal(got.to_json(), c.parse)) << json_dumps(got.to_json()) << "\nvs\n" << json_dumps(c.parse);
  }
}

TEST(ChatToolCalls, StreamedInChunksEveryGoldenTextEndsInTheOneShotParse) {
  for (auto& c : golden_parses()) {
    SCOPED_TRACE(c.template_name + ": " + c.text.substr(0, 200));
    ToolCallFormat f = tool_call_format(c.format);
    ParsedToolCalls whole = parse_tool_calls(c.text, f);
    for (size_t step : {1, 3, 7, 64}) {
      ToolCallStream stream(f);
      size_t seen = 0;
      for (size_t i = 0; i < c.text.size(); i += step) {
        const ParsedToolCalls& now = stream.feed(std::string_view(c.text).substr(i, step));
        const List& calls = now.tool_calls.list();
        ASSERT_LE(calls.size(), whole.tool_calls.list().size());
        ASSERT_GE(calls.size(), seen);  // calls are never taken back
        for (size_t k = 0; k < calls.size(); ++k) ASSERT_TRUE(py_equal(calls[k], whole.tool_calls.list()[k]));
        seen = calls.size();
      }
      EXPECT_EQ(json_dumps(stream.finish().to_json()), json_dumps(whole.to_json()));
    }
  }
}

TEST(ChatToolCalls, FormatNamesRoundTripAndUnknownOnesAreRefusedByName) {
  auto names = tool_call_format_names();
  EXPECT_GE(names.size(), 20u);
  for (auto& n : names) EXPECT_EQ(tool_call_format_name(tool_call_format(n)), n);
  EXPECT_EQ(tool_call_format("qwen"), ToolCallFormat::Hermes);
  try {
    tool_call_format("nope");
    FAIL() << "no error";
  } catch (const qforge::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("mistral"), std::string::npos) << e.what();
  }
  EXPECT_EQ(detect_tool_call_format("{{ messages[0].content }}"), ToolCallFormat::Auto);
}

TEST(ChatToolCalls, MalformedCallsOfEveryFamilyKeepTheTextAndSayWhy) {
  const std::pair<ToolCallFormat, std::string> cases[] = {
      {ToolCallFormat::Mistral, R"([TOOL_CALLS]f[ARGS]{"a": 1)"},
      {ToolCallFormat::DeepSeek, R"(<｜tool▁call▁begin｜>f<｜tool▁sep｜>{"a": })"},
      {ToolCallFormat::Glm4, "<tool_call>f<arg_key>a</arg_key>"},
      {ToolCallFormat::MiniMaxM2, R"(<minimax:tool_call><invoke name="f"><parameter name="a">1</invoke>)"},
      {ToolCallFormat::Lfm2, "<|tool_call_start|>[f(a=" + std::string(200, '[') + ")]"},
      {ToolCallFormat::Gemma4, "<|tool_call>call:f{" + std::string(300, '{')},
      {ToolCallFormat::GptOss, "<|start|>assistant to=functions.f<|channel|>commentary<|message|>[1]"},
      {ToolCallFormat::SeedOss, "<seed:tool_call><function=f>"},
      {ToolCallFormat::FunctionaryV32, "f\n{\"a\": 1} then text"},
  };
  for (auto& [f, text] : cases) {
    SCOPED_TRACE(text);
    ParsedToolCalls p = parse_tool_calls(text, f);
    EXPECT_FALSE(p.error.empty());
    EXPECT_TRUE(p.tool_calls.list().empty());
    EXPECT_EQ(p.content.str(), text);
    EXPECT_TRUE(p.reasoning_content.is_none());
  }
}

TEST(ChatToolCalls, StreamRefusesTextBeyondTheSizeLimit) {
  ToolCallStream stream(ToolCallFormat::Hermes);
  std::string chunk(1 << 20, 'x');
  for (size_t i = 0; i < kMaxToolCallTextBytes / chunk.size(); ++i) stream.feed(chunk);
  EXPECT_THROW(stream.feed("y"), qforge::InvalidArgument);
}

TEST(ChatToolCalls, DeclaredStringParametersStayStringsGivenTheTools) {
  const std::string text = "<tool_call>\n<function=f>\n<parameter=zip>\n75001\n</parameter>\n<parameter=n>\n3\n"
                           "</parameter>\n</function>\n</tool_call>";
  Value tools = json_loads(R"([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
      "properties": {"zip": {"type": "string"}, "n": {"type": "integer"}}}}}])");
  ParsedToolCalls bare = parse_tool_calls(text, ToolCallFormat::Hermes);
  EXPECT_EQ(json_dumps(*bare.tool_calls.list()[0].get("function")->get("arguments")), R"({"zip": 75001, "n": 3})");
  ParsedToolCalls typed = parse_tool_calls(text, ToolCallFormat::Hermes, &tools);
  EXPECT_EQ(json_dumps(*typed.tool_calls.list()[0].get("function")->get("arguments")), R"({"zip": "75001", "n": 3})");
  ToolCallStream stream(ToolCallFormat::Hermes, tools);
  for (char c : text) stream.feed(std::string_view(&c, 1));
  EXPECT_EQ(json_dumps(stream.finish().to_json()), json_dumps(typed.to_json()));
  // the schemas apply to that parse only
  EXPECT_EQ(json_dumps(parse_tool_calls(text, ToolCallFormat::Hermes).to_json()), json_dumps(bare.to_json()));
}
