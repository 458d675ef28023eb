// The C++ chat engine on its own: every template x conversation against the
// jinja2 goldens of tests/chat/make_goldens.py, plus values, errors, limits.
#include <gtest/gtest.h>

#include "chat_test_util.hpp"

#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "qforge/chat/apply.hpp"
#include "qforge/chat/template.hpp"
#include "qforge/chat/value.hpp"

using namespace qforge::chat;
namespace fs = std::filesystem;

namespace {

using chat_test::chat_dir;
using chat_test::slurp;

std::string render(const std::string& src, const char* ctx_json = "{}") {
  if (!ctx_json) ctx_json = "{}";
  return Template(src).render(json_loads(ctx_json));
}

}  // namespace

TEST(ChatGoldens, EveryTemplateEveryConversationMatchesJinja2) {
  Value requests = json_loads(slurp(chat_dir() / "conversations.json"));
  int templates = 0, compared = 0;
  for (auto& entry : fs::directory_iterator(chat_dir() / "goldens")) {
    Value golden = json_loads(slurp(entry.path()));
    std::string name = golden.get("template")->str();
    std::string source = slurp(chat_dir() / "templates" / name);
    RenderOptions opt;
    opt.now = golden.get("now")->as_int();
    std::unique_ptr<Template> tmpl;
    std::string compile_error;
    try {
      tmpl = std::make_unique<Template>(source);
    } catch (const TemplateError& e) {
      compile_error = e.what();
    }
    ++templates;
    for (auto& [conv, expected] : golden.get("cases")->dict_ref().items) {
      SCOPED_TRACE(name + " / " + conv.str());
      ChatRequest req = chat_request_from_json(*requests.get(conv.str()));
      const Value* out = expected.get("output");
      ++compared;
      if (!out) {
        const Value& err = *expected.get("error");
        if (!tmpl) continue;  // failed to compile in both
        try {
          apply_chat_template(*tmpl, req, opt);
          ADD_FAILURE() << "expected " << err.get("type")->str() << ": " << err.get("message")->str();
        } catch (const TemplateError& e) {  // same exception class and message as Python
          EXPECT_EQ(e.kind, err.get("type")->str());
          EXPECT_EQ(e.message, err.get("message")->str());
        } catch (const qforge::InvalidArgument&) {
          EXPECT_EQ(err.get("type")->str(), "ValueError");
        }
        continue;
      }
      ASSERT_TRUE(tmpl) << compile_error;
      ChatRendered r = apply_chat_template(*tmpl, req, opt);
      EXPECT_EQ(r.text, out->str());
      if (const Value* gen = expected.get("generation")) {
        ASSERT_EQ(r.generation.size(), gen->list().size());
        for (size_t i = 0; i < r.generation.size(); ++i) {
          EXPECT_EQ(static_cast<int64_t>(r.generation[i].first), gen->list()[i].list()[0].as_int());
          EXPECT_EQ(static_cast<int64_t>(r.generation[i].second), gen->list()[i].list()[1].as_int());
        }
      }
    }
  }
  EXPECT_GE(templates, 60);
  EXPECT_GE(compared, 60 * 20);
}

TEST(ChatValue, PythonFloatRepr) {
  EXPECT_EQ(float_repr(0.1), "0.1");
  EXPECT_EQ(float_repr(1.0), "1.0");
  EXPECT_EQ(float_repr(1e16), "1e+16");
  EXPECT_EQ(float_repr(123456789012345.6), "123456789012345.6");
  EXPECT_EQ(float_repr(1e-5), "1e-05");
  EXPECT_EQ(float_repr(0.0001), "0.0001");
  EXPECT_EQ(float_repr(-2.5e-300), "-2.5e-300");
  EXPECT_EQ(float_repr(0.1 + 0.2), "0.30000000000000004");
}

TEST(ChatValue, JsonRoundTripKeepsOrderAndPythonSpacing) {
  Value v = json_loads(R"({"b": [1, 2.0, "é\n"], "a": {"x": null, "y": true}, "e": {}, "l": []})");
  EXPECT_EQ(json_dumps(v), R"({"b": [1, 2.0, "é\n"], "a": {"x": null, "y": true}, "e": {}, "l": []})");
  DumpOptions o;
  std::string ind = "  ";
  o.indent = &ind;
  o.sort_keys = true;
  o.ensure_ascii = true;
  EXPECT_EQ(json_dumps(v), json_dumps(json_loads(json_dumps(v))));
  EXPECT_EQ(json_dumps(v, o),
            "{\n  \"a\": {\n    \"x\": null,\n    \"y\": true\n  },\n  \"b\": [\n    1,\n    2.0,\n    \"\\u00e9\\n\"\n  ],\n"
            "  \"e\": {},\n  \"l\": []\n}");
  EXPECT_EQ(py_repr(v), R"({'b': [1, 2.0, 'é\n'], 'a': {'x': None, 'y': True}, 'e': {}, 'l': []})");
  EXPECT_THROW(json_loads("{\"a\": }"), qforge::InvalidArgument);
  EXPECT_THROW(json_loads("[1, 2"), qforge::InvalidArgument);
}

TEST(ChatValue, JsonStringsAtEveryOffsetOfTheScan) {
  // the reader and writer scan strings 16 bytes at a time: a byte to stop at, in every place of runs up to 40 bytes
  for (size_t n = 0; n <= 40; ++n)
    for (size_t k = 0; k < n; ++k) {
      std::string plain(n, 'a'), text = plain;
      text.replace(k, 1, "\\n");
      plain[k] = '\n';
      EXPECT_EQ(json_loads("\"" + text + "\"").str(), plain) << n << " " << k;
      std::string raw = "\"" + std::string(n, 'a') + "\"";
      raw[1 + k] = '\x01';
      try {
        json_loads(raw);
        ADD_FAILURE() << n << " " << k;
      } catch (const qforge::InvalidArgument& e) {
        EXPECT_EQ(std::string(e.what()), "invalid JSON: control character in string at offset " + std::to_string(k + 2));
      }
      std::string accented = std::string(k, 'a') + "é" + std::string(n - k, 'a');
      DumpOptions ascii;
      ascii.ensure_ascii = true;
      EXPECT_EQ(json_dumps(Value(accented), ascii), "\"" + std::string(k, 'a') + "\\u00e9" + std::string(n - k, 'a') + "\"");
      EXPECT_EQ(json_loads(json_dumps(Value(accented), ascii)).str(), accented);
      EXPECT_EQ(json_loads("\"" + accented + "\"").str(), accented);  // bytes from 0x80 up are plain when reading
    }
}

TEST(ChatValue, JsonEscapesAndErrorsAsPython) {
  EXPECT_EQ(json_loads(R"("\"\\\/\b\f\n\r\t")").str(), "\"\\/\b\f\n\r\t");
  EXPECT_EQ(json_loads(R"("caf\u00e9 \u65e5\u672C \ud83d\ude80!")").str(), "café 日本 🚀!");
  // lone surrogates keep their 3-byte form, as Python's str holds them
  EXPECT_EQ(json_loads(R"("\ud83dA\udc00")").str(), "\xed\xa0\xbd" "A\xed\xb0\x80");
  EXPECT_EQ(json_loads(R"("\ud83d\u0041")").str(), "\xed\xa0\xbd" "A");
  std::string long_escaped;  // longer than any string before it: the decoded text is copied out whole
  for (int i = 0; i < 200; ++i) long_escaped += "x\\u00e9\\\"";
  std::string long_plain;
  for (int i = 0; i < 200; ++i) long_plain += "xé\"";
  EXPECT_EQ(json_loads("[\"\\n\", \"" + long_escaped + "\", \"\\t\"]").list()[1].str(), long_plain);
  const std::pair<const char*, const char*> errors[] = {
      {R"("ab\q")", "invalid escape at offset 4"},
      {R"("\u12")", "truncated \\u escape at offset 3"},
      {R"("\u12g4")", "bad \\u escape at offset 6"},
      {R"("\ud83d\uzz12")", "bad \\u escape at offset 10"},
      {R"("abc)", "unterminated string at offset 4"},
      {R"("a\)", "unterminated string at offset 3"},
      {R"({"a" 1})", "expecting ':' delimiter at offset 5"},
      {R"({"a":1,})", "expecting property name enclosed in double quotes at offset 7"},
      {"[1,]", "expecting value at offset 3"},
      {"tru", "expecting value at offset 0"},
      {"-Inf", "expecting value at offset 1"},
      {"[1] 2", "extra data at offset 4"},
  };
  for (auto& [text, error] : errors) {
    try {
      json_loads(text);
      ADD_FAILURE() << text;
    } catch (const qforge::InvalidArgument& e) {
      EXPECT_EQ(std::string(e.what()), std::string("invalid JSON: ") + error) << text;
    }
  }
  // a value may sit 1000 levels deep, not 1001
  EXPECT_EQ(json_loads(std::string(999, '[') + "1" + std::string(999, ']')).list().size(), 1u);
  EXPECT_THROW(json_loads(std::string(1000, '[') + "1" + std::string(1000, ']')), qforge::InvalidArgument);
  EXPECT_EQ(json_loads(std::string(1000, '[') + std::string(1000, ']')).list().size(), 1u);
}

TEST(ChatValue, JsonKeysAreSharedAndRepeatsTakeTheLastValue) {
  // one Value per distinct key, escaped or not (as CPython's memo); a repeat keeps its first place
  Value v = json_loads(R"([{"role": 1, "content": 2}, {"content": 3, "r\u006fle": 4, "role": 5, "": 6, "": 7},
                           {"a\"b": 8, "a": 9, "a\u0022b": 10, "\\": 11, "\u005c": 12}])");
  auto& l = v.list();
  EXPECT_EQ(json_dumps(v), R"([{"role": 1, "content": 2}, {"content": 3, "role": 5, "": 7}, {"a\"b": 10, "a": 9, "\\": 12}])");
  EXPECT_EQ(l[0].dict_ref().items[0].first.identity(), l[1].dict_ref().items[1].first.identity());
  EXPECT_EQ(l[0].dict_ref().items[1].first.identity(), l[1].dict_ref().items[0].first.identity());
  // 70 distinct keys: past the 64 memoised, repeats are still found
  std::string many = "{";
  for (int i = 0; i < 70; ++i) many += "\"k" + std::to_string(i) + "\": " + std::to_string(i) + ", ";
  for (int i = 0; i < 70; i += 3) many += "\"k" + std::to_string(i) + "\": -1, ";
  many += "\"" + std::string(40, 'L') + "\": 1, \"" + std::string(40, 'L') + "\": 2}";
  Value d = json_loads(many);
  ASSERT_EQ(d.dict_ref().items.size(), 71u);
  for (int i = 0; i < 70; ++i) EXPECT_EQ(d.get("k" + std::to_string(i))->as_int(), i % 3 ? i : -1) << i;
  EXPECT_EQ(d.get(std::string(40, 'L'))->as_int(), 2);
}

TEST(ChatValue, DeepCopySharesNothing) {
  Value v = json_loads(R"([{"a": [1, "x", {"b": null}]}, "s"])");
  Value c = deep_copy(v);
  EXPECT_EQ(json_dumps(c), json_dumps(v));
  EXPECT_NE(c.identity(), v.identity());
  EXPECT_NE(c.list()[0].get("a")->identity(), v.list()[0].get("a")->identity());
  EXPECT_NE(c.list()[1].identity(), v.list()[1].identity());
}

TEST(ChatEngine, OneTemplateRendersOnManyThreads) {
  // constants and builtins are immortal: threads share them without counting
  Template t("{% for m in messages %}{{ m.role + ': ' + m.content | trim }}{{ range(2) | list }}{% endfor %}");
  std::vector<std::string> outs(8);
  std::vector<std::thread> pool;
  for (int k = 0; k < 8; ++k)
    pool.emplace_back([&, k] {
      for (int i = 0; i < 2000; ++i)
        outs[k] = t.render(json_loads(R"({"messages": [{"role": "user", "content": " hi "}]})"));
    });
  for (auto& th : pool) th.join();
  for (auto& o : outs) EXPECT_EQ(o, "user: hi[0, 1]");
}

TEST(ChatEngine, WhitespaceControlAsJinja2) {
  EXPECT_EQ(render("a\n  {% if true %}\n    x\n  {% endif %}\nb"), "a\n    x\nb");
  EXPECT_EQ(render("a  {%- if true -%}  x  {%- endif -%}  b"), "axb");
  EXPECT_EQ(render("{{ 'x' }}\n"), "x");
  EXPECT_EQ(render("{% raw %}{{ y }}{% endraw %}"), "{{ y }}");
}

TEST(ChatEngine, ErrorsCarryKindAndLineColumn) {
  try {
    render("ok\n  {{ raise_exception('bad role') }}");
    FAIL();
  } catch (const TemplateError& e) {
    EXPECT_EQ(e.kind, "TemplateError");
    EXPECT_EQ(e.message, "bad role");
    EXPECT_EQ(e.line, 2);
    EXPECT_EQ(e.column, 6);
  }
  try {
    Template("{% for x in y %}");
    FAIL();
  } catch (const TemplateError& e) {
    EXPECT_EQ(e.kind, "TemplateSyntaxError");
    EXPECT_EQ(e.line, 1);
  }
  EXPECT_THROW(render("{{ x.y }}"), TemplateError);             // UndefinedError
  EXPECT_THROW(render("{{ [1].append(2) }}"), TemplateError);    // sandbox: lists are immutable
  EXPECT_THROW(render("{{ ''.__class__() }}"), TemplateError);   // sandbox: no dunders
}

TEST(ChatEngine, LimitsStopRunawayTemplates) {
  RenderOptions opt;
  opt.limits.max_steps = 1000;
  EXPECT_THROW(Template("{% for i in range(100) %}{% for j in range(100) %}{% endfor %}{% endfor %}").render(Value::dict(), opt),
               TemplateError);
  EXPECT_THROW(render("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"), TemplateError);
  opt.limits.max_output_bytes = 1000;
  EXPECT_THROW(Template("{% for i in range(1000) %}xxxxxxxxxx{% endfor %}").render(Value::dict(), opt), TemplateError);
  EXPECT_THROW(render("{{ range(1000000) }}"), TemplateError);
  // growth that would exhaust memory before any loop limit
  EXPECT_THROW(render("{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"),
               TemplateError);
  EXPECT_THROW(render("{{ 'x'|center(10**12) }}"), TemplateError);
  EXPECT_THROW(render("{{ ('x' * 1000)|replace('', 'yyyyyyyyyy' * 10000) }}"), TemplateError);
  EXPECT_THROW(render("{{ 'ab' * 9223372036854775807 }}"), TemplateError);
  EXPECT_THROW(render("{{ 9223372036854775807 + 1 }}"), TemplateError);  // Python has big ints; we refuse, never wrap
  EXPECT_THROW(render("{{ 2 ** 64 }}"), TemplateError);
  EXPECT_EQ(render("{{ (-1) ** 9223372036854775807 }} {{ 1 ** 10**18 }} {{ [1, 2, 3][::-9223372036854775807] }}"), "-1 1 [3]");
  // nesting: parser depth is bounded, deep values are freed without recursion
  EXPECT_THROW(Template("{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}"), TemplateError);
  std::string deep = "{% set ns = namespace(l=[]) %}{% for i in range(500) %}{% for j in range(400) %}{% set ns.l = [ns.l] %}{% endfor %}{% endfor %}ok";
  EXPECT_EQ(render(deep.c_str()), "ok");
  EXPECT_THROW(render((deep + "{{ ns.l == ns.l }}").c_str()), qforge::InvalidArgument);
  EXPECT_THROW(render((deep + "{{ ns.l|tojson }}").c_str()), TemplateError);
}

TEST(ChatEngine, GenerationSpansAreCodePointOffsets) {
  Template t("{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
             "{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}");
  ChatRequest req = chat_request_from_json(json_loads(
      R"({"messages": [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "wörld"}]})"));
  ChatRendered r = apply_chat_template(t, req);
  EXPECT_EQ(r.text, "user: hélloassistant: wörld");  // trim_blocks ate the newlines after the tags
  ASSERT_EQ(r.generation.size(), 1u);
  EXPECT_EQ(r.generation[0].first, 22u);
  EXPECT_EQ(r.generation[0].second, 27u);
}

TEST(ChatEngine, ShipsLlama3Templates) {
  for (int minor : {1, 2, 3}) {
    ASSERT_NE(llama3_template(minor), nullptr);
    Template t(llama3_template(minor));
    ChatRequest req = chat_request_from_json(json_loads(R"({"messages": [{"role": "user", "content": "hi"}],
        "add_generation_prompt": true, "bos_token": "<|begin_of_text|>"})"));
    std::string s = apply_chat_template(t, req).text;
    EXPECT_NE(s.find("<|start_header_id|>assistant<|end_header_id|>\n\n"), std::string::npos);
    std::string official = slurp(chat_dir() / "templates" /
                                 (minor == 1 ? "meta-llama-Llama-3.1-8B-Instruct.jinja"
                                  : minor == 2 ? "meta-llama-Llama-3.2-3B-Instruct.jinja"
                                               : "meta-llama-Llama-3.3-70B-Instruct.jinja"));
    EXPECT_EQ(std::string(llama3_template(minor)), official);
  }
  EXPECT_EQ(llama3_template(7), nullptr);
}

TEST(ChatEngine, BatchFromJsonEqualsSingleRenders) {
  Value requests = json_loads(slurp(chat_dir() / "conversations.json"));
  Template t(llama3_template(2));
  ChatRequest shared = chat_request_from_json(*requests.get("tool_result"));
  List convs;
  std::string json = " [ ";
  for (const char* c : {"tool_result", "unicode", "multi_turn", "nested_json_args"}) {
    convs.push_back(*requests.get(c)->get("messages"));
    json += (convs.size() > 1 ? " , " : "") + json_dumps(convs.back());
  }
  json += " ] ";
  for (int threads : {1, 3}) {
    auto a = apply_chat_template_batch(t, shared, convs, {}, threads);
    auto b = apply_chat_template_batch_json(t, shared, json, {}, threads);
    ASSERT_EQ(a.size(), convs.size());
    ASSERT_EQ(b.size(), convs.size());
    for (size_t i = 0; i < convs.size(); ++i) {
      ChatRequest one = shared;
      one.messages = convs[i];
      EXPECT_EQ(a[i].text, apply_chat_template(t, one).text);
      EXPECT_EQ(b[i].text, a[i].text);
    }
  }
  EXPECT_TRUE(apply_chat_template_batch_json(t, shared, "[]").empty());
  for (const char* bad : {"", "[", "[[{\"role\": \"user\"}]", "[[]] x", "{}", "[[{\"a\": \"]\"]"})
    EXPECT_THROW(apply_chat_template_batch_json(t, shared, bad), qforge::InvalidArgument) << bad;
}

TEST(ChatEngine, BatchFromJsonSplitsOnlyOutsideStrings) {
  // brackets, commas and quotes inside strings, after runs of backslashes of both parities
  Template t("{% for m in messages %}{{ m.content }}|{% endfor %}");
  const char* contents[] = {R"(],[)", R"(a\\)", R"(\\\"],[\"\\)", R"(\\\\)", R"(\")", "", R"(x\"y\\\\\"z)"};
  std::string json = "[";
  std::vector<std::string> expected;
  for (const char* c : contents) {
    json += std::string(json.size() > 1 ? "," : "") + R"([{"role":"user","content":")" + c + R"("}])";
    expected.push_back(json_loads(std::string("\"") + c + "\"").str() + "|");
  }
  json += "]";
  for (int threads : {1, 2}) {
    auto out = apply_chat_template_batch_json(t, ChatRequest{}, json, {}, threads);
    ASSERT_EQ(out.size(), expected.size());
    for (size_t i = 0; i < out.size(); ++i) EXPECT_EQ(out[i].text, expected[i]) << i;
  }
  const std::pair<std::string, std::string> errors[] = {
      {R"([[{"content": "a\"}]])", "invalid JSON: unterminated conversations list"},
      {R"([[{"content": "a\\"}]] x)", "invalid JSON: extra data after the conversations list at offset 23"},
      {R"([[{"content": "\\\"], [{}]]")", "invalid JSON: unterminated conversations list"},
      {"{}", "conversations must be a JSON list of message lists"},
  };
  for (auto& [text, error] : errors) {
    try {
      apply_chat_template_batch_json(t, ChatRequest{}, text);
      ADD_FAILURE() << text;
    } catch (const qforge::InvalidArgument& e) {
      EXPECT_EQ(std::string(e.what()), error) << text;
    }
  }
}

TEST(ChatEngine, BatchFromJsonNamesTheConversationThatFails) {
  // each conversation is parsed by the thread that renders it: the error names its index
  Template t("{% for m in messages %}{{ m.role }}: {{ m.content }}{% endfor %}");
  std::string json = "[";
  for (int i = 0; i < 40; ++i)
    json += std::string(i ? ", " : "") + (i == 7 ? R"([{"role": "user", "content": tru}])"
                                                 : R"([{"role": "user", "content": "x"}])");
  json += "]";
  try {
    apply_chat_template_batch_json(t, ChatRequest{}, json, {}, 3);
    FAIL();
  } catch (const qforge::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("conversation 7: invalid JSON"), std::string::npos) << e.what();
  }
}
