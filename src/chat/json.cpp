// json.dumps and json.loads of Values, with Python's spacing, escapes and key order.
#include "qforge/chat/value.hpp"

#include <algorithm>
#include <array>
#include <bit>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <unordered_map>

#include "qforge/error.hpp"

namespace qforge::chat {

// --------------------------------------------------------------- json.dumps
// The first byte at or after s[i] that JSON must treat specially: '"', '\\',
// a control character, or (when `ascii`) anything from 0x7f up. Sixteen bytes
// at a time (GCC/Clang vectors: SSE2 or NEON): most of a chat is plain string
// content.
static size_t plain_run(std::string_view s, size_t i, bool ascii) {
  static_assert(std::endian::native == std::endian::little, "the first hit is found by trailing zeros");
  using Bytes = uint8_t __attribute__((vector_size(16)));
  const size_t n = s.size();
  while (i + 16 <= n) {
    Bytes w;
    std::memcpy(&w, s.data() + i, 16);
    auto hit = (w == '"') | (w == '\\') | (w < 0x20);  // all ones in each lane that hits
    if (ascii) hit |= w >= 0x7f;
    uint64_t half[2];
    std::memcpy(half, &hit, 16);
    if (half[0]) return i + static_cast<size_t>(std::countr_zero(half[0]) >> 3);
    if (half[1]) return i + 8 + static_cast<size_t>(std::countr_zero(half[1]) >> 3);
    i += 16;
  }
  for (; i < n; ++i) {
    unsigned char c = s[i];
    if (c < 0x20 || c == '"' || c == '\\' || (ascii && c >= 0x7f)) break;
  }
  return i;
}

static void json_string(std::string& out, std::string_view s, bool ensure_ascii) {
  out += '"';
  static const char* hex = "0123456789abcdef";
  size_t i = 0, run = 0;  // s[run, i) is copied verbatim in one append
  auto flush = [&]() {
    if (i > run) out.append(s.data() + run, i - run);
  };
  while (true) {
    i = plain_run(s, i, ensure_ascii);
    if (i >= s.size()) break;
    unsigned char c = s[i];
    flush();
    if (c >= 0x80) {
      size_t j = i + 1;
      while (j < s.size() && (static_cast<unsigned char>(s[j]) & 0xC0) == 0x80) ++j;
      for (uint32_t cp : utf8_decode(s.substr(i, j - i))) {
        auto emit = [&](uint32_t u) {
          out += "\\u";
          for (int k = 3; k >= 0; --k) out += hex[(u >> (4 * k)) & 0xF];
        };
        if (cp >= 0x10000) {
          cp -= 0x10000;
          emit(0xD800 | (cp >> 10));
          emit(0xDC00 | (cp & 0x3FF));
        } else {
          emit(cp);
        }
      }
      i = run = j;
      continue;
    }
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        out += "\\u00";
        out += hex[c >> 4];
        out += hex[c & 0xF];
    }
    run = ++i;
  }
  flush();
  out += '"';
}

static std::string json_float(double d) {
  if (std::isnan(d)) return "NaN";
  if (std::isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
  return float_repr(d);
}

static void json_key(std::string& out, const Value& k, bool ensure_ascii) {
  switch (k.kind()) {
    case Kind::String: json_string(out, k.str(), ensure_ascii); return;
    case Kind::Bool: out += k.as_bool() ? "\"true\"" : "\"false\""; return;
    case Kind::Int: out += '"' + std::to_string(k.as_int()) + '"'; return;
    case Kind::Float: out += '"' + json_float(k.as_float()) + '"'; return;
    case Kind::None: out += "\"null\""; return;
    default:
      throw InvalidArgument(std::string("keys must be str, int, float, bool or None, not ") + k.type_name());
  }
}

static void dumps_rec(std::string& out, const Value& v, const DumpOptions& o, const std::string& item_sep,
                      const std::string& key_sep, int level) {
  QF_CHECK(level < 512, "json.dumps: nesting too deep (circular reference?)");
  auto newline = [&](int lvl) {
    out += '\n';
    for (int i = 0; i < lvl; ++i) out += *o.indent;
  };
  switch (v.kind()) {
    case Kind::None: out += "null"; return;
    case Kind::Bool: out += v.as_bool() ? "true" : "false"; return;
    case Kind::Int: out += std::to_string(v.as_int()); return;
    case Kind::Float: out += json_float(v.as_float()); return;
    case Kind::String: json_string(out, v.str(), o.ensure_ascii); return;
    case Kind::List:
    case Kind::Tuple: {
      if (v.range_obj()) throw InvalidArgument("Object of type range is not JSON serializable");
      auto& l = v.list();
      if (l.empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t i = 0; i < l.size(); ++i) {
        if (i) out += item_sep;
        if (o.indent) newline(level + 1);
        dumps_rec(out, l[i], o, item_sep, key_sep, level + 1);
      }
      if (o.indent) newline(level);
      out += ']';
      return;
    }
    case Kind::Dict: {
      auto& items = v.dict_ref().items;
      if (items.empty()) {
        out += "{}";
        return;
      }
      auto emit = [&](const std::pair<Value, Value>& kv, bool first) {
        if (!first) out += item_sep;
        if (o.indent) newline(level + 1);
        json_key(out, kv.first, o.ensure_ascii);
        out += key_sep;
        dumps_rec(out, kv.second, o, item_sep, key_sep, level + 1);
      };
      out += '{';
      if (o.sort_keys) {
        std::vector<const std::pair<Value, Value>*> order;
        order.reserve(items.size());
        for (auto& kv : items) {
          if (!kv.first.is_string())
            throw InvalidArgument("'<' not supported between instances of non-str dict keys in json.dumps(sort_keys=True)");
          order.push_back(&kv);
        }
        std::stable_sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->first.str() < b->first.str(); });
        for (size_t i = 0; i < order.size(); ++i) emit(*order[i], i == 0);
      } else {
        for (size_t i = 0; i < items.size(); ++i) emit(items[i], i == 0);
      }
      if (o.indent) newline(level);
      out += '}';
      return;
    }
    default:
      throw InvalidArgument(std::string("Object of type ") + v.type_name() + " is not JSON serializable");
  }
}

void json_dumps_to(std::string& out, const Value& v, const DumpOptions& o) {
  static const std::string comma_space = ", ", comma = ",", colon_space = ": ";
  const std::string& item_sep = o.item_separator ? *o.item_separator : (o.indent ? comma : comma_space);
  const std::string& key_sep = o.key_separator ? *o.key_separator : colon_space;
  dumps_rec(out, v, o, item_sep, key_sep, 0);
}

std::string json_dumps(const Value& v, const DumpOptions& o) {
  std::string out;
  json_dumps_to(out, v, o);
  return out;
}

// --------------------------------------------------------------- json.loads
namespace {
// The value of each hex digit; 0xFF for bytes that are not one.
constexpr std::array<uint8_t, 256> kHexValue = [] {
  std::array<uint8_t, 256> v{};
  v.fill(0xFF);
  for (int c = 0; c < 10; ++c) v['0' + c] = static_cast<uint8_t>(c);
  for (int c = 0; c < 6; ++c) v['a' + c] = v['A' + c] = static_cast<uint8_t>(10 + c);
  return v;
}();
constexpr std::array<int8_t, 256> kNoKeys = [] {
  std::array<int8_t, 256> v{};
  v.fill(-1);
  return v;
}();

// A memoised object key: its bytes (the key's own string) and its Value.
struct Memo {
  std::string_view bytes;
  Value key;
  int next;  // the next key in its first byte's chain, -1 at the end
};

// A read's working space, kept per thread from document to document (a batch
// reads one per conversation), so its buffers grow once rather than in every
// read. A read calls nothing that reads JSON: one per thread at a time.
struct Space {
  static constexpr size_t kKeepBytes = 1 << 16, kKeepItems = 1 << 12;  // past these a buffer is not kept
  std::string scratch;                         // an escaped string being decoded
  std::vector<Memo> keys;                      // the document's memoised keys
  std::vector<Value> items;                    // children of the arrays being read
  std::vector<std::pair<Value, Value>> pairs;  // children of the objects being read

  static Space& mine() {
    thread_local Space s;
    return s;
  }
  // Empties it after a read (also one that failed): the values go with the document.
  void release() {
    keys.clear();
    items.clear();
    pairs.clear();
    if (scratch.capacity() > kKeepBytes) std::string().swap(scratch);
    if (items.capacity() > kKeepItems) std::vector<Value>().swap(items);
    if (pairs.capacity() > kKeepItems) std::vector<std::pair<Value, Value>>().swap(pairs);
  }
};

struct JsonReader {
  std::string_view t;
  size_t p = 0;
  Space& space = Space::mine();
  int depth = 0;
  ~JsonReader() { space.release(); }

  [[noreturn]] void fail(const char* what) {
    throw InvalidArgument(detail::concat("invalid JSON: ", what, " at offset ", p));
  }
  void ws() {
    while (p < t.size() && (t[p] == ' ' || t[p] == '\t' || t[p] == '\n' || t[p] == '\r')) ++p;
  }
  uint32_t hex4() {
    if (p + 4 > t.size()) fail("truncated \\u escape");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      uint8_t d = kHexValue[static_cast<unsigned char>(t[p++])];
      if (d == 0xFF) fail("bad \\u escape");
      v = v << 4 | d;
    }
    return v;
  }

  // The string whose opening quote is at t[p]; leaves p past its closing quote.
  std::string string() {
    size_t start = ++p;
    p = plain_run(t, p, false);
    if (p < t.size() && t[p] == '"') return std::string(t.substr(start, p++ - start));  // no escapes: one copy
    return escaped_string(start);
  }
  // A string that opened at t[start] and has an escape (or an error) at t[p]:
  // decoded into `scratch`, which keeps its capacity from string to string,
  // then copied out at its exact size (no regrowth of the result).
  std::string& scratch = space.scratch;
  std::string escaped_string(size_t start) {
    scratch.assign(t.data() + start, p - start);
    while (true) {
      if (p >= t.size()) fail("unterminated string");
      char c = t[p++];
      if (c == '"') break;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
      if (p >= t.size()) fail("unterminated string");
      switch (t[p++]) {
        case '"': scratch += '"'; break;
        case '\\': scratch += '\\'; break;
        case '/': scratch += '/'; break;
        case 'b': scratch += '\b'; break;
        case 'f': scratch += '\f'; break;
        case 'n': scratch += '\n'; break;
        case 'r': scratch += '\r'; break;
        case 't': scratch += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && p + 1 < t.size() && t[p] == '\\' && t[p + 1] == 'u') {
            size_t save = p;
            p += 2;
            uint32_t lo = hex4();
            if (lo >= 0xDC00 && lo < 0xE000) cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            else p = save;  // a lone high surrogate; the next escape is read on its own
          }
          utf8_append(scratch, cp);
          break;
        }
        default: --p; fail("invalid escape");
      }
      size_t run = p;
      p = plain_run(t, p, false);
      scratch.append(t.data() + run, p - run);
    }
    return scratch;
  }

  Value number() {
    size_t start = p;
    bool is_float = false;
    if (t[p] == '-') ++p;
    if (p >= t.size() || !(t[p] >= '0' && t[p] <= '9')) fail("expecting value");
    if (t[p] == '0') ++p;
    else while (p < t.size() && t[p] >= '0' && t[p] <= '9') ++p;
    if (p < t.size() && t[p] == '.') {
      size_t q = p + 1;
      if (q < t.size() && t[q] >= '0' && t[q] <= '9') {
        is_float = true;
        p = q;
        while (p < t.size() && t[p] >= '0' && t[p] <= '9') ++p;
      }
    }
    if (p < t.size() && (t[p] == 'e' || t[p] == 'E')) {
      size_t q = p + 1;
      if (q < t.size() && (t[q] == '+' || t[q] == '-')) ++q;
      if (q < t.size() && t[q] >= '0' && t[q] <= '9') {
        is_float = true;
        p = q;
        while (p < t.size() && t[p] >= '0' && t[p] <= '9') ++p;
      }
    }
    std::string_view num = t.substr(start, p - start);
    if (!is_float) {
      int64_t v;
      auto r = std::from_chars(num.data(), num.data() + num.size(), v);
      if (r.ec == std::errc()) return Value(v);
    }
    double d = 0;
    auto r = std::from_chars(num.data(), num.data() + num.size(), d);
    if (r.ec == std::errc::result_out_of_range) d = std::strtod(std::string(num).c_str(), nullptr);  // inf or 0, as Python
    return Value(d);
  }
  bool lit(std::string_view w) {
    if (t.substr(p, w.size()) != w) return false;
    p += w.size();
    return true;
  }

  // Object keys repeat ("role", "content", ...): one Value per distinct
  // short key within a document, as CPython's decoder memoises keys. A
  // memoised key is recognised in the text (compared with the keys that start
  // with its first byte) before any scan or string; its slot lets an object
  // tell a repeat by one bit.
  static constexpr size_t kMemoKeyBytes = 32, kMemoKeys = 64;
  std::vector<Memo>& keys = space.keys;
  std::array<int8_t, 256> first_key = kNoKeys;  // by first byte (the closing quote for ""): a chain head, -1 if none

  Value key(int& slot) {  // t[p] is the opening quote; slot: the key's memo slot, -1 if none
    size_t start = p + 1;
    if (start < t.size())
      for (int j = first_key[static_cast<unsigned char>(t[start])]; j >= 0; j = keys[j].next) {
        std::string_view b = keys[j].bytes;
        size_t end = start + b.size();
        if (end < t.size() && t[end] == '"' && same_bytes(t.data() + start, b.data(), b.size())) {
          p = end + 1;
          slot = j;
          return keys[j].key;
        }
      }
    slot = -1;
    size_t end = plain_run(t, start, false);
    if (end < t.size() && t[end] == '"') {  // no escapes: not memoised, or the chain would have held it
      p = end + 1;
      return remember(Value(t.substr(start, end - start)), slot);
    }
    p = end;
    std::string k = escaped_string(start);
    if (k.size() <= kMemoKeyBytes)
      for (size_t j = 0; j < keys.size(); ++j)
        if (same_string(keys[j].bytes, k)) {
          slot = static_cast<int>(j);
          return keys[j].key;
        }
    return remember(Value(std::move(k)), slot);
  }
  Value remember(Value v, int& slot) {
    std::string_view b = v.str();
    if (b.size() > kMemoKeyBytes || keys.size() >= kMemoKeys) return v;
    slot = static_cast<int>(keys.size());
    int next = -1;
    if (plain_run(b, 0, false) == b.size()) {  // found in the text only if no byte of it would end or escape a string there
      int8_t& head = first_key[b.empty() ? '"' : static_cast<unsigned char>(b[0])];
      next = head;
      head = static_cast<int8_t>(slot);
    }
    keys.push_back({b, v, next});
    return v;
  }

  // Children of the containers being parsed; each container takes its
  // exact range at the end (one allocation, no regrowth).
  std::vector<Value>& items_stack = space.items;
  std::vector<std::pair<Value, Value>>& pairs_stack = space.pairs;
  static constexpr size_t kScanKeys = 16;  // objects with more keys find repeats through a hash index

  Value object() {  // t[p] is '{'
    ++p;
    size_t base = pairs_stack.size();
    std::unordered_map<std::string_view, size_t> index;  // key -> place, once the object has many keys
    uint64_t seen = 0;                                   // memo slots of the keys so far
    ws();
    if (p < t.size() && t[p] == '}') ++p;
    else {
      while (true) {
        ws();
        if (p >= t.size() || t[p] != '"') fail("expecting property name enclosed in double quotes");
        int slot;
        Value k = key(slot);
        ws();
        if (p >= t.size() || t[p] != ':') fail("expecting ':' delimiter");
        ++p;
        Value v = value();
        // a repeated key keeps its first place and takes the last value, as in Python; a
        // memoised key equals no other key, so only an unseen slot is known new without a
        // search: a scan while the object is small, through `index` after (no quadratic parse)
        size_t i = pairs_stack.size();
        if (slot < 0 || (seen >> slot & 1)) {
          if (pairs_stack.size() - base < kScanKeys) {
            i = base;
            while (i < pairs_stack.size() && pairs_stack[i].first.identity() != k.identity() &&
                   !same_string(pairs_stack[i].first.str(), k.str()))
              ++i;
          } else {
            if (index.empty())
              for (size_t j = base; j < pairs_stack.size(); ++j) index.emplace(pairs_stack[j].first.str(), j);
            auto it = index.find(k.str());
            if (it != index.end()) i = it->second;
          }
        }
        if (slot >= 0) seen |= uint64_t{1} << slot;
        if (i < pairs_stack.size()) {
          pairs_stack[i].second = std::move(v);
        } else {
          pairs_stack.emplace_back(std::move(k), std::move(v));
          if (!index.empty()) index.emplace(pairs_stack.back().first.str(), pairs_stack.size() - 1);
        }
        ws();
        if (p < t.size() && t[p] == ',') { ++p; continue; }
        if (p < t.size() && t[p] == '}') { ++p; break; }
        fail("expecting ',' delimiter");
      }
    }
    Dict d;
    d.items.assign(std::make_move_iterator(pairs_stack.begin() + static_cast<ptrdiff_t>(base)),
                   std::make_move_iterator(pairs_stack.end()));
    pairs_stack.resize(base);
    return Value(std::move(d));
  }

  Value array() {  // t[p] is '['
    ++p;
    size_t base = items_stack.size();
    ws();
    if (p < t.size() && t[p] == ']') ++p;
    else {
      while (true) {
        items_stack.push_back(value());
        ws();
        if (p < t.size() && t[p] == ',') { ++p; continue; }
        if (p < t.size() && t[p] == ']') { ++p; break; }
        fail("expecting ',' delimiter");
      }
    }
    List l(std::make_move_iterator(items_stack.begin() + static_cast<ptrdiff_t>(base)),
           std::make_move_iterator(items_stack.end()));
    items_stack.resize(base);
    return Value(std::move(l));
  }

  Value value() {
    if (++depth > 1000) fail("nesting too deep");
    struct Leave {
      int& depth;
      ~Leave() { --depth; }
    } leave{depth};  // after the value is built in place (returned prvalues are never moved)
    ws();
    if (p >= t.size()) fail("expecting value");
    switch (t[p]) {  // a literal that does not match is read as a number, which names the error
      case '{': return object();
      case '[': return array();
      case '"': return Value(string());
      case 't': return lit("true") ? Value(true) : number();
      case 'f': return lit("false") ? Value(false) : number();
      case 'n': return lit("null") ? Value() : number();
      case 'N': return lit("NaN") ? Value(std::nan("")) : number();
      case 'I': return lit("Infinity") ? Value(HUGE_VAL) : number();
      case '-': return lit("-Infinity") ? Value(-HUGE_VAL) : number();
      default: return number();
    }
  }
};
}  // namespace

Value json_parse_prefix(std::string_view text, size_t& pos) {
  JsonReader r;
  r.t = text;
  r.p = pos;
  Value v = r.value();
  pos = r.p;
  return v;
}

Value json_loads(std::string_view text) {
  JsonReader r;
  r.t = text;
  Value v = r.value();
  r.ws();
  if (r.p != text.size()) r.fail("extra data");
  return v;
}

}  // namespace qforge::chat
