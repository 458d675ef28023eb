// Tool-call parsing: the shared JSON scanner and helpers, the Llama 3.x and
// Hermes / Qwen parsers, reasoning blocks, stop tokens and the dispatch to
// each family's parser (tool_calls_*.cpp). Malformed output never throws:
// the raw text is returned as content with `error` set.
//
// Generated text can hold any number of '{' and '[' (a model stuck printing
// "[[[[..."), and the Llama 3 format allows a call anywhere in it. Trying a
// JSON parse at every bracket costs the text's length per bracket; instead
// one scanner (JsonScan) reads forward from a bracket with an explicit stack
// and records, for every bracket it meets, whether a JSON value starts there
// and where it ends. A bracket is scanned once: later tries reuse the record.
#include "qforge/chat/tool_calls.hpp"

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <deque>
#include <set>
#include <unordered_map>
#include <vector>

#include "qforge/error.hpp"
#include "tool_calls_internal.hpp"

namespace qforge::chat {

using namespace tool_calls_detail;

namespace {

const std::string_view kPythonTag = "<|python_tag|>";
const std::string_view kEom = "<|eom_id|>";
const std::string_view kEot = "<|eot_id|>";

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// The code unit of the \uXXXX escape at s[i] ('\\'), or -1 when there is none.
int32_t u_escape(std::string_view s, size_t i) {
  if (i + 6 > s.size() || s[i] != '\\' || s[i + 1] != 'u') return -1;
  int32_t v = 0;
  for (size_t k = i + 2; k < i + 6; ++k) {
    int d = hex_digit(s[k]);
    if (d < 0) return -1;
    v = v * 16 + d;
  }
  return v;
}

// What the scanner knows about the JSON value that may start at one bracket.
enum : uint8_t { kUnknown, kParsed, kMalformed, kTooDeep };
enum : uint8_t {
  kNamed = 1,     // an object whose "name" (the last one, as json.loads keeps) is a string
  kCallList = 2,  // a non-empty list of kNamed objects
};
struct Bracket {
  uint32_t at;        // offset of the '{' or '['
  uint32_t end = 0;   // kParsed: one past the value; kMalformed / kTooDeep: where it failed
  uint8_t state = kUnknown;
  uint8_t flags = 0;
};

// Scans JSON values that start at the brackets of a text, as json.loads
// would read them (same grammar, NaN/Infinity included), but without
// building them, with at most kMaxToolCallDepth open brackets, and
// remembering each bracket's outcome. Two tries can read the same bytes
// differently only where one is inside a string and the other is not, so
// in practice a byte is read once or twice; the total is capped at
// kMaxToolCallScanFactor steps per byte (exhausted() then says so).
class JsonScan {
 public:
  explicit JsonScan(std::string_view t) : t_(t), budget_(kMaxToolCallScanFactor * t.size() + 4096) {
    for (size_t i = 0; i < t.size(); ++i)
      if (t[i] == '{' || t[i] == '[') brackets_.push_back({static_cast<uint32_t>(i)});
  }
  size_t size() const { return brackets_.size(); }
  size_t at(size_t k) const { return brackets_[k].at; }
  bool exhausted() const { return exhausted_; }
  // The outcome of the bracket with ordinal k (scanned now if not yet known).
  const Bracket& result(size_t k) {
    if (brackets_[k].state == kUnknown && !exhausted_) scan_from(k);
    return brackets_[k];
  }
  // The parsed value at bracket k (state kParsed), lone surrogate escapes read as U+FFFD.
  Value load(size_t k) const {
    const Bracket& b = brackets_[k];
    std::string_view json = t_.substr(b.at, b.end - b.at);
    auto first = lone_.lower_bound(b.at);
    if (first == lone_.end() || *first >= b.end) return json_loads(json);
    std::string fixed(json);
    for (auto it = first; it != lone_.end() && *it < b.end; ++it) fixed.replace(*it - b.at, 6, "\\ufffd");
    return json_loads(fixed);
  }

 private:
  enum Expect : uint8_t { kFirstKey, kKey, kColon, kFirstItem, kItem, kNext };
  struct Frame {
    size_t k;  // bracket ordinal
    bool object;
    Expect expect;
    bool key_is_name = false;  // the key just read is "name"
    bool named = false;        // object: the last "name" holds a string
    bool call_list = true;     // list: every item so far is a kNamed object
    bool empty = true;
  };

  bool charge(size_t steps) {
    used_ += steps;
    if (used_ > budget_) exhausted_ = true;
    return !exhausted_;
  }
  size_t skip_ws(size_t p) const {
    while (p < t_.size() && is_ws(t_[p])) ++p;
    return p;
  }
  // The string at t_[p] == '"': one past its closing quote, or 0 when malformed.
  size_t string_end(size_t p, bool* is_name) {
    size_t i = p + 1;
    bool escaped = false, bad = false;
    while (i < t_.size() && !bad) {
      unsigned char c = static_cast<unsigned char>(t_[i]);
      if (c == '"') break;
      if (c < 0x20) {
        bad = true;
      } else if (c != '\\') {
        ++i;
      } else if (i + 1 < t_.size() && t_[i + 1] == 'u') {
        escaped = true;
        int32_t u = u_escape(t_, i);
        int32_t lo = u >= 0xD800 && u < 0xDC00 ? u_escape(t_, i + 6) : -1;
        if (u < 0) bad = true;
        else if (lo >= 0xDC00 && lo < 0xE000) i += 12;  // a surrogate pair: one code point
        else {
          if (u >= 0xD800 && u < 0xE000) lone_.insert(static_cast<uint32_t>(i));
          i += 6;
        }
      } else if (i + 1 < t_.size() && std::string_view("\"\\/bfnrt").find(t_[i + 1]) != std::string_view::npos) {
        escaped = true;
        i += 2;
      } else {
        bad = true;
      }
    }
    charge(i - p);
    if (bad || i >= t_.size()) return 0;
    if (is_name) {
      *is_name = t_.substr(p + 1, i - p - 1) == "name";
      if (escaped && !*is_name) {
        try {  // "\u006eame" is "name" too (rare: only keys with escapes come here)
          *is_name = json_loads(t_.substr(p, i + 1 - p)).str() == "name";
        } catch (const InvalidArgument&) {
          *is_name = false;
        }
      }
    }
    return i + 1;
  }
  // A number or literal at t_[p]: one past it, or 0 when there is none.
  size_t scalar_end(size_t p) {
    for (std::string_view lit : {"true", "false", "null", "NaN", "Infinity", "-Infinity"})
      if (t_.substr(p, lit.size()) == lit) return p + lit.size();
    size_t i = p;
    auto digits = [&] {
      size_t s = i;
      while (i < t_.size() && t_[i] >= '0' && t_[i] <= '9') ++i;
      return i > s;
    };
    if (i < t_.size() && t_[i] == '-') ++i;
    if (i >= t_.size() || !(t_[i] >= '0' && t_[i] <= '9')) return 0;
    if (t_[i] == '0') ++i;
    else digits();
    if (i + 1 < t_.size() && t_[i] == '.' && t_[i + 1] >= '0' && t_[i + 1] <= '9') {
      ++i;
      digits();
    }
    if (i < t_.size() && (t_[i] == 'e' || t_[i] == 'E')) {
      size_t save = i++;
      if (i < t_.size() && (t_[i] == '+' || t_[i] == '-')) ++i;
      if (!digits()) i = save;
    }
    charge(i - p);
    return i;
  }
  size_t ordinal_of(size_t pos, size_t from) const {
    auto it = std::lower_bound(brackets_.begin() + static_cast<std::ptrdiff_t>(from), brackets_.end(), pos,
                               [](const Bracket& b, size_t p) { return b.at < p; });
    return static_cast<size_t>(it - brackets_.begin());
  }

  // Reads the value at bracket k, recording every bracket met as a value.
  void scan_from(size_t k) {
    std::deque<Frame> stack;  // at most kMaxToolCallDepth frames
    stack.push_back({k, t_[brackets_[k].at] == '{', t_[brackets_[k].at] == '{' ? kFirstKey : kFirstItem});
    size_t p = brackets_[k].at + 1;
    auto fail = [&](size_t where, uint8_t why) {
      for (auto& f : stack) {
        brackets_[f.k].state = why;
        brackets_[f.k].end = static_cast<uint32_t>(where);
      }
    };
    // an item or value of the innermost frame is complete
    auto done = [&](bool is_string, bool named_object) {
      Frame& f = stack.back();
      if (f.object) {
        if (f.key_is_name) f.named = is_string;
      } else {
        f.call_list = f.call_list && named_object;
        f.empty = false;
      }
      f.expect = kNext;
    };
    while (!stack.empty()) {
      if (!charge(1)) return;
      size_t q = skip_ws(p);
      charge(q - p);
      p = q;
      if (p >= t_.size()) return fail(p, kMalformed);
      Frame& f = stack.back();
      char c = t_[p];
      bool close = (c == '}' && f.object && (f.expect == kFirstKey || f.expect == kNext)) ||
                   (c == ']' && !f.object && (f.expect == kFirstItem || f.expect == kNext));
      if (close) {
        Bracket& b = brackets_[f.k];
        b.state = kParsed;
        b.end = static_cast<uint32_t>(p + 1);
        b.flags = f.object ? (f.named ? kNamed : 0) : (!f.empty && f.call_list ? kCallList : 0);
        ++p;
        stack.pop_back();
        if (!stack.empty()) done(false, b.flags & kNamed);
        continue;
      }
      switch (f.expect) {
        case kFirstKey:
        case kKey: {
          if (c != '"') return fail(p, kMalformed);
          size_t e = string_end(p, &f.key_is_name);
          if (!e) return fail(p, kMalformed);
          p = e;
          f.expect = kColon;
          break;
        }
        case kColon:
          if (c != ':') return fail(p, kMalformed);
          ++p;
          f.expect = kItem;
          break;
        case kNext:
          if (c != ',') return fail(p, kMalformed);
          ++p;
          f.expect = f.object ? kKey : kItem;
          break;
        case kFirstItem:
        case kItem:
          if (c == '{' || c == '[') {
            size_t j = ordinal_of(p, f.k + 1);
            const Bracket& b = brackets_[j];
            if (b.state == kParsed) {  // read before: skip it
              p = b.end;
              done(false, b.flags & kNamed);
            } else if (b.state != kUnknown) {  // the same bytes fail the same way
              return fail(b.end, b.state);
            } else {
              if (stack.size() == static_cast<size_t>(kMaxToolCallDepth)) {
                // the outermost value nests too deep; the inner ones may not
                brackets_[stack.front().k].state = kTooDeep;
                brackets_[stack.front().k].end = static_cast<uint32_t>(p);
                stack.pop_front();
              }
              stack.push_back({j, c == '{', c == '{' ? kFirstKey : kFirstItem});
              ++p;
            }
          } else if (c == '"') {
            size_t e = string_end(p, nullptr);
            if (!e) return fail(p, kMalformed);
            p = e;
            done(true, false);
          } else {
            size_t e = scalar_end(p);
            if (!e) return fail(p, kMalformed);
            p = e;
            done(false, false);
          }
          break;
      }
    }
  }

  std::string_view t_;
  std::vector<Bracket> brackets_;
  std::set<uint32_t> lone_;  // offsets of \uXXXX escapes of lone surrogates (inside strings)
  size_t used_ = 0, budget_;
  bool exhausted_ = false;
};

const char* too_deep_message() {
  static const std::string m = "tool call JSON nests deeper than " + std::to_string(kMaxToolCallDepth) + " levels";
  return m.c_str();
}

}  // namespace

namespace tool_calls_detail {

std::string_view trim(std::string_view s) {
  while (!s.empty() && is_ws(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_ws(s.back())) s.remove_suffix(1);
  return s;
}

bool starts_with(std::string_view s, std::string_view prefix) { return s.substr(0, prefix.size()) == prefix; }

size_t skip_ws(std::string_view s, size_t p) {
  while (p < s.size() && is_ws(s[p])) ++p;
  return p;
}

void set_content(ParsedToolCalls& r, std::string_view content) {
  std::string_view c = trim(content);
  r.content = c.empty() ? Value() : Value(c);
}

void fail(ParsedToolCalls& r, std::string why) {
  r.error = std::move(why);
  r.tool_calls = Value(List{});
}

void drop_tokens(ParsedToolCalls& r, std::initializer_list<std::string_view> tokens) {
  if (!r.error.empty() || !r.content.is_string()) return;
  std::string c = r.content.str();
  for (std::string_view tok : tokens) {
    std::string next;
    size_t pos = 0;
    for (size_t at; (at = c.find(tok, pos)) != std::string::npos; pos = at + tok.size()) next.append(c, pos, at - pos);
    next.append(c, pos, std::string::npos);
    c = std::move(next);
  }
  set_content(r, c);
}

bool plausible_name(std::string_view name) {
  constexpr size_t kMaxToolNameBytes = 256;
  if (name.empty() || name.size() > kMaxToolNameBytes) return false;
  for (char c : name)
    if (is_ws(c) || c == '<' || c == '>' || c == '[' || c == ']' || c == '{' || c == '"') return false;
  return true;
}

size_t past_close(std::string_view text, size_t p, std::string_view close, ParsedToolCalls& r, std::string_view what) {
  p = skip_ws(text, p);
  if (starts_with(text.substr(p), close)) return p + close.size();
  if (p >= text.size()) return p;
  return failed(r, "expected " + std::string(close) + " after " + std::string(what));
}

bool json_value_at(std::string_view text, size_t pos, Value& out, size_t& end, std::string& error) {
  size_t p = skip_ws(text, pos);
  if (p >= text.size()) {
    error = "expected a JSON value, found the end of the text";
    return false;
  }
  // Where the value ends: brackets matched outside strings, at most
  // kMaxToolCallDepth open (linear in the value's length); load_json then
  // checks the grammar of that slice.
  size_t i = p;
  if (text[i] == '{' || text[i] == '[') {
    int depth = 0;
    bool in_string = false;
    for (; i < text.size(); ++i) {
      char c = text[i];
      if (in_string) {
        if (c == '\\') ++i;
        else if (c == '"') in_string = false;
      } else if (c == '"') {
        in_string = true;
      } else if (c == '{' || c == '[') {
        if (++depth > kMaxToolCallDepth) {
          error = too_deep_message();
          return false;
        }
      } else if ((c == '}' || c == ']') && --depth == 0) {
        break;
      }
    }
    if (i >= text.size()) {
      error = "truncated JSON at offset " + std::to_string(p);
      return false;
    }
    ++i;
  } else if (text[i] == '"') {
    for (++i; i < text.size() && text[i] != '"'; ++i)
      if (text[i] == '\\') ++i;
    if (i >= text.size()) {
      error = "truncated JSON string at offset " + std::to_string(p);
      return false;
    }
    ++i;
  } else {
    while (i < text.size() && (std::isalnum(static_cast<unsigned char>(text[i])) || text[i] == '-' || text[i] == '+' ||
                               text[i] == '.'))
      ++i;
  }
  if (!load_json(text.substr(p, i - p), out, error)) return false;
  end = i;
  return true;
}

namespace {

// The parameter types the tools of the parse under way declare: "tool\0key" ->
// JSON-schema type. Set for the duration of parse_tool_calls (one per thread).
thread_local const std::unordered_map<std::string, std::string>* t_declared_types = nullptr;

std::unordered_map<std::string, std::string> declared_types(const Value& tools) {
  std::unordered_map<std::string, std::string> out;
  if (!tools.is_list()) return out;
  for (const Value& tool : tools.list()) {
    const Value* fn = tool.is_dict() ? tool.get("function") : nullptr;
    if (!fn) fn = &tool;
    const Value* name = fn->is_dict() ? fn->get("name") : nullptr;
    const Value* params = fn->is_dict() ? fn->get("parameters") : nullptr;
    const Value* props = params && params->is_dict() ? params->get("properties") : nullptr;
    if (!name || !name->is_string() || !props || !props->is_dict()) continue;
    for (auto& [key, spec] : props->dict_ref().items) {
      const Value* type = spec.is_dict() ? spec.get("type") : nullptr;
      if (key.is_string() && type && type->is_string()) out[name->str() + '\0' + key.str()] = type->str();
    }
  }
  return out;
}

}  // namespace

Value typed_param(std::string_view raw, bool python, std::string_view tool, std::string_view key) {
  if (t_declared_types) {
    std::string id(tool);
    id += '\0';
    id += key;
    auto it = t_declared_types->find(id);
    if (it != t_declared_types->end() && it->second == "string") return Value(raw);
  }
  std::string_view t = trim(raw);
  if (t.empty()) return Value(raw);
  char c = t[0];
  bool maybe = c == '{' || c == '[' || c == '-' || (c >= '0' && c <= '9') || t == "true" || t == "false" || t == "null";
  Value v;
  std::string not_typed;  // then the value is the raw string
  if (maybe && load_json(t, v, not_typed) && !v.is_string()) return v;
  if (python && (maybe || c == '(' || t == "True" || t == "False" || t == "None")) {
    size_t p = 0;
    if (python_literal(t, p, v, not_typed) && p == t.size() && !v.is_string()) return v;
  }
  return Value(raw);
}

bool python_literal(std::string_view s, size_t& p, Value& out, std::string& error, int depth) {
  p = skip_ws(s, p);
  if (p >= s.size()) {
    error = "expected a value, found the end of the text";
    return false;
  }
  char q = s[p];
  if (q == '"' || q == '\'') {
    std::string v;
    size_t i = p + 1;
    while (i < s.size() && s[i] != q) {
      if (s[i] == '\\' && i + 1 < s.size()) {
        char e = s[i + 1];
        switch (e) {
          case 'n': v += '\n'; break;
          case 't': v += '\t'; break;
          case 'r': v += '\r'; break;
          case '\\': case '\'': case '"': v += e; break;
          default: v += '\\'; v += e;  // Python keeps unknown escapes
        }
        i += 2;
      } else {
        v += s[i++];
      }
    }
    if (i >= s.size()) {
      error = "unterminated string at offset " + std::to_string(p);
      return false;
    }
    p = i + 1;
    out = Value(std::move(v));
    return true;
  }
  if (q == '[' || q == '(' || q == '{') {
    if (depth >= kMaxToolCallDepth) {
      error = too_deep_message();
      return false;
    }
    bool is_dict = q == '{';
    char close = q == '[' ? ']' : q == '(' ? ')' : '}';
    Value coll = is_dict ? Value::dict() : Value(List{});
    ++p;
    while (true) {
      p = skip_ws(s, p);
      if (p < s.size() && s[p] == close) break;
      Value key, item;
      if (!python_literal(s, p, is_dict ? key : item, error, depth + 1)) return false;
      if (is_dict) {
        p = skip_ws(s, p);
        if (p >= s.size() || s[p] != ':') {
          error = "expected ':' in a dict at offset " + std::to_string(p);
          return false;
        }
        ++p;
        if (!python_literal(s, p, item, error, depth + 1)) return false;
        if (!key.is_string()) {
          error = "dict keys must be strings";
          return false;
        }
        coll.set(std::move(key), std::move(item));
      } else {
        coll.push_back(std::move(item));
      }
      p = skip_ws(s, p);
      if (p < s.size() && s[p] == ',') ++p;
      else if (p >= s.size() || s[p] != close) {
        error = std::string("expected ',' or '") + close + "' at offset " + std::to_string(p);
        return false;
      }
    }
    ++p;
    out = std::move(coll);
    return true;
  }
  size_t start = p;
  while (p < s.size() && (std::isalnum(static_cast<unsigned char>(s[p])) || s[p] == '-' || s[p] == '+' || s[p] == '.'))
    ++p;
  std::string_view tok = s.substr(start, p - start);
  if (tok == "True" || tok == "true") out = Value(true);
  else if (tok == "False" || tok == "false") out = Value(false);
  else if (tok == "None" || tok == "null") out = Value();
  else if (tok.empty() || !load_json(tok, out, error) || !out.is_number()) {
    error = "not a Python literal at offset " + std::to_string(start);
    return false;
  }
  return true;
}

}  // namespace tool_calls_detail

namespace {

// The length of the valid UTF-8 sequence at s[i], 0 when none starts there.
size_t utf8_sequence(std::string_view s, size_t i) {
  auto cont = [&](size_t k, unsigned lo, unsigned hi) {
    if (i + k >= s.size()) return false;
    unsigned c = static_cast<unsigned char>(s[i + k]);
    return c >= lo && c <= hi;
  };
  unsigned c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) return cont(1, 0x80, 0xBF) ? 2 : 0;
  if (c >= 0xE0 && c <= 0xEF) {
    unsigned lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    return cont(1, lo, hi) && cont(2, 0x80, 0xBF) ? 3 : 0;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    unsigned lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    return cont(1, lo, hi) && cont(2, 0x80, 0xBF) && cont(3, 0x80, 0xBF) ? 4 : 0;
  }
  return 0;
}

// The bytes an invalid sequence at s[i] spans: an encoded surrogate whole,
// else its maximal subpart (the longest start of a valid sequence), at least one.
size_t invalid_sequence(std::string_view s, size_t i) {
  auto byte = [&](size_t k) { return i + k < s.size() ? static_cast<unsigned>(static_cast<unsigned char>(s[i + k])) : 0u; };
  unsigned c = byte(0);
  if (c == 0xED && byte(1) >= 0xA0 && byte(1) <= 0xBF && byte(2) >= 0x80 && byte(2) <= 0xBF) return 3;
  size_t need = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 1;
  unsigned lo = c == 0xE0 ? 0xA0 : c == 0xF0 ? 0x90 : 0x80, hi = c == 0xED ? 0x9F : c == 0xF4 ? 0x8F : 0xBF;
  size_t k = 1;
  for (; k < need; ++k) {
    unsigned b = byte(k);
    if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF)) break;
  }
  return k;
}

}  // namespace

namespace tool_calls_detail {

// One JSON document (a <tool_call> body, a JSON-string "arguments", a Qwen3-Coder
// parameter) with the tool-call limits; false with `error` set when it is not one.
bool load_json(std::string_view json, Value& out, std::string& error) {
  size_t p = 0;
  while (p < json.size() && is_ws(json[p])) ++p;
  if (p < json.size() && (json[p] == '{' || json[p] == '[')) {
    JsonScan scan(json);
    const Bracket& b = scan.result(0);
    if (b.state == kTooDeep) {
      error = too_deep_message();
      return false;
    }
    size_t e = b.end;
    while (e < json.size() && is_ws(json[e])) ++e;
    if (b.state == kParsed && e == json.size()) {
      out = scan.load(0);
      return true;
    }
    error = b.state == kParsed ? "extra data after the JSON value at offset " + std::to_string(b.end)
                               : "invalid JSON at offset " + std::to_string(b.end);
    return false;
  }
  try {  // a scalar: no nesting
    out = json_loads(json);
  } catch (const InvalidArgument& e) {
    error = e.what();
    return false;
  }
  if (out.is_string()) {
    std::string storage;
    std::string_view s = scrub_utf8(out.str(), storage);
    if (s.size() != out.str().size() || s.data() != out.str().data()) out = Value(std::string(s));
  }
  return true;
}

// {"type": "function", "function": {"name": name, "arguments": args}}
Value make_call(const Value& name, Value args) {
  Value fn = Value::dict();
  fn.set("name", name);
  fn.set("arguments", std::move(args));
  Value call = Value::dict();
  call.set("type", Value("function"));
  call.set("function", std::move(fn));
  return call;
}

bool call_from_json(const Value& obj, Value& out, std::string& error, bool name_keyed) {
  if (!obj.is_dict()) return false;
  if (const Value* fn = obj.get("function"); fn && fn->is_dict() && !obj.get("name")) return call_from_json(*fn, out, error);
  const Value* name = obj.get("name");
  if (!name) name = obj.get("tool_name");
  const Value* args = obj.get("parameters");
  if (!args) args = obj.get("arguments");
  Value keyed_name;
  if (!name && name_keyed && obj.dict_ref().items.size() == 1) {  // Apertus: {"NAME": {args}}
    keyed_name = obj.dict_ref().items[0].first;
    name = &keyed_name;
    args = &obj.dict_ref().items[0].second;
  }
  if (!name || !name->is_string()) return false;
  Value a = args ? *args : Value::dict();
  if (a.is_string()) {
    std::string why;
    Value parsed;
    if (!load_json(a.str(), parsed, why)) {
      error = "tool call arguments are not valid JSON: " + why;
      return false;
    }
    a = std::move(parsed);
  }
  if (!a.is_dict()) {
    error = "tool call arguments must be a JSON object";
    return false;
  }
  out = make_call(*name, std::move(a));
  return true;
}

// name.call(k="v", ...) -> call; false when `s` is not of that shape
bool builtin_call(std::string_view s, Value& out) {
  s = trim(s);
  size_t dot = s.find(".call(");
  if (dot == std::string_view::npos || dot == 0 || s.back() != ')') return false;
  for (size_t i = 0; i < dot; ++i)
    if (!(std::isalnum(static_cast<unsigned char>(s[i])) || s[i] == '_')) return false;
  Value args = Value::dict();
  size_t p = dot + 6;
  while (true) {
    while (p < s.size() && is_ws(s[p])) ++p;
    if (p < s.size() && s[p] == ')') break;
    size_t k = p;
    while (p < s.size() && (std::isalnum(static_cast<unsigned char>(s[p])) || s[p] == '_')) ++p;
    if (p == k || p >= s.size()) return false;
    std::string key(s.substr(k, p - k));
    while (p < s.size() && is_ws(s[p])) ++p;
    if (p >= s.size() || s[p] != '=') return false;
    ++p;
    while (p < s.size() && is_ws(s[p])) ++p;
    Value v;
    std::string why;
    if (!python_literal(s, p, v, why) || v.is_list() || v.is_dict()) return false;
    args.set(Value(key), std::move(v));
    while (p < s.size() && is_ws(s[p])) ++p;
    if (p < s.size() && s[p] == ',') ++p;
    else if (p < s.size() && s[p] == ')') break;
    else return false;
  }
  if (p != s.size() - 1) return false;
  out = make_call(Value(std::string(s.substr(0, dot))), std::move(args));
  return true;
}

// '{' at text[open] directly followed (after whitespace) by the key "name"
bool opens_with_name_key(std::string_view text, size_t open) {
  size_t p = open + 1;
  while (p < text.size() && is_ws(text[p])) ++p;
  return text.substr(p, 6) == "\"name\"";
}

// Llama 3.x: JSON calls anywhere in the text (objects, ';'-separated, or lists).
void parse_llama3(std::string_view text, ParsedToolCalls& r) {
  std::string without_tag;
  size_t tag = text.find(kPythonTag);
  if (tag != std::string_view::npos) {
    std::string_view before = trim(text.substr(0, tag));
    std::string_view body = trim(text.substr(tag + kPythonTag.size()));
    Value call;
    bool builtin = builtin_call(body, call);
    if (!builtin && !body.empty() && body[0] != '{' && body[0] != '[') {
      Value args = Value::dict();
      args.set("code", Value(body));
      call = make_call(Value("code_interpreter"), std::move(args));
      builtin = true;
    }
    if (builtin) {
      r.tool_calls.push_back(std::move(call));
      r.content = before.empty() ? Value() : Value(before);
      return;
    }
    // <|python_tag|>{"name": ...}: JSON calls after the tag
    without_tag = std::string(text.substr(0, tag)) + std::string(text.substr(tag + kPythonTag.size()));
    text = without_tag;
  }
  // Each bracket is a candidate, in text order, unless inside a call already
  // taken. An object with a string "name", or a list of such objects, is a
  // call (or calls) or an error; other JSON values are looked into.
  JsonScan scan(text);
  std::string content;
  size_t copied = 0;
  for (size_t k = 0; k < scan.size(); ++k) {
    size_t open = scan.at(k);
    if (open < copied) continue;
    const Bracket& b = scan.result(k);
    if (scan.exhausted()) {
      r.error = "gave up searching for JSON tool calls: the text's brackets take more than " +
                std::to_string(kMaxToolCallScanFactor) + " scanner steps per byte";
      r.tool_calls = Value(List{});
      return;
    }
    if (b.state != kParsed) {
      if (text[open] == '{' && opens_with_name_key(text, open)) {
        r.error = b.state == kTooDeep ? too_deep_message() : "malformed JSON tool call";
        r.tool_calls = Value(List{});
        return;
      }
      continue;
    }
    if (!(b.flags & (kNamed | kCallList))) continue;
    Value parsed = scan.load(k);
    List calls;
    std::string error;
    if (parsed.is_dict()) {
      Value c;
      if (call_from_json(parsed, c, error)) calls.push_back(std::move(c));
    } else {
      for (auto& item : parsed.list()) {
        Value c;
        if (!call_from_json(item, c, error)) {
          calls.clear();
          break;
        }
        calls.push_back(std::move(c));
      }
    }
    if (!error.empty()) {
      r.error = error;
      r.tool_calls = Value(List{});
      return;
    }
    if (calls.empty()) continue;
    content.append(text.substr(copied, open - copied));
    for (auto& c : calls) r.tool_calls.push_back(std::move(c));
    copied = b.end;
    while (copied < text.size() && (is_ws(text[copied]) || text[copied] == ';')) ++copied;
  }
  if (r.tool_calls.list().empty()) {
    r.content = Value(text);
    return;
  }
  content.append(text.substr(copied));
  set_content(r, content);
}

// Qwen3-Coder: <function=name><parameter=key>\nvalue\n</parameter>...</function>.
// The template prints strings raw and other values as JSON (Seed-OSS: as
// Python reprs), so a value that reads as a non-string value is taken as one.
bool xml_function_call(std::string_view body, Value& out, std::string& error, bool python_values) {
  const std::string_view fn_open = "<function=", fn_close = "</function>", p_open = "<parameter=", p_close = "</parameter>";
  if (body.substr(0, fn_open.size()) != fn_open) return false;
  size_t gt = body.find('>');
  if (gt == std::string_view::npos) {
    error = "malformed <function=...> tag";
    return false;
  }
  std::string name(trim(body.substr(fn_open.size(), gt - fn_open.size())));
  size_t end = body.rfind(fn_close);
  if (name.empty() || end == std::string_view::npos || end < gt) {
    error = "a <function=...> block is not closed";
    return false;
  }
  Value args = Value::dict();
  size_t pos = gt + 1;
  while (true) {
    size_t a = body.find(p_open, pos);
    if (a == std::string_view::npos || a > end) break;
    size_t g = body.find('>', a);
    size_t b = body.find(p_close, a);
    if (g == std::string_view::npos || b == std::string_view::npos || g > b) {
      error = "malformed <parameter=...> block";
      return false;
    }
    std::string key(trim(body.substr(a + p_open.size(), g - a - p_open.size())));
    std::string_view raw = body.substr(g + 1, b - g - 1);
    if (!raw.empty() && raw.front() == '\n') raw.remove_prefix(1);
    if (!raw.empty() && raw.back() == '\n') raw.remove_suffix(1);
    args.set(Value(key), typed_param(raw, python_values, name, key));
    pos = b + p_close.size();
  }
  out = make_call(Value(name), std::move(args));
  return true;
}

// Hermes / Qwen: <tool_call>{json}</tool_call> blocks
void parse_hermes(std::string_view text, ParsedToolCalls& r) {
  const std::string_view open_tag = "<tool_call>", close_tag = "</tool_call>";
  std::string content;
  size_t pos = 0;
  while (true) {
    size_t a = text.find(open_tag, pos);
    if (a == std::string_view::npos) break;
    size_t b = text.find(close_tag, a);
    std::string_view body = trim(text.substr(a + open_tag.size(), b == std::string_view::npos ? std::string_view::npos
                                                                                                 : b - a - open_tag.size()));
    content.append(text.substr(pos, a - pos));
    Value call;
    std::string error;
    bool ok = xml_function_call(body, call, error);
    if (!ok && error.empty()) {
      Value parsed;
      std::string why;
      if (load_json(body, parsed, why)) ok = call_from_json(parsed, call, error);
      else error = "malformed JSON in <tool_call>: " + why;
    }
    if (!ok) {
      r.error = error.empty() ? "a <tool_call> block is not a {\"name\", \"arguments\"} object" : error;
      r.tool_calls = Value(List{});
      return;
    }
    r.tool_calls.push_back(std::move(call));
    if (b == std::string_view::npos) {
      pos = text.size();
      break;
    }
    pos = b + close_tag.size();
  }
  content.append(text.substr(std::min(pos, text.size())));
  if (r.tool_calls.list().empty()) {
    r.content = Value(text);
    return;
  }
  set_content(r, content);
}

}  // namespace tool_calls_detail

std::string_view scrub_utf8(std::string_view text, std::string& storage) {
  size_t i = 0;
  while (i < text.size()) {
    size_t n = utf8_sequence(text, i);
    if (!n) break;
    i += n;
  }
  if (i == text.size()) return text;
  storage.assign(text.substr(0, i));
  while (i < text.size()) {
    size_t n = utf8_sequence(text, i);
    if (n) {
      storage.append(text.substr(i, n));
      i += n;
    } else {
      storage += "\xEF\xBF\xBD";  // U+FFFD
      i += invalid_sequence(text, i);
    }
  }
  return storage;
}

Value ParsedToolCalls::to_json() const {
  Value out = Value::dict();
  out.set("content", content);
  out.set("reasoning_content", reasoning_content);
  out.set("tool_calls", tool_calls);
  out.set("stop", stop.empty() ? Value() : Value(stop));
  out.set("error", error.empty() ? Value() : Value(error));
  out.set("format", format.empty() ? Value() : Value(format));
  return out;
}

namespace {

// One tool-call format family: how its text is told apart, its reasoning
// block, and the tokens that end its turn.
struct Family {
  ToolCallFormat format;
  std::string_view name;
  std::string_view alias;  // a second accepted name ("" when none)
  void (*parse)(std::string_view, ParsedToolCalls&);
  std::string_view think_open, think_close;  // reasoning block ("" when the family has none)
  // any of these in generated text selects the family under format "auto"
  std::initializer_list<std::string_view> text_markers;
  // the first of these in the text ends the turn (what follows is not the model's)
  std::initializer_list<std::string_view> turn_ends;
};

void parse_apertus(std::string_view t, ParsedToolCalls& r) { parse_json_section(t, r, "<|tools_prefix|>", "<|tools_suffix|>", true); }
void parse_nemotron_v2(std::string_view t, ParsedToolCalls& r) {
  parse_json_section(t, r, "<TOOLCALL>", "</TOOLCALL>");
  drop_tokens(r, {"<SPECIAL_12>", "<SPECIAL_11>Assistant"});  // text and calls render as two turns
}
void parse_apriel(std::string_view t, ParsedToolCalls& r) { parse_json_section(t, r, "<tool_calls>", "</tool_calls>"); }
void parse_command_r7b(std::string_view t, ParsedToolCalls& r) {
  parse_json_section(t, r, "<|START_ACTION|>", "<|END_ACTION|>");
  if (r.error.empty() && r.content.is_string()) {  // <|START_RESPONSE|>text<|END_RESPONSE|>
    std::string_view c = r.content.str();
    const std::string_view open = "<|START_RESPONSE|>", close = "<|END_RESPONSE|>";
    size_t a = c.find(open);
    if (a != std::string_view::npos) {
      size_t b = c.find(close, a);
      std::string inner(c.substr(a + open.size(), b == std::string_view::npos ? std::string_view::npos : b - a - open.size()));
      set_content(r, inner);
    }
  }
}
void parse_command_r_plus(std::string_view t, ParsedToolCalls& r) { parse_json_section(t, r, "Action:", ""); }
void parse_granite(std::string_view t, ParsedToolCalls& r) { parse_json_section(t, r, "<|tool_call|>", ""); }
void parse_gigachat(std::string_view t, ParsedToolCalls& r) {
  parse_json_section(t, r, t.find("<|function_call|>") != std::string_view::npos ? "<|function_call|>" : "function call<|role_sep|>", "");
  drop_tokens(r, {"<|message_sep|>"});  // text and calls render as two messages
}
void parse_firefunction(std::string_view t, ParsedToolCalls& r) { parse_json_section(t, r, "functools", ""); }

const Family kFamilies[] = {
    {ToolCallFormat::Mistral, "mistral", "", parse_mistral, "[THINK]", "[/THINK]", {"[TOOL_CALLS]"}, {"</s>"}},
    {ToolCallFormat::DeepSeek, "deepseek", "deepseek_r1", parse_deepseek, "<think>", "</think>", {"<｜tool▁call"},
     {"<｜end▁of▁sentence｜>"}},
    {ToolCallFormat::DeepSeekV32, "deepseek_v3_2", "", parse_deepseek_v3_2, "<think>", "</think>", {"<｜DSML｜"},
     {"<｜end▁of▁sentence｜>"}},
    {ToolCallFormat::CommandR7B, "command_r7b", "", parse_command_r7b, "<|START_THINKING|>", "<|END_THINKING|>",
     {"<|START_ACTION|>"}, {"<|END_OF_TURN_TOKEN|>"}},
    {ToolCallFormat::CommandRPlus, "command_r_plus", "", parse_command_r_plus, "", "", {},
     {"<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>"}},
    {ToolCallFormat::Granite, "granite", "", parse_granite, "<think>", "</think>", {"<|tool_call|>"}, {}},
    {ToolCallFormat::Glm4, "glm4", "glm", parse_glm4, "<think>", "</think>", {"<arg_key>"}, {"<|user|>", "<|observation|>"}},
    {ToolCallFormat::KimiK2, "kimi_k2", "kimi", parse_kimi_k2, "<think>", "</think>",
     {"<|tool_calls_section_begin|>", "<|tool_call_begin|>"}, {}},
    {ToolCallFormat::MiniMaxM2, "minimax_m2", "minimax", parse_minimax_m2, "<think>", "</think>", {"<minimax:tool_call>"},
     {"[e~["}},
    {ToolCallFormat::GptOss, "gpt_oss", "harmony", parse_harmony, "", "", {"<|channel|>"}, {}},
    {ToolCallFormat::Lfm2, "lfm2", "", parse_lfm2, "<think>", "</think>", {"<|tool_call_start|>"}, {}},
    {ToolCallFormat::FunctionaryV32, "functionary_v3_2", "", parse_functionary_v3_2, "", "", {}, {}},
    {ToolCallFormat::Apertus, "apertus", "", parse_apertus, "<|inner_prefix|>", "<|inner_suffix|>", {"<|tools_prefix|>"}, {}},
    {ToolCallFormat::SeedOss, "seed_oss", "seed", parse_seed_oss, "<seed:think>", "</seed:think>", {"<seed:tool_call>"},
     {"<seed:eos>"}},
    {ToolCallFormat::NemotronV2, "nemotron_v2", "", parse_nemotron_v2, "<think>", "</think>", {"<TOOLCALL>"}, {}},
    {ToolCallFormat::Apriel, "apriel", "", parse_apriel, "Here are my reasoning steps:", "[BEGIN FINAL RESPONSE]",
     {"<tool_calls>"}, {}},
    {ToolCallFormat::SolarOpen, "solar_open", "", parse_solar_open, "<think>", "</think>", {"<|tool_call:begin|>"}, {}},
    {ToolCallFormat::Gemma4, "gemma4", "", parse_gemma4, "<|channel>thought", "<channel|>", {"<|tool_call>"},
     {"<turn|>", "<|tool_response>"}},
    {ToolCallFormat::GigaChat, "gigachat", "", parse_gigachat, "", "", {"<|function_call|>", "function call<|role_sep|>"},
     {}},
    {ToolCallFormat::FireFunction, "firefunction", "", parse_firefunction, "", "", {"functools["}, {"<|eot_id|>"}},
    // markers that other families' text contains too (GLM's <tool_call>, Seed's and
    // Qwen3-Coder's <function=): checked last, Hermes before Functionary v3.1
    {ToolCallFormat::Llama3, "llama3", "llama", parse_llama3, "", "", {}, {}},
    {ToolCallFormat::Hermes, "hermes", "qwen", parse_hermes, "<think>", "</think>", {"<tool_call>"}, {}},
    {ToolCallFormat::FunctionaryV31, "functionary_v3_1", "", parse_functionary_v3_1, "", "", {"<function="}, {}},
};

const Family& family(ToolCallFormat f) {
  for (const Family& fam : kFamilies)
    if (fam.format == f) return fam;
  return kFamilies[0];
}

// Tokens that end a turn in some family; trailing ones are dropped from any text.
constexpr std::pair<std::string_view, const char*> kStopTokens[] = {
    {"<|eom_id|>", "eom"}, {"<|call|>", "eom"}, {"<|eot_id|>", "eot"}, {"<|im_end|>", "eot"},
    {"<|end_of_text|>", "eot"}, {"<|endoftext|>", "eot"}, {"</s>", "eot"}, {"<|end|>", "eot"},
    {"<|return|>", "eot"}, {"<seed:eos>", "eot"}, {"[e~[", "eot"}, {"<SPECIAL_12>", "eot"},
    {"<sep>", "eot"}, {"<|END_OF_TURN_TOKEN|>", "eot"}, {"<｜end▁of▁sentence｜>", "eot"}, {"<turn|>", "eot"},
    {"<end_of_turn>", "eot"}, {"<|tool_response>", "eom"}, {"<|message_sep|>", "eot"},
};

// Moves a reasoning block of `text` into r.reasoning_content: one opened at
// the start (closed or not: a truncated one is all reasoning), or closed
// without an opening (the prompt opened it). Returns the text after it.
std::string_view split_reasoning(std::string_view text, const Family& fam, ParsedToolCalls& r) {
  if (fam.think_open.empty()) return text;
  size_t start = skip_ws(text, 0);
  size_t from = starts_with(text.substr(start), fam.think_open) ? start + fam.think_open.size() : std::string_view::npos;
  size_t close = text.find(fam.think_close, from == std::string_view::npos ? 0 : from);
  if (from == std::string_view::npos && close == std::string_view::npos) return text;
  if (from == std::string_view::npos) from = 0;
  std::string_view reasoning = text.substr(from, close == std::string_view::npos ? std::string_view::npos : close - from);
  std::string_view t = trim(reasoning);
  if (!t.empty()) r.reasoning_content = Value(t);
  return close == std::string_view::npos ? std::string_view() : text.substr(close + fam.think_close.size());
}

}  // namespace

ToolCallFormat tool_call_format(std::string_view name) {
  if (name == "auto") return ToolCallFormat::Auto;
  std::string names = "auto";
  for (const Family& f : kFamilies) {
    if (name == f.name || (!f.alias.empty() && name == f.alias)) return f.format;
    names += ", " + std::string(f.name);
  }
  throw InvalidArgument("unknown tool-call format '" + std::string(name) + "' (expected one of " + names + ")");
}

const char* tool_call_format_name(ToolCallFormat format) {
  return format == ToolCallFormat::Auto ? "auto" : family(format).name.data();
}

std::vector<std::string> tool_call_format_names() {
  std::vector<std::string> out;
  for (const Family& f : kFamilies) out.emplace_back(f.name);
  return out;
}

std::vector<std::string> stop_tokens() {
  std::vector<std::string> out;
  for (auto [tok, kind] : kStopTokens) out.emplace_back(tok);
  return out;
}

ToolCallFormat detect_tool_call_format(std::string_view source) {
  auto has = [&](std::string_view m) { return source.find(m) != std::string_view::npos; };
  // most specific first: several templates print the markers of others
  // (Qwen3-Coder's <function=...> sits inside <tool_call>, GLM's too, ...)
  if (has("<|channel|>") && has("<|start|>assistant")) return ToolCallFormat::GptOss;
  if (has("｜DSML｜")) return ToolCallFormat::DeepSeekV32;
  if (has("<｜tool▁call▁begin｜>")) return ToolCallFormat::DeepSeek;
  if (has("<|tool_calls_section_begin|>")) return ToolCallFormat::KimiK2;
  if (has("<minimax:tool_call>")) return ToolCallFormat::MiniMaxM2;
  if (has("<seed:tool_call>")) return ToolCallFormat::SeedOss;
  if (has("<arg_key>")) return ToolCallFormat::Glm4;
  if (has("<|START_ACTION|>")) return ToolCallFormat::CommandR7B;
  if (has("Action:") && has("tool_name")) return ToolCallFormat::CommandRPlus;
  if (has("[TOOL_CALLS]")) return ToolCallFormat::Mistral;
  if (has("<|tool_call_start|>") || has("<|tool_list_start|>") || has("List of tools: [")) return ToolCallFormat::Lfm2;
  if (has("<|tools_prefix|>")) return ToolCallFormat::Apertus;
  if (has("<TOOLCALL>")) return ToolCallFormat::NemotronV2;
  if (has("<tool_calls>")) return ToolCallFormat::Apriel;
  if (has("<|tool_call:begin|>")) return ToolCallFormat::SolarOpen;
  if (has("<|tool_call>")) return ToolCallFormat::Gemma4;
  if (has("<|function_call|>") || (has("function call") && has("<|role_sep|>"))) return ToolCallFormat::GigaChat;
  if (has("<tool_call>")) return ToolCallFormat::Hermes;
  if (has(">>>all")) return ToolCallFormat::FunctionaryV32;
  if (has("<function=")) return ToolCallFormat::FunctionaryV31;
  if (has("<|tool_call|>")) return ToolCallFormat::Granite;
  if (has("functools[")) return ToolCallFormat::FireFunction;
  if (has("<|python_tag|>") || has("ipython") || has("<|eom_id|>")) return ToolCallFormat::Llama3;
  return ToolCallFormat::Auto;
}

namespace {

ToolCallFormat format_of_text(std::string_view body) {
  for (const Family& f : kFamilies)
    for (std::string_view m : f.text_markers)
      if (body.find(m) != std::string_view::npos) return f.format;
  // a reasoning block alone: read as the most common family that has one
  return body.find("</think>") != std::string_view::npos ? ToolCallFormat::Hermes : ToolCallFormat::Llama3;
}

}  // namespace

ParsedToolCalls parse_tool_calls(std::string_view raw_text, ToolCallFormat format, const Value* tools) {
  std::unordered_map<std::string, std::string> types;
  if (tools) types = declared_types(*tools);
  struct Scope {  // the declared types, for this parse only
    const std::unordered_map<std::string, std::string>* saved = t_declared_types;
    ~Scope() { t_declared_types = saved; }
  } scope;
  t_declared_types = tools ? &types : nullptr;
  ParsedToolCalls r;
  r.tool_calls = Value(List{});
  std::string storage;
  std::string_view text = scrub_utf8(raw_text, storage);
  if (text.size() > kMaxToolCallTextBytes) {
    r.error = "text of " + std::to_string(text.size()) + " bytes is longer than the " +
              std::to_string(kMaxToolCallTextBytes) + " searched for tool calls";
    r.content = Value(text);
    return r;
  }
  if (format == ToolCallFormat::Auto) format = format_of_text(text);
  const Family& fam = family(format);
  r.format = std::string(fam.name);
  std::string_view body = text;
  for (std::string_view end : fam.turn_ends) {  // the model stops at its end-of-turn token
    size_t at = body.find(end);
    if (at != std::string_view::npos) {
      body = body.substr(0, at);
      r.stop = "eot";
    }
  }
  // trailing stop tokens: eom (a tool call awaits its result) or eot (the turn is over)
  for (bool stripped = true; stripped;) {  // each round removes a token: at most size/4 rounds
    stripped = false;
    std::string_view t = trim(body);
    for (auto [tok, name] : kStopTokens) {
      if (ends_with(t, tok)) {
        if (r.stop.empty()) r.stop = name;
        body = t.substr(0, t.size() - tok.size());
        stripped = true;
        break;
      }
    }
  }
  try {
    fam.parse(split_reasoning(body, fam, r), r);
  } catch (const std::exception& e) {
    fail(r, e.what());
  }
  if (!r.error.empty()) {
    r.content = Value(body);
    r.reasoning_content = Value();
  }
  return r;
}

const ParsedToolCalls& ToolCallStream::feed(std::string_view chunk) {
  if (text_.size() + chunk.size() > kMaxToolCallTextBytes)
    throw InvalidArgument("streamed text of " + std::to_string(text_.size() + chunk.size()) + " bytes is longer than the " +
                          std::to_string(kMaxToolCallTextBytes) + " searched for tool calls");
  text_.append(chunk);
  // Hold back a tail that may be the start of a marker ("<tool_ca"): read
  // as content now, it would vanish from the content once the marker completes.
  size_t safe = text_.size();
  auto hold = [&](std::string_view marker) {
    for (size_t k = std::min(marker.size() - 1, text_.size()); k > 0; --k)
      if (std::string_view(text_).substr(text_.size() - k) == marker.substr(0, k)) {
        safe = std::min(safe, text_.size() - k);
        return;
      }
  };
  for (const Family& f : kFamilies) {
    if (format_ != ToolCallFormat::Auto && f.format != format_) continue;
    for (std::string_view m : f.text_markers) hold(m);
    if (!f.think_open.empty()) {
      hold(f.think_open);
      hold(f.think_close);
    }
  }
  for (auto [tok, name] : kStopTokens) hold(tok);
  ParsedToolCalls r = parse_tool_calls(std::string_view(text_).substr(0, safe), format_, tools_ptr());
  if (r.error.empty()) last_ = std::move(r);  // an error here is (so far) a call still being written
  return last_;
}

ParsedToolCalls ToolCallStream::finish() const { return parse_tool_calls(text_, format_, tools_ptr()); }

}  // namespace qforge::chat
