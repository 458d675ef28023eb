// apply_chat_template with transformers' semantics (render_jinja_template in
// transformers/utils/chat_template_utils.py): reasoning-field aliasing,
// continue_final_message, generation spans.
#pragma once
#include "qforge/export.hpp"
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "qforge/chat/template.hpp"
#include "qforge/chat/value.hpp"

namespace qforge::chat {

struct QFORGE_API ChatRequest {
  Value messages;                       // list of dicts
  Value tools;                          // list of JSON schemas, or None
  Value documents;                      // list of dicts, or None
  bool add_generation_prompt = false;
  std::string continue_final_message;   // "" = off; else the field to continue ("content")
  Value kwargs = Value::dict();         // extra template variables (bos_token, date_string, ...)
};

struct QFORGE_API ChatRendered {
  std::string text;
  // {% generation %} blocks as [start, end) code point offsets (Python indices)
  // into the text as the template rendered it, before a continue_final_message cut.
  std::vector<std::pair<size_t, size_t>> generation;
};

// Throws TemplateError for template failures and InvalidArgument for bad
// requests (messages that are not dicts, continue_final_message problems),
// with transformers' messages.
QFORGE_API ChatRendered apply_chat_template(const Template& tmpl, const ChatRequest& req, const RenderOptions& opt = {});

// The most threads a batch renders on; more are asked for in vain.
inline constexpr int kMaxBatchThreads = 256;

// Many conversations sharing tools, documents and kwargs (a training set):
// conversations[i] is a list of messages rendered with `shared`'s other
// fields. Runs on `threads` threads (<= 0: hardware concurrency; at most
// kMaxBatchThreads and one per conversation); threads the system refuses to
// create (std::system_error: RLIMIT_NPROC, no memory for a stack) are not an
// error, the calling thread does their share. Shared values' tojson is
// computed once per thread. Results in input order; the first failure is
// rethrown (naming the conversation's index).
QFORGE_API std::vector<ChatRendered> apply_chat_template_batch(const Template& tmpl, const ChatRequest& shared,
                                                    const List& conversations, const RenderOptions& opt = {},
                                                    int threads = 1);

// The same with the conversations as one JSON list (each element parsed by
// the thread that renders it).
QFORGE_API std::vector<ChatRendered> apply_chat_template_batch_json(const Template& tmpl, const ChatRequest& shared,
                                                         std::string_view conversations_json,
                                                         const RenderOptions& opt = {}, int threads = 1);

// A request from one JSON object: {"messages": [...], "tools": ..., "documents": ...,
// "add_generation_prompt": bool, "continue_final_message": bool|str, <any other key>: kwarg}.
QFORGE_API ChatRequest chat_request_from_json(const Value& obj);

// The official Llama 3.1 / 3.2 / 3.3 chat templates (for tokenizers that lack one).
QFORGE_API const char* llama3_template(int minor);  // 1, 2 or 3; nullptr otherwise

}  // namespace qforge::chat
