// C ABI of the chat capability: argument translation only.
#include <string>

#include "guard.hpp"
#include "qforge/chat/apply.hpp"
#include "qforge/chat/template.hpp"
#include "qforge/chat/tool_calls.hpp"

struct qf_chat_template {
  qforge::chat::Template tmpl;
  qforge::chat::RenderLimits limits;
};
struct qf_chat_buffer {
  std::string data;
};
struct qf_chat_tool_stream {
  qforge::chat::ToolCallStream stream;
};

namespace {
constexpr int kMaxJsonIndent = 64;  // qf_chat_json_dumps: spaces per level (the output grows with it)
std::string_view view(const char* p, size_t n) { return p ? std::string_view(p, n) : std::string_view(); }
qf_chat_buffer* make_buffer(std::string s) { return new qf_chat_buffer{std::move(s)}; }
// The tool schemas of a parse: None when not given, else a JSON list.
qforge::chat::Value tools_schemas(const char* json, size_t len, const char* where) {
  if (!json) return qforge::chat::Value();
  qforge::chat::Value tools = qforge::chat::json_loads(view(json, len));
  QF_CHECK(tools.is_list() || tools.is_none(), where, ": tools must be a JSON list of tool schemas");
  return tools;
}
qforge::chat::RenderOptions options(const qf_chat_template* tmpl, int64_t now) {
  qforge::chat::RenderOptions o;
  o.now = now;
  o.limits = tmpl->limits;
  return o;
}
}  // namespace

extern "C" {

int qf_chat_template_compile(const char* source, size_t source_len, qf_chat_template** out) {
  return qforge::capi::guard([&] {
    QF_CHECK(out, "qf_chat_template_compile: out is NULL");
    QF_CHECK(source || source_len == 0, "qf_chat_template_compile: source is NULL");
    *out = nullptr;
    *out = new qf_chat_template{qforge::chat::Template(view(source, source_len)), {}};
  });
}

void qf_chat_template_free(qf_chat_template* tmpl) { delete tmpl; }

int qf_chat_template_set_limits(qf_chat_template* tmpl, int64_t max_steps, int64_t max_output_bytes, int max_call_depth,
                                int64_t max_stack_bytes) {
  return qforge::capi::guard([&] {
    QF_CHECK(tmpl, "qf_chat_template_set_limits: tmpl is NULL");
    QF_CHECK(max_steps >= 0 && max_output_bytes >= 0 && max_call_depth >= 0 && max_stack_bytes >= 0,
             "qf_chat_template_set_limits: limits must be positive (0: unchanged), got max_steps=", max_steps,
             " max_output_bytes=", max_output_bytes, " max_call_depth=", max_call_depth, " max_stack_bytes=", max_stack_bytes);
    auto& l = tmpl->limits;
    if (max_steps) l.max_steps = max_steps;
    if (max_output_bytes) l.max_output_bytes = static_cast<size_t>(max_output_bytes);
    if (max_call_depth) l.max_call_depth = max_call_depth;
    if (max_stack_bytes) l.max_stack_bytes = static_cast<size_t>(max_stack_bytes);
  });
}

int qf_chat_apply_template(const qf_chat_template* tmpl, const char* request_json, size_t request_len, int64_t now,
                           qf_chat_buffer** text, int64_t* spans, size_t spans_cap, size_t* n_spans) {
  return qforge::capi::guard([&] {
    QF_CHECK(tmpl && text, "qf_chat_apply_template: tmpl and text must not be NULL");
    *text = nullptr;
    auto req = qforge::chat::chat_request_from_json(qforge::chat::json_loads(view(request_json, request_len)));
    auto r = qforge::chat::apply_chat_template(tmpl->tmpl, req, options(tmpl, now));
    if (spans || n_spans) {
      QF_CHECK(n_spans, "qf_chat_apply_template: n_spans must be given with spans");
      *n_spans = r.generation.size();
      for (size_t i = 0; i < r.generation.size() && spans && i < spans_cap; ++i) {
        spans[2 * i] = static_cast<int64_t>(r.generation[i].first);
        spans[2 * i + 1] = static_cast<int64_t>(r.generation[i].second);
      }
    }
    *text = make_buffer(std::move(r.text));
  });
}

int qf_chat_apply_batch(const qf_chat_template* tmpl, const char* shared_json, size_t shared_len,
                        const char* conversations_json, size_t conversations_len, int64_t now, int threads,
                        qf_chat_buffer** texts, int64_t* offsets, size_t offsets_len, int code_points) {
  return qforge::capi::guard([&] {
    QF_CHECK(tmpl && texts && offsets, "qf_chat_apply_batch: tmpl, texts and offsets must not be NULL");
    *texts = nullptr;
    qforge::chat::Value shared = qforge::chat::json_loads(view(shared_json, shared_len));
    QF_CHECK(shared.is_dict(), "qf_chat_apply_batch: shared request must be a JSON object");
    if (!shared.get("messages")) shared.set("messages", qforge::chat::Value(qforge::chat::List{}));
    auto req = qforge::chat::chat_request_from_json(shared);
    auto results = qforge::chat::apply_chat_template_batch_json(tmpl->tmpl, req, view(conversations_json, conversations_len),
                                                                options(tmpl, now), threads);
    QF_CHECK(offsets_len == results.size() + 1, "qf_chat_apply_batch: offsets needs ", results.size() + 1,
             " entries, got ", offsets_len);
    size_t total = 0;
    for (auto& r : results) total += r.text.size();
    std::string all;
    all.reserve(total);
    int64_t cps = 0;
    for (size_t i = 0; i < results.size(); ++i) {
      offsets[i] = code_points ? cps : static_cast<int64_t>(all.size());
      all += results[i].text;
      if (code_points) cps += static_cast<int64_t>(qforge::chat::utf8_length(results[i].text));
      std::string().swap(results[i].text);  // release as we go
    }
    offsets[results.size()] = code_points ? cps : static_cast<int64_t>(all.size());
    *texts = make_buffer(std::move(all));
  });
}

int qf_chat_template_render(const qf_chat_template* tmpl, const char* context_json, size_t context_len, int64_t now,
                            qf_chat_buffer** text) {
  return qforge::capi::guard([&] {
    QF_CHECK(tmpl && text, "qf_chat_template_render: tmpl and text must not be NULL");
    *text = nullptr;
    auto ctx = qforge::chat::json_loads(view(context_json, context_len));
    *text = make_buffer(tmpl->tmpl.render(ctx, options(tmpl, now)));
  });
}

int qf_chat_parse_tool_calls(const char* text, size_t text_len, const char* format, qf_chat_buffer** result) {
  return qf_chat_parse_tool_calls_for_tools(text, text_len, format, nullptr, 0, result);
}

int qf_chat_parse_tool_calls_for_tools(const char* text, size_t text_len, const char* format, const char* tools_json,
                                       size_t tools_len, qf_chat_buffer** result) {
  return qforge::capi::guard([&] {
    QF_CHECK(result, "qf_chat_parse_tool_calls: result is NULL");
    *result = nullptr;
    auto fmt = qforge::chat::tool_call_format(format ? format : "auto");
    qforge::chat::Value tools = tools_schemas(tools_json, tools_len, "qf_chat_parse_tool_calls_for_tools");
    auto parsed = qforge::chat::parse_tool_calls(view(text, text_len), fmt, tools.is_none() ? nullptr : &tools);
    *result = make_buffer(qforge::chat::json_dumps(parsed.to_json()));
  });
}

int qf_chat_tool_call_formats(qf_chat_buffer** result) {
  return qforge::capi::guard([&] {
    QF_CHECK(result, "qf_chat_tool_call_formats: result is NULL");
    *result = nullptr;
    qforge::chat::Value names(qforge::chat::List{});
    for (auto& n : qforge::chat::tool_call_format_names()) names.push_back(qforge::chat::Value(n));
    *result = make_buffer(qforge::chat::json_dumps(names));
  });
}

int qf_chat_stop_tokens(qf_chat_buffer** result) {
  return qforge::capi::guard([&] {
    QF_CHECK(result, "qf_chat_stop_tokens: result is NULL");
    *result = nullptr;
    qforge::chat::Value tokens(qforge::chat::List{});
    for (auto& t : qforge::chat::stop_tokens()) tokens.push_back(qforge::chat::Value(t));
    *result = make_buffer(qforge::chat::json_dumps(tokens));
  });
}

int qf_chat_detect_tool_call_format(const char* source, size_t source_len, qf_chat_buffer** name) {
  return qforge::capi::guard([&] {
    QF_CHECK(name, "qf_chat_detect_tool_call_format: name is NULL");
    *name = nullptr;
    QF_CHECK(source || source_len == 0, "qf_chat_detect_tool_call_format: source is NULL");
    auto f = qforge::chat::detect_tool_call_format(view(source, source_len));
    *name = make_buffer(qforge::chat::tool_call_format_name(f));
  });
}

int qf_chat_tool_stream_new(const char* format, const char* tools_json, size_t tools_len, qf_chat_tool_stream** out) {
  return qforge::capi::guard([&] {
    QF_CHECK(out, "qf_chat_tool_stream_new: out is NULL");
    *out = nullptr;
    auto fmt = qforge::chat::tool_call_format(format ? format : "auto");
    *out = new qf_chat_tool_stream{
        qforge::chat::ToolCallStream(fmt, tools_schemas(tools_json, tools_len, "qf_chat_tool_stream_new"))};
  });
}

int qf_chat_tool_stream_feed(qf_chat_tool_stream* stream, const char* chunk, size_t chunk_len, qf_chat_buffer** result) {
  return qforge::capi::guard([&] {
    QF_CHECK(stream && result, "qf_chat_tool_stream_feed: stream and result must not be NULL");
    *result = nullptr;
    QF_CHECK(chunk || chunk_len == 0, "qf_chat_tool_stream_feed: chunk is NULL");
    *result = make_buffer(qforge::chat::json_dumps(stream->stream.feed(view(chunk, chunk_len)).to_json()));
  });
}

int qf_chat_tool_stream_finish(const qf_chat_tool_stream* stream, qf_chat_buffer** result) {
  return qforge::capi::guard([&] {
    QF_CHECK(stream && result, "qf_chat_tool_stream_finish: stream and result must not be NULL");
    *result = nullptr;
    *result = make_buffer(qforge::chat::json_dumps(stream->stream.finish().to_json()));
  });
}

void qf_chat_tool_stream_free(qf_chat_tool_stream* stream) { delete stream; }

int qf_chat_json_dumps(const char* json, size_t json_len, int ensure_ascii, int indent, int sort_keys,
                       qf_chat_buffer** result) {
  return qforge::capi::guard([&] {
    QF_CHECK(result, "qf_chat_json_dumps: result is NULL");
    *result = nullptr;
    QF_CHECK(indent <= kMaxJsonIndent, "qf_chat_json_dumps: indent ", indent, " is more than ", kMaxJsonIndent);
    qforge::chat::DumpOptions o;
    std::string ind(indent > 0 ? static_cast<size_t>(indent) : 0, ' ');
    o.ensure_ascii = ensure_ascii != 0;
    o.indent = indent >= 0 ? &ind : nullptr;
    o.sort_keys = sort_keys != 0;
    *result = make_buffer(qforge::chat::json_dumps(qforge::chat::json_loads(view(json, json_len)), o));
  });
}

const char* qf_chat_llama3_template(int minor) { return qforge::chat::llama3_template(minor); }

const char* qf_chat_buffer_data(const qf_chat_buffer* buf, size_t* len) {
  if (len) *len = buf ? buf->data.size() : 0;
  return buf ? buf->data.c_str() : nullptr;
}

void qf_chat_buffer_free(qf_chat_buffer* buf) { delete buf; }

}  // extern "C"
