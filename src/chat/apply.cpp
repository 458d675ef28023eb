// apply_chat_template, mirroring transformers' render_jinja_template.
#include "qforge/chat/apply.hpp"

#include <algorithm>
#include <cstring>
#include <exception>
#include <system_error>
#include <thread>
#include <utility>

#include "jinja_rt.hpp"

#include "qforge/error.hpp"

namespace qforge::chat {

namespace {

const char* const kReasoningFields[] = {"reasoning_content", "thinking", "reasoning"};
const char* const kContinueTag = "CONTINUE_FINAL_MESSAGE_TAG ";

bool is_reasoning_field(const std::string& f) {
  size_t n = f.size();
  if (n != 8 && n != 9 && n != 17) return false;  // thinking, reasoning, reasoning_content
  for (auto* r : kReasoningFields)
    if (f == r) return true;
  return false;
}

std::string_view strip_ws(std::string_view s) { return py_strip(s); }

bool has_reasoning(const Value& msg) {
  for (auto& kv : msg.dict_ref().items)
    if (kv.first.is_string() && is_reasoning_field(kv.first.str()) && !kv.second.is_none()) return true;
  return false;
}

// {"thinking": r, **message, "reasoning_content": r} when any reasoning field is set
Value alias_reasoning(const Value& msg) {
  if (!has_reasoning(msg)) return msg;
  const Value* reasoning = nullptr;
  for (auto* f : kReasoningFields) {
    const Value* v = msg.get(f);
    if (v && !v->is_none()) {
      reasoning = v;
      break;
    }
  }
  Dict d;
  d.set(Value("thinking"), *reasoning);
  for (auto& kv : msg.dict_ref().items) d.set(kv.first, kv.second);
  d.set(Value("reasoning_content"), *reasoning);
  return Value(std::move(d));
}

}  // namespace

ChatRendered apply_chat_template(const Template& tmpl, const ChatRequest& req, const RenderOptions& opt) {
  QF_CHECK(req.messages.is_list() || req.messages.is_tuple(), "messages must be a list of dicts, got ", req.messages.type_name());
  bool cont = !req.continue_final_message.empty();
  bool as_given = req.messages.is_list() && !cont;  // the template gets the caller's list itself
  for (auto& m : req.messages.list()) {
    if (!m.is_dict())
      throw InvalidArgument("Chat messages should be dicts, dataclasses or pydantic models, but got " + py_repr(m) + ".");
    as_given = as_given && !has_reasoning(m);
  }
  List chat;
  if (!as_given) {
    chat.reserve(req.messages.list().size());
    for (auto& m : req.messages.list()) chat.push_back(alias_reasoning(m));
  }
  std::string final_message;
  if (cont) {
    QF_CHECK(!chat.empty(), "continue_final_message is set but the conversation is empty!");
    const std::string& field = req.continue_final_message;
    const Value* fm = chat.back().get(field);
    if (!fm || fm->is_none())
      throw InvalidArgument("continue_final_message is set but the final message has no \"" + field + "\" to continue!");
    std::vector<std::string> fields{field};
    if (is_reasoning_field(field)) {
      fields.clear();
      for (auto* f : kReasoningFields) {
        const Value* v = chat.back().get(f);
        if (v && py_equal(*v, *fm)) fields.emplace_back(f);
      }
    }
    bool any = false;
    for (auto& f : fields) any = any || tmpl.source().find(f) != std::string::npos;
    if (!any)
      throw InvalidArgument("continue_final_message is set to \"" + field + "\" but this is not an accepted field in the chat_template");
    Value last(Dict(chat.back().dict_ref()));
    if (fm->is_sequence()) {
      List blocks = fm->list();
      bool found = false;
      for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) {
        if (!it->is_dict()) continue;
        const Value* text = it->get("text");
        if (!text) continue;
        final_message = py_str(*text);
        Value block(Dict(it->dict_ref()));
        block.set("text", Value(final_message + kContinueTag));
        *it = block;
        found = true;
        break;
      }
      if (!found) throw InvalidArgument("continue_final_message is set but we could not find any text to continue in the final message!");
      last.set(field, Value(std::move(blocks), fm->kind()));
    } else {
      QF_CHECK(fm->is_string(), "continue_final_message: the final message's \"", field, "\" must be a string or a list of parts");
      final_message = fm->str();
      for (auto& f : fields) last.set(f, Value(last.get(f)->str() + kContinueTag));
    }
    chat.back() = std::move(last);
  }

  static const Value* const keys =
      process_values({Value("messages"), Value("tools"), Value("documents"), Value("add_generation_prompt")});
  Dict vars;
  vars.items.reserve(4 + req.kwargs.dict_ref().items.size());
  vars.items.emplace_back(keys[0], as_given ? req.messages : Value(std::move(chat)));
  vars.items.emplace_back(keys[1], req.tools);
  vars.items.emplace_back(keys[2], req.documents);
  vars.items.emplace_back(keys[3], Value(req.add_generation_prompt));
  for (auto& kv : req.kwargs.dict_ref().items) {  // unique keys (a dict's), none of the four above
    QF_CHECK(kv.first.is_string(), "template kwargs must have string keys");
    QF_CHECK(!std::as_const(vars).find(std::string_view(kv.first.str())), "render() got multiple values for keyword argument '",
             kv.first.str(), "'");
    vars.items.emplace_back(kv.first, kv.second);
  }
  Value ctx(std::move(vars));
  RenderResult r = tmpl.render_tracked(ctx, opt);
  ChatRendered out{std::move(r.text), {}};
  // Python string indices into the text as rendered (before any continue_final_message cut, as transformers):
  // all span ends sorted, then one pass over the text (a conversation has a span per assistant turn)
  std::vector<std::pair<size_t, size_t>> ends;  // (byte offset, 2 * span + which end)
  ends.reserve(2 * r.generation.size());
  for (size_t i = 0; i < r.generation.size(); ++i) {
    ends.emplace_back(std::min(r.generation[i].first, out.text.size()), 2 * i);
    ends.emplace_back(std::min(r.generation[i].second, out.text.size()), 2 * i + 1);
  }
  std::sort(ends.begin(), ends.end());
  std::vector<size_t> code_points(ends.size());
  size_t at = 0, count = 0;
  for (auto& [byte, slot] : ends) {
    count += utf8_length(std::string_view(out.text).substr(at, byte - at));
    at = byte;
    code_points[slot] = count;
  }
  out.generation.reserve(r.generation.size());
  for (size_t i = 0; i < r.generation.size(); ++i) out.generation.emplace_back(code_points[2 * i], code_points[2 * i + 1]);
  if (cont) {
    std::string_view tag_stripped = strip_ws(kContinueTag);
    std::string_view fm_stripped = strip_ws(final_message);
    // glibc's memmem (two-way) is linear however the final message repeats itself; std::string::find is not
    bool has_final = fm_stripped.empty() || memmem(out.text.data(), out.text.size(), fm_stripped.data(), fm_stripped.size());
    if (!has_final || out.text.find(tag_stripped) == std::string::npos)
      throw InvalidArgument(
          "continue_final_message is set but the final message does not appear in the chat after applying the chat "
          "template! This can happen if the chat template deletes portions of the final message. Please verify the "
          "chat template and final message in your chat to ensure they are compatible.Final message to continue: " +
          std::string(fm_stripped) + "\nRendered chat:\n" + out.text);
    size_t loc = out.text.rfind(tag_stripped);
    if (out.text.compare(loc, std::strlen(kContinueTag), kContinueTag) == 0) {
      out.text.resize(loc);
    } else {
      out.text.resize(loc);
      out.text.resize(py_strip(out.text, false, true).size());  // str.rstrip()
    }
  }
  return out;
}

namespace {

// Renders conversation i = get(i) for i in [0, n) on `threads` threads.
template <class Get>
std::vector<ChatRendered> render_batch(const Template& tmpl, const ChatRequest& shared, size_t n, Get get,
                                       const RenderOptions& opt, int threads) {
  std::vector<ChatRendered> out(n);
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  threads = std::min(threads, kMaxBatchThreads);
  threads = static_cast<int>(std::min<size_t>(static_cast<size_t>(threads), std::max<size_t>(n, 1)));
  std::vector<std::exception_ptr> errors(static_cast<size_t>(threads));
  std::vector<size_t> failed_at(static_cast<size_t>(threads), n);
  auto render_stride = [&](int t) {
    RenderCache cache;
    RenderOptions o = opt;
    o.cache = &cache;
    ChatRequest req;
    // values are counted without atomics: with several threads each gets its own copy
    auto own = [&](const Value& v) { return threads > 1 ? deep_copy(v) : v; };
    req.tools = own(shared.tools);
    req.documents = own(shared.documents);
    req.kwargs = own(shared.kwargs);
    cache.share(req.tools);
    cache.share(req.documents);
    for (auto& kv : req.kwargs.dict_ref().items) cache.share(kv.second);
    req.add_generation_prompt = shared.add_generation_prompt;
    req.continue_final_message = shared.continue_final_message;
    for (size_t i = static_cast<size_t>(t); i < n; i += static_cast<size_t>(threads)) {
      try {
        req.messages = get(i, threads > 1);
        out[i] = apply_chat_template(tmpl, req, o);
        o.reserve = out[i].text.size() + out[i].text.size() / 4;
      } catch (...) {
        errors[t] = std::current_exception();
        failed_at[t] = i;
        return;
      }
    }
  };
  auto work = [&](int t) noexcept {
    try {
      render_stride(t);
    } catch (...) {  // before the stride's first conversation: copying the shared values
      errors[t] = std::current_exception();
      failed_at[t] = static_cast<size_t>(t);
    }
  };
  if (threads == 1) {
    work(0);
  } else {
    // Threads the system refuses (EAGAIN under RLIMIT_NPROC / RLIMIT_AS,
    // ...) are not an error: the calling thread renders their strides.
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(threads));
    int started = 0;
    for (; started < threads; ++started) {
      try {
        pool.emplace_back(work, started);
      } catch (const std::system_error&) {
        break;
      }
    }
    for (int t = started; t < threads; ++t) work(t);
    for (auto& th : pool) th.join();
  }
  size_t first = n;
  int which = -1;
  for (int t = 0; t < threads; ++t)
    if (errors[t] && failed_at[t] < first) {
      first = failed_at[t];
      which = t;
    }
  if (which >= 0) {
    try {
      std::rethrow_exception(errors[which]);
    } catch (const TemplateError& e) {
      throw TemplateError(e.kind, detail::concat("conversation ", first, ": ", e.message), e.line, e.column);
    } catch (const InvalidArgument& e) {
      throw InvalidArgument(detail::concat("conversation ", first, ": ", e.what()));
    }
  }
  return out;
}

}  // namespace

std::vector<ChatRendered> apply_chat_template_batch(const Template& tmpl, const ChatRequest& shared,
                                                    const List& conversations, const RenderOptions& opt, int threads) {
  return render_batch(
      tmpl, shared, conversations.size(),
      [&](size_t i, bool other_thread) { return other_thread ? deep_copy(conversations[i]) : conversations[i]; }, opt,
      threads);
}

namespace {
// The closing quote of the JSON string whose content starts at t[p] (t.size()
// when there is none): the next '"' that an odd run of backslashes does not
// escape. memchr finds quotes many bytes at a time; escapes elsewhere in the
// string cost nothing here (each conversation's own parse reads them).
size_t string_end(std::string_view t, size_t p) {
  for (size_t from = p;;) {
    const void* q = std::memchr(t.data() + from, '"', t.size() - from);
    if (!q) return t.size();
    size_t at = static_cast<size_t>(static_cast<const char*>(q) - t.data()), slashes = 0;
    while (at - slashes > p && t[at - slashes - 1] == '\\') ++slashes;
    if (slashes % 2 == 0) return at;
    from = at + 1;
  }
}
}  // namespace

std::vector<ChatRendered> apply_chat_template_batch_json(const Template& tmpl, const ChatRequest& shared,
                                                         std::string_view conversations_json, const RenderOptions& opt,
                                                         int threads) {
  // split the top-level array into its elements, then parse each where it is rendered (in parallel, cache-hot)
  std::vector<std::string_view> items;
  std::string_view t = conversations_json;
  size_t p = 0;
  auto ws = [&] {
    while (p < t.size() && (t[p] == ' ' || t[p] == '\t' || t[p] == '\n' || t[p] == '\r')) ++p;
  };
  ws();
  QF_CHECK(p < t.size() && t[p] == '[', "conversations must be a JSON list of message lists");
  ++p;
  ws();
  if (p < t.size() && t[p] == ']') ++p;
  else
    while (true) {
      ws();
      size_t start = p;
      int depth = 0;
      for (; p < t.size(); ++p) {
        char c = t[p];
        if (c == '"') p = string_end(t, p + 1);
        else if (c == '[' || c == '{') ++depth;
        else if (c == ']' || c == '}') {
          if (depth == 0) break;
          --depth;
        } else if (c == ',' && depth == 0) break;
      }
      QF_CHECK(p < t.size() && depth == 0, "invalid JSON: unterminated conversations list");
      items.push_back(t.substr(start, p - start));
      if (t[p] == ']') {
        ++p;
        break;
      }
      ++p;  // ','
    }
  ws();
  QF_CHECK(p == t.size(), "invalid JSON: extra data after the conversations list at offset ", p);
  return render_batch(tmpl, shared, items.size(), [&](size_t i, bool) { return json_loads(items[i]); }, opt, threads);
}

ChatRequest chat_request_from_json(const Value& obj) {
  QF_CHECK(obj.is_dict(), "a chat request must be a JSON object");
  ChatRequest req;
  for (auto& kv : obj.dict_ref().items) {
    QF_CHECK(kv.first.is_string(), "request keys must be strings");
    const std::string& k = kv.first.str();
    const Value& v = kv.second;
    if (k == "messages") req.messages = v;
    else if (k == "tools") req.tools = v;
    else if (k == "documents") req.documents = v;
    else if (k == "add_generation_prompt") req.add_generation_prompt = v.truthy();
    else if (k == "continue_final_message") {
      if (v.is_string()) req.continue_final_message = v.str();
      else if (v.truthy()) req.continue_final_message = "content";
    } else {
      req.kwargs.set(kv.first, v);
    }
  }
  QF_CHECK(req.messages.is_list(), "a chat request needs \"messages\": a list of message objects");
  return req;
}

}  // namespace qforge::chat
