// The chat engine's bounds: syntax-tree depth (chains included), the render
// budgets of RenderLimits, 64-bit integer arguments of filters and methods,
// and reference cycles through namespaces. Expected outputs are Python's
// (jinja2 3.1.6 as transformers configures it); tests/python/test_chat_hostile.py
// runs the same inputs against live jinja2 in a memory-limited subprocess.
#include <gtest/gtest.h>

#include <chrono>
#include <string>

#include "qforge/chat/template.hpp"

using namespace qforge::chat;

namespace {

std::string repeat(const std::string& s, int n) {
  std::string out;
  for (int i = 0; i < n; ++i) out += s;
  return out;
}

std::string render(const std::string& src, const Value& ctx = Value::dict(), const RenderOptions& opt = {}) {
  return Template(src).render(ctx, opt);
}

// The kind of the TemplateError that compiling and rendering src raises, with its message.
std::pair<std::string, std::string> error_of(const std::string& src, const RenderOptions& opt = {}) {
  try {
    Template(src).render(Value::dict(), opt);
  } catch (const TemplateError& e) {
    return {e.kind, e.message};
  }
  return {"no error", ""};
}

}  // namespace

TEST(ChatLimits, LongChainsAndDeepNestingAreASyntaxErrorNotACrash) {
  const int n = 15000;  // the 30 KB template, and the same length for every other chain
  std::string plus = "1";
  for (int i = 1; i < n; ++i) plus += "+1";
  const std::string chains[] = {
      "{{ " + plus + " }}",
      "{% if false %}" + repeat("{% elif false %}", n) + "{% endif %}",
      "{{ x" + repeat(".a", n) + " }}",
      "{{ x" + repeat("[0]", n) + " }}",
      "{{ x" + repeat("|trim", n) + " }}",
      "{{ x" + repeat("()", n) + " }}",
      "{{ " + repeat("not ", n) + "1 }}",
      "{{ " + repeat("- ", n) + "1 }}",
      "{{ " + repeat("[", n) + repeat("]", n) + " }}",
      "{{ " + repeat("(", n) + "1" + repeat(")", n) + " }}",
      "{{ " + repeat("x and ", n) + "x }}",
      "{{ " + repeat("1 if x else ", n) + "2 }}",
      "{{ " + repeat("x ~ (", n) + "1" + repeat(")", n) + " }}",
      repeat("{% for a in x %}", n) + repeat("{% endfor %}", n),
  };
  for (auto& src : chains) {
    try {
      Template t(src);
      ADD_FAILURE() << "compiled: " << src.substr(0, 40);
    } catch (const TemplateError& e) {
      EXPECT_EQ(e.kind, "TemplateSyntaxError") << src.substr(0, 40);
      EXPECT_NE(e.message.find("template nested deeper than 256 levels"), std::string::npos) << e.message;
    }
  }
  // within the limit: rendered
  std::string plus200 = "1";
  for (int i = 1; i < 200; ++i) plus200 += "+1";
  EXPECT_EQ(render("{{ " + plus200 + " }}"), "200");
  EXPECT_EQ(render("{{ ' a '" + repeat("|trim", 200) + " }}"), "a");
  EXPECT_EQ(render("{% if false %}" + repeat("{% elif false %}", 200) + "{% else %}e{% endif %}"), "e");
  EXPECT_EQ(render("{{ " + repeat("not ", 100) + "1 }}"), "True");
  EXPECT_EQ(render("{{ " + repeat("[", 100) + repeat("]", 100) + "|length }}"), "1");
}

TEST(ChatLimits, DeepRecursionStopsAtTheStackOrDepthLimit) {
  // 200 nested calls whose body is 80 brackets deep: more stack than 2 MiB
  std::string src = "{% macro m(n) %}{% if n > 0 %}{{ " + repeat("[", 80) + "m(n - 1)" + repeat("]", 80) +
                    " }}{% endif %}{% endmacro %}{{ m(199)|length }}";
  auto [kind, message] = error_of(src);
  EXPECT_EQ(kind, "RecursionError");
  EXPECT_NE(message.find("max_stack_bytes (2097152"), std::string::npos) << message;
  RenderOptions opt;
  opt.limits.max_stack_bytes = size_t(1) << 30;
  opt.limits.max_call_depth = 150;
  std::tie(kind, message) = error_of(src, opt);
  EXPECT_EQ(kind, "RecursionError");
  EXPECT_NE(message.find("max_call_depth (150)"), std::string::npos) << message;
}

TEST(ChatLimits, StepsCountLoopsCallsAndItemsWalked) {
  RenderOptions opt;
  auto [kind, message] = error_of("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}");
  EXPECT_EQ(kind, "StepLimit");
  EXPECT_NE(message.find("max_steps (10000000"), std::string::npos) << message;
  // the range() call + its 1000 items + 1000 iterations + 1000 macro calls + 1000 filter calls = 4001 steps
  std::string calls = "{% macro f() %}{% endmacro %}{% for i in range(1000) %}{{ f() }}{{ 'a'|upper }}{% endfor %}";
  opt.limits.max_steps = 4000;
  EXPECT_EQ(error_of(calls, opt).first, "StepLimit");
  opt.limits.max_steps = 4001;
  EXPECT_EQ(render(calls, Value::dict(), opt), std::string(1000, 'A'));
  // a filter walking 100k items costs 100k steps; '' * huge costs none
  Value ctx = json_loads("{\"x\": [" + repeat("1,", 99999) + "1]}");
  opt.limits.max_steps = 50000;
  EXPECT_THROW(render("{{ x|sort|length }}", ctx, opt), TemplateError);
  EXPECT_EQ(render("{{ '' * 9223372036854775807 }}{{ [] * 9223372036854775807 }}", Value::dict(), opt), "[]");
}

TEST(ChatLimits, SizesAreCheckedBeforeAllocating) {
  const char* over[] = {
      "{{ 'x' * 9223372036854775807 }}", "{{ [1] * 9223372036854775807 }}", "{{ 'ab' * 40000000 }}",
      "{{ [0] * 5000000 }}", "{{ '%.2147483647f' % 1.0 }}", "{{ '%99999999999999999999999999s' % 'a' }}",
      "{{ 'x'|center(9223372036854775807) }}", "{{ 'x'|indent(9223372036854775807) }}",
      "{{ ('\\n' * 1000000)|indent(100) }}", "{{ 'x'|tojson(indent=9223372036854775807) }}",
      "{{ [1, 2, 3]|batch(9223372036854775807, 0)|list }}", "{{ 'x'.ljust(9223372036854775807) }}",
  };
  for (const char* src : over) {
    auto [kind, message] = error_of(src);
    EXPECT_EQ(kind, "OutputLimit") << src;
    EXPECT_NE(message.find("max_output_bytes (67108864"), std::string::npos) << message;
  }
  RenderOptions opt;
  opt.limits.max_output_bytes = 500000;
  EXPECT_EQ(error_of("{{ '%.1000000f' % 1.0 }}", opt).first, "OutputLimit");
}

TEST(ChatLimits, HugeIntegerArgumentsGivePythonsResult) {
  // each as Python/jinja2 3.1.6 renders it
  EXPECT_EQ(render("{{ 'abc'|truncate(9223372036854775807) }}"), "abc");
  EXPECT_EQ(render("{{ 'abcdefghijkl'|truncate(3, leeway=9223372036854775807) }}"), "abcdefghijkl");
  EXPECT_EQ(render("{{ 'abcdefghijkl'|truncate(5, True, '..', 0) }}|{{ 'ab cd ef gh'|truncate(8, leeway=0) }}"), "abc..|ab...");
  EXPECT_EQ(error_of("{{ 'abc'|truncate(-9223372036854775807) }}").first, "AssertionError");
  EXPECT_EQ(error_of("{{ 'abcdef'|truncate(5, leeway=-9223372036854775807) }}").first, "AssertionError");
  EXPECT_EQ(render("{{ [1, 2, 3]|batch(9223372036854775807)|list }}"), "[[1, 2, 3]]");
  EXPECT_EQ(render("{{ 1.5|round(9223372036854775807) }}|{{ 1.5|round(-9223372036854775807) }}|{{ -1.5|round(-400) }}"),
            "1.5|0.0|-0.0");
  EXPECT_EQ(error_of("{{ 1.5|round(9223372036854775807, 'ceil') }}").first, "OverflowError");
  EXPECT_EQ(render("{{ [1, 2, 3][-9223372036854775807:9223372036854775807:-1] }}"), "[]");
  EXPECT_EQ(render("{{ 'abc'[9223372036854775807:-9223372036854775807:-9223372036854775807] }}"), "c");
  EXPECT_EQ(render("{{ range(0, 9223372036854775807, 4611686018427387904)|list }}"), "[0, 4611686018427387904]");
  EXPECT_EQ(render("{{ 'a b'.split(' ', 9223372036854775807) }}"), "['a', 'b']");
}

TEST(ChatLimits, PercentFormatIsExactAtAnyWidth) {
  EXPECT_EQ(render("{{ '%600d' % 1 }}"), std::string(599, ' ') + "1");
  EXPECT_EQ(render("{{ '%-600d|' % -2 }}"), "-2" + std::string(598, ' ') + "|");
  EXPECT_EQ(render("{{ '%0600d' % 3 }}"), std::string(599, '0') + "3");
  EXPECT_EQ(render("{{ '%.600f' % 1.0 }}"), "1." + std::string(600, '0'));
  EXPECT_EQ(render("{{ ('%.1000000f' % 1.0)|length }}"), "1000002");
  EXPECT_EQ(render("{{ '%10s|%-10r|%.2s|%5.1s|%-3s|' % ('a', 'b', 'xyz', 'pq', 'éé') }}"),
            "         a|'b'       |xy|    p|éé |");
  EXPECT_EQ(render("{{ '%.3d|%5i|%u|%d|%d' % (7, -3, 4, 3.99, -3.99) }}"), "007|   -3|4|3|-3");
  EXPECT_EQ(render("{{ '%.3e|%G|%+.0f|%5.1f%%' % (12345.678, 1e-10, 2.5, 99.95) }}"), "1.235e+04|1E-10|+2|100.0%");
  EXPECT_EQ(render("{{ '%x|%#X|%#o|%#06x|%-5x|%+x|%.3x' % (-255, -255, 8, 255, 10, 5, 7) }}"), "-ff|-0XFF|0o10|0x00ff|a    |+5|007");
  EXPECT_EQ(render("{{ '%x' % (-9223372036854775807 - 1) }}|{{ '%c%c|%3c' % (65, 'é', 'x') }}"), "-8000000000000000|Aé|  x");
  EXPECT_EQ(error_of("{{ '%9999999999999999x' % 1 }}").first, "OutputLimit");
  // str.format's spec as Python's format()
  EXPECT_EQ(render("{{ '{:>10}|{:*^9.2f}|{:=+8d}|{:08.3f}|{:.3}|{:.3}|{!r:>6}|{:é<3}'.format(1, 3.14159, -5, -3.14159, "
                   "1.23456, 1.0, 'a', 'x') }}"),
            "         1|**3.14***|-      5|-003.142|1.23|1.0|   'a'|xéé");
  EXPECT_EQ(render("{{ ('{:>600}'.format(1))|length }}"), "600");
  EXPECT_EQ(render("{{ '{:#X}|{:#b}|{:#010x}|{:c}|{:,}|{:_x}|{:,.2f}'.format(-255, 5, 255, 233, -1234567, 4294967295, 1234567.891) }}"),
            "-0XFF|0b101|0x000000ff|é|-1,234,567|ffff_ffff|1,234,567.89");
  EXPECT_EQ(error_of("{{ '{:>9223372036854775807}'.format(1) }}").first, "OutputLimit");
  EXPECT_EQ(error_of("{{ '{:d}'.format(1.5) }}").first, "ValueError");
}

TEST(ChatLimits, WhatPythonMakesABigIntIsAnOverflowError) {
  const char* srcs[] = {"{{ 1e19|int }}",        "{{ -1e19|int }}",          "{{ (-9223372036854775807 - 1)|abs }}",
                        "{{ '%d' % 1e300 }}",    "{{ '1e30'|int }}",         "{{ '99999999999999999999'|int }}",
                        "{{ 3 ** 41 }}",         "{{ -(-9223372036854775807 - 1) }}"};
  for (const char* src : srcs) {
    auto [kind, message] = error_of(src);
    EXPECT_EQ(kind, "OverflowError") << src;
    EXPECT_NE(message.find("64 bits"), std::string::npos) << src << ": " << message;
  }
  EXPECT_EQ(render("{{ 9.2e18|int }}|{{ -9223372036854775807|abs }}|{{ 'nan'|float|int }}|{{ ' -7.9 '|int }}"),
            "9200000000000000000|9223372036854775807|0|-7");
}

TEST(ChatLimits, UniqueIsHashed) {
  EXPECT_EQ(render("{{ [1, 1.0, True, 2, 2.0, 'a', 'A', (1, 2), (1.0, 2), none, none, -0.0, 0]|unique|list }}"),
            "[1, 2, 'a', (1, 2), None, -0.0]");
  EXPECT_EQ(render("{{ ['a', 'A', 'b']|unique(case_sensitive=true)|list }}"), "['a', 'A', 'b']");
  EXPECT_EQ(render("{{ [{'k': 1}, {'k': 1.0}, {'k': 2}]|unique(attribute='k')|list }}"), "[{'k': 1}, {'k': 2}]");
  EXPECT_EQ(error_of("{{ [[1], [1]]|unique|list }}").first, "TypeError");
  // 1M items with 100k distinct: the pairwise version took minutes
  std::string items;
  for (int i = 0; i < 1000000; ++i) items += std::to_string(i % 100003) + ",";
  items.pop_back();
  Value ctx = json_loads("{\"x\": [" + items + "]}");
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(render("{{ x|unique|list|length }}", ctx), "100003");
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 10.0);
}

TEST(ChatLimits, NamespaceCyclesAreFreedWhenTheRenderEnds) {
  // the context's string is referenced by the dict alone once every value the
  // render made is gone; a leaked namespace would still hold it
  Value ctx = json_loads("{\"x\": \"" + std::string(1000, 'y') + "\"}");
  const char* srcs[] = {
      "{% set ns = namespace(v=x) %}{% set ns.me = ns %}{{ ns.me.me.v|length }}",
      "{% set ns = namespace(v=x) %}{% set ns.l = [ns, [ns]] %}{{ ns.l[1][0].v|length }}",
      "{% set ns = namespace(v=x) %}{% for i in [ns] %}{% set ns.loop = loop %}{% endfor %}{{ ns.loop.length }}",
      "{% for i in [x] %}{{ loop.changed(loop) }}{% endfor %}",
      "{% for i in range(1000) %}{% set ns = namespace(v=x) %}{% set ns.me = ns %}{% endfor %}done",
  };
  for (const char* src : srcs) {
    render(src, ctx);
    EXPECT_TRUE(ctx.get("x")->is_unique()) << src;
  }
  // also when the render fails
  EXPECT_THROW(render("{% set ns = namespace(v=x) %}{% set ns.me = ns %}{{ raise_exception('no') }}", ctx), TemplateError);
  EXPECT_TRUE(ctx.get("x")->is_unique());
}

TEST(ChatLimits, BigJsonObjectsParseInLinearTimeAndKeepPythonsKeyOrder) {
  // past 16 keys repeats are found through an index: same result as the scan
  std::string json = "{";
  for (int i = 0; i < 40; ++i) json += "\"k" + std::to_string(i) + "\": " + std::to_string(i) + ", ";
  json += "\"k3\": 100, \"k30\": 300, \"new\": 1}";
  Value d = json_loads(json);
  ASSERT_EQ(d.dict_ref().items.size(), 41u);
  EXPECT_EQ(d.dict_ref().items[3].first.str(), "k3");
  EXPECT_EQ(d.get("k3")->as_int(), 100);
  EXPECT_EQ(d.get("k30")->as_int(), 300);
  EXPECT_EQ(d.dict_ref().items.back().first.str(), "new");
  std::string big = "{";
  for (int i = 0; i < 200000; ++i) big += "\"" + std::to_string(i) + "\": " + std::to_string(i) + ",";
  big.back() = '}';
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(json_loads(big).dict_ref().items.size(), 200000u);  // the scan took minutes
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 10.0);
}

TEST(ChatLimits, WorkOnBigStringsIsChargedBySize) {
  RenderOptions opt;
  opt.limits.max_steps = 100000;
  // 1 MB read 16384 steps a time: the 7th scan is past 100k steps
  std::string src = "{% set s = 'x' * 1000000 %}{% for i in range(10) %}{% if 'y' in s %}{% endif %}{% endfor %}";
  EXPECT_EQ(error_of(src, opt).first, "StepLimit");
  src = "{% set s = 'x' * 1000000 %}{% for i in range(5) %}{% if 'y' in s %}{% endif %}{% endfor %}ok";
  EXPECT_EQ(render(src, Value::dict(), opt), "ok");
}
