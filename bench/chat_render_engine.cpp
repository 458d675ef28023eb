// The C++ side of bench/chat_render.py: what a C++ program pays to render a
// training set through qforge's chat engine. Reads the conversations once
// (not timed), renders all of them once to warm up (the heap, the caches),
// then `repeats` timed times with apply_chat_template_batch on one thread,
// and reports every run and the best. The outputs go to the results file, so
// the Python side checks every byte against jinja2.
//
//   chat_render_engine TEMPLATE REQUESTS.json RESULTS.json [REPEATS]
//
// REQUESTS.json: {"shared": {<a chat request without messages>},
//                 "conversations": [[<message>, ...], ...]}
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "qforge/chat/apply.hpp"
#include "qforge/error.hpp"

using namespace qforge::chat;

static std::string read_file(const char* path) {
  std::ifstream f(path, std::ios::binary);
  QF_CHECK(f, "cannot read ", path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s TEMPLATE REQUESTS.json RESULTS.json [REPEATS]\n", argv[0]);
    return 2;
  }
  try {
    Template tmpl(read_file(argv[1]));
    Value requests = json_loads(read_file(argv[2]));
    const Value* shared_json = requests.get("shared");
    const Value* conversations = requests.get("conversations");
    QF_CHECK(shared_json && shared_json->is_dict() && conversations && conversations->is_list(),
             argv[2], ": expected {\"shared\": {...}, \"conversations\": [...]}");
    Dict shared_fields = shared_json->dict_ref();
    shared_fields.set(Value("messages"), Value(List{}));
    ChatRequest shared = chat_request_from_json(Value(std::move(shared_fields)));
    int repeats = argc > 4 ? std::max(1, std::atoi(argv[4])) : 3;

    std::vector<ChatRendered> outputs = apply_chat_template_batch(tmpl, shared, conversations->list(), {}, 1);
    List runs;
    double best = 1e30;
    for (int r = 0; r < repeats; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      outputs = apply_chat_template_batch(tmpl, shared, conversations->list(), {}, 1);
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      runs.push_back(Value(s));
      best = std::min(best, s);
    }
    size_t n = conversations->list().size(), bytes = 0;
    List texts;
    texts.reserve(n);
    for (auto& o : outputs) {
      bytes += o.text.size();
      texts.push_back(Value(std::move(o.text)));
    }
    Value results = Value::dict();
    results.set("conversations", Value(static_cast<int64_t>(n)));
    results.set("threads", Value(1));
    results.set("seconds_best", Value(best));
    results.set("seconds_runs", Value(std::move(runs)));
    results.set("us_per_conversation", Value(n ? best / static_cast<double>(n) * 1e6 : 0.0));
    results.set("rendered_bytes", Value(static_cast<int64_t>(bytes)));
    results.set("outputs", Value(std::move(texts)));
    std::ofstream out(argv[3], std::ios::binary);
    out << json_dumps(results);
    QF_CHECK(out.good(), "cannot write ", argv[3]);
    std::printf("%zu conversations, best of %d: %.2f us each\n", n, repeats, n ? best / static_cast<double>(n) * 1e6 : 0.0);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "chat_render_engine: %s\n", e.what());
    return 1;
  }
}
