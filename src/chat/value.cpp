// Value: construction, Python equality, json.dumps/loads and repr/str.
#include "qforge/chat/value.hpp"

#include <algorithm>
#include <bit>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <unordered_map>

#include "qforge/error.hpp"

namespace qforge::chat {

// ------------------------------------------------------------------ basics
// Objects are freed with bounded recursion: a list nested 100,000 deep (a
// template can build one) must not overflow the stack when it dies. Past a
// depth, dying objects are queued and freed by the outermost call.
void destroy_obj(Obj* o) {
  thread_local int depth = 0;
  thread_local std::vector<Obj*> queued;
  if (depth >= 64) {
    queued.push_back(o);
    return;
  }
  ++depth;
  delete o;
  if (depth == 1)
    while (!queued.empty()) {
      Obj* q = queued.back();
      queued.pop_back();
      delete q;
    }
  --depth;
}

namespace impl {

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
// sanitizers see every allocation
void* obj_alloc(size_t size) { return ::operator new(size); }
void obj_free(void* p, size_t) noexcept { ::operator delete(p); }
#else
namespace {
// Size classes of 16 bytes up to 128; at most kKeep free blocks each per
// thread (1 MiB at most), the rest go back to the C library. A block freed on
// another thread joins that thread's lists (all came from malloc).
constexpr size_t kClasses = 8, kKeep = 1024;
struct BlockPool {
  struct Block {
    Block* next;
  };
  Block* head[kClasses] = {};
  size_t count[kClasses] = {};
  bool gone = false;  // thread exit: values other thread-locals free later go straight back
  ~BlockPool() {
    gone = true;
    for (auto& h : head)
      while (h) {
        Block* b = h;
        h = b->next;
        std::free(b);
      }
  }
};
thread_local BlockPool pool;
size_t size_class(size_t size) { return (size + 15) / 16 - 1; }
}  // namespace

void* obj_alloc(size_t size) {
  size_t c = size_class(size);
  if (c >= kClasses) return ::operator new(size);
  BlockPool& p = pool;
  if (BlockPool::Block* b = p.head[c]) {
    p.head[c] = b->next;
    --p.count[c];
    return b;
  }
  if (void* m = std::malloc((c + 1) * 16)) return m;
  throw std::bad_alloc();
}

void obj_free(void* ptr, size_t size) noexcept {
  size_t c = size_class(size);
  if (c >= kClasses) return ::operator delete(ptr);
  BlockPool& p = pool;
  if (p.gone || p.count[c] >= kKeep) return std::free(ptr);
  auto* b = static_cast<BlockPool::Block*>(ptr);
  b->next = p.head[c];
  p.head[c] = b;
  ++p.count[c];
}
#endif

const List kEmptyList;
const Dict kEmptyDict;
}  // namespace impl

Value::Value(std::string s) : kind_(Kind::String), p_(nullptr) {
  if (!s.empty()) {
    p_ = new impl::StrObj(std::move(s));
    p_->refs = 1;
  }
}
Value::Value(List l, Kind k) : kind_(k), p_(new impl::ListObj(std::move(l))) { p_->refs = 1; }
Value::Value(Dict d, Kind k) : kind_(k), p_(new impl::DictObj(std::move(d))) { p_->refs = 1; }

Value Value::undefined(std::string hint) {
  Value v(std::move(hint));  // the hint is held like a string
  v.kind_ = Kind::Undefined;
  return v;
}
Value Value::dict() { return Value(Dict{}); }
Value Value::range(int64_t start, int64_t stop, int64_t step, List items) {
  Value v;
  v.kind_ = Kind::List;
  v.p_ = new impl::RangeObj(std::move(items), start, stop, step);
  v.p_->refs = 1;
  return v;
}

static const std::string kEmpty;
const std::string& Value::empty_string() { return kEmpty; }
Dict& Value::dict_mut() {
  QF_CHECK(kind_ == Kind::Dict || kind_ == Kind::Namespace, "value is not a dict");
  return static_cast<impl::DictObj*>(p_)->d;
}
List& Value::list_mut() {
  QF_CHECK(kind_ == Kind::List || kind_ == Kind::Tuple, "value is not a list");
  return static_cast<impl::ListObj*>(p_)->l;
}

void Value::make_immortal() const {
  if (!owns() || (p_->refs & Obj::kImmortal)) return;
  p_->refs |= Obj::kImmortal;
  if (kind_ == Kind::List || kind_ == Kind::Tuple)
    for (auto& x : list()) x.make_immortal();
  else if (kind_ == Kind::Dict || kind_ == Kind::Namespace)
    for (auto& [k, x] : dict_ref().items) {
      k.make_immortal();
      x.make_immortal();
    }
}

const Value* process_values(std::vector<Value> values) {
  auto* kept = new Value[values.size()];
  for (size_t i = 0; i < values.size(); ++i) {
    kept[i] = std::move(values[i]);
    kept[i].make_immortal();
  }
  return kept;
}

void make_mortal(const std::vector<const Value*>& roots) {
  std::unordered_map<Obj*, uint32_t> refs;  // references to each immortal object from within the graph
  std::vector<const Value*> todo(roots.begin(), roots.end());
  while (!todo.empty()) {
    const Value* v = todo.back();
    todo.pop_back();
    auto* o = static_cast<Obj*>(const_cast<void*>(v->identity()));
    if (!o || !(o->refs & Obj::kImmortal) || refs[o]++ > 0) continue;  // children counted once per object
    if (v->is_list() || v->is_tuple())
      for (auto& x : v->list()) todo.push_back(&x);
    else if (v->is_dict() || v->is_namespace())
      for (auto& [k, x] : v->dict_ref().items) {
        todo.push_back(&k);
        todo.push_back(&x);
      }
  }
  for (auto& [o, n] : refs) o->refs = n;
}

Value deep_copy(const Value& v) {
  switch (v.kind()) {
    case Kind::String: return v.is_markup() ? Value::markup(v.str()) : Value(v.str());
    case Kind::Undefined: return Value::undefined(v.str());
    case Kind::List:
    case Kind::Tuple: {
      List l;
      l.reserve(v.list().size());
      for (auto& x : v.list()) l.push_back(deep_copy(x));
      return Value(std::move(l), v.kind());
    }
    case Kind::Dict:
    case Kind::Namespace: {
      Dict d;
      d.items.reserve(v.dict_ref().items.size());
      for (auto& [k, x] : v.dict_ref().items) d.items.emplace_back(deep_copy(k), deep_copy(x));
      return Value(std::move(d), v.kind());
    }
    case Kind::Native: QF_CHECK(false, "template objects cannot be copied to another thread");
    default: return v;
  }
}

bool Value::truthy_slow() const {
  switch (kind_) {
    case Kind::Undefined:
    case Kind::None: return false;
    case Kind::Bool:
    case Kind::Int: return i_ != 0;
    case Kind::Float: return f_ != 0.0;
    case Kind::String: return !str().empty();
    case Kind::List:
    case Kind::Tuple: return !list().empty();
    case Kind::Dict: return !dict_ref().items.empty();
    default: return true;
  }
}

const Value* Value::get(std::string_view key) const {
  if (kind_ != Kind::Dict && kind_ != Kind::Namespace) return nullptr;
  return dict_ref().find(key);
}
void Value::set(Value key, Value v) { dict_mut().set(std::move(key), std::move(v)); }
void Value::push_back(Value v) { list_mut().push_back(std::move(v)); }

size_t Value::size() const {
  switch (kind_) {
    case Kind::String: return utf8_length(str());
    case Kind::List:
    case Kind::Tuple: return list().size();
    case Kind::Dict:
    case Kind::Namespace: return dict_ref().items.size();
    default: return 0;
  }
}

const char* Value::type_name() const {
  switch (kind_) {
    case Kind::Undefined: return "Undefined";
    case Kind::None: return "NoneType";
    case Kind::Bool: return "bool";
    case Kind::Int: return "int";
    case Kind::Float: return "float";
    case Kind::String: return markup_ ? "Markup" : "str";
    case Kind::List: return range_obj() ? "range" : "list";
    case Kind::Tuple: return "tuple";
    case Kind::Dict: return "dict";
    case Kind::Namespace: return "Namespace";
    case Kind::Native: return native()->type_name();
  }
  return "object";
}

const Value* Dict::find(const Value& key) const {
  if (key.is_string()) return find(std::string_view(key.str()));
  for (auto& kv : items)
    if (py_equal(kv.first, key)) return &kv.second;
  return nullptr;
}
Value* Dict::find(const Value& key) { return const_cast<Value*>(static_cast<const Dict*>(this)->find(key)); }
const Value* Dict::find(std::string_view key) const {
  for (auto& kv : items) {
    if (!kv.first.is_string()) continue;
    if (same_string(kv.first.str(), key)) return &kv.second;
  }
  return nullptr;
}
void Dict::set(Value key, Value v) {
  if (Value* slot = find(key)) {
    *slot = std::move(v);
    return;
  }
  items.emplace_back(std::move(key), std::move(v));
}

static bool py_equal_rec(const Value& a, const Value& b, int depth);
bool py_equal_slow(const Value& a, const Value& b) { return py_equal_rec(a, b, 0); }

static bool py_equal_rec(const Value& a, const Value& b, int depth) {
  QF_CHECK(depth < 1000, "maximum recursion depth exceeded in comparison");
  if (a.is_number() && b.is_number()) {
    if (a.is_float() || b.is_float()) return a.as_float() == b.as_float();
    return a.as_int() == b.as_int();
  }
  if (a.kind() != b.kind()) return false;
  if ((a.range_obj() == nullptr) != (b.range_obj() == nullptr)) return false;  // range(2) != [0, 1]
  switch (a.kind()) {
    case Kind::Undefined:
    case Kind::None: return true;
    case Kind::String: return same_string(a.str(), b.str());
    case Kind::List:
    case Kind::Tuple: {
      auto& x = a.list();
      auto& y = b.list();
      if (x.size() != y.size()) return false;
      for (size_t i = 0; i < x.size(); ++i)
        if (!py_equal_rec(x[i], y[i], depth + 1)) return false;
      return true;
    }
    case Kind::Dict: {
      auto& x = a.dict_ref().items;
      auto& y = b.dict_ref();
      if (x.size() != y.items.size()) return false;
      for (auto& kv : x) {
        const Value* o = y.find(kv.first);
        if (!o || !py_equal_rec(kv.second, *o, depth + 1)) return false;
      }
      return true;
    }
    default: return a.identity() == b.identity();
  }
}

// ------------------------------------------------------------------- UTF-8
size_t utf8_length(std::string_view s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

std::vector<uint32_t> utf8_decode(std::string_view s) {
  std::vector<uint32_t> out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    unsigned char c = s[i];
    uint32_t cp;
    int len;
    if (c < 0x80) { cp = c; len = 1; }
    else if ((c >> 5) == 6) { cp = c & 0x1F; len = 2; }
    else if ((c >> 4) == 14) { cp = c & 0x0F; len = 3; }
    else if ((c >> 3) == 30) { cp = c & 0x07; len = 4; }
    else { cp = 0xFFFD; len = 1; }
    if (i + len > s.size()) { cp = 0xFFFD; len = 1; }
    for (int k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    out.push_back(cp);
    i += len;
  }
  return out;
}

void utf8_append(std::string& out, uint32_t cp) {
  if (cp < 0x80) out += static_cast<char>(cp);
  else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

bool py_isspace(uint32_t c) {
  return c == ' ' || (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x1f) || c == 0x85 || c == 0xa0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

std::string_view py_strip(std::string_view s, bool left, bool right) {
  auto cp_at = [&](size_t i, size_t& len) -> uint32_t {
    unsigned char c = s[i];
    if (c < 0x80) {
      len = 1;
      return c;
    }
    size_t j = i + 1;
    while (j < s.size() && (static_cast<unsigned char>(s[j]) & 0xC0) == 0x80) ++j;
    len = j - i;
    auto cps = utf8_decode(s.substr(i, len));
    return cps.empty() ? 0xFFFD : cps[0];
  };
  size_t a = 0, b = s.size(), len = 1;
  if (left)
    while (a < b && py_isspace(cp_at(a, len))) a += len;
  if (right)
    while (b > a) {
      size_t start = b - 1;
      while (start > a && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
      if (!py_isspace(cp_at(start, len))) break;
      b = start;
    }
  return s.substr(a, b - a);
}

// ------------------------------------------------------------------- floats
std::string float_repr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  if (d == 0) return std::signbit(d) ? "-0.0" : "0.0";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  std::string s(buf, r.ptr);
  // s = [-]d[.ddd]e[+-]XX
  bool neg = s[0] == '-';
  if (neg) s.erase(0, 1);
  size_t e = s.find('e');
  int exp = std::stoi(s.substr(e + 1));
  std::string digits;
  for (size_t i = 0; i < e; ++i)
    if (s[i] != '.') digits += s[i];
  std::string out = neg ? "-" : "";
  if (exp >= -5 && exp < 16) {  // Python's repr switches to exponent outside [1e-4, 1e16)
    if (exp < -4) goto sci;
    if (exp < 0) {
      out += "0.";
      out.append(static_cast<size_t>(-exp - 1), '0');
      out += digits;
    } else if (static_cast<int>(digits.size()) <= exp + 1) {
      out += digits;
      out.append(static_cast<size_t>(exp + 1 - static_cast<int>(digits.size())), '0');
      out += ".0";
    } else {
      out += digits.substr(0, exp + 1);
      out += '.';
      out += digits.substr(exp + 1);
    }
    return out;
  }
sci:
  out += digits[0];
  if (digits.size() > 1) {
    out += '.';
    out += digits.substr(1);
  }
  out += 'e';
  out += exp < 0 ? '-' : '+';
  int ae = exp < 0 ? -exp : exp;
  if (ae < 10) out += '0';
  out += std::to_string(ae);
  return out;
}

// --------------------------------------------------------------- json.dumps
// The first byte at or after s[i] that JSON must treat specially: '"', '\\',
// a control character, or (when `ascii`) anything from 0x7f up. Eight bytes
// at a time (SWAR): most of a chat is plain string content.
static size_t plain_run(std::string_view s, size_t i, bool ascii) {
  static_assert(std::endian::native == std::endian::little, "the first hit is found by trailing zeros");
  constexpr uint64_t ones = 0x0101010101010101ull, highs = 0x8080808080808080ull;
  const size_t n = s.size();
  while (i + 8 <= n) {
    uint64_t w;
    std::memcpy(&w, s.data() + i, 8);
    uint64_t quote = w ^ (ones * '"'), slash = w ^ (ones * '\\');
    // a byte's high bit is set when it is zero in quote/slash, or < 0x20 in w (bytes >= 0x80 masked by ~w)
    uint64_t hit = ((quote - ones) & ~quote) | ((slash - ones) & ~slash) | ((w - ones * 0x20) & ~w);
    if (ascii) {
      uint64_t del = w ^ (ones * 0x7f);
      hit |= w | ((del - ones) & ~del);
    }
    hit &= highs;
    if (hit) return i + static_cast<size_t>(std::countr_zero(hit) >> 3);
    i += 8;
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

// ---------------------------------------------------------------- repr/str
static bool py_printable(uint32_t cp) {
  if (cp < 0x20 || cp == 0x7f) return false;
  if (cp >= 0x80 && cp < 0xA0) return false;
  if (cp == 0xAD) return false;
  if (cp >= 0x2028 && cp <= 0x2029) return false;
  if (cp >= 0x2000 && cp <= 0x200F) return false;  // Zs spaces and Cf marks
  if (cp >= 0x202A && cp <= 0x202F) return false;
  if (cp >= 0x2060 && cp <= 0x206F) return false;
  if (cp == 0xFEFF || cp == 0x3000 || cp == 0x1680 || cp == 0x205F || cp == 0xA0) return false;
  if (cp >= 0xD800 && cp <= 0xDFFF) return false;
  if (cp >= 0xE000 && cp <= 0xF8FF) return false;
  if (cp == 0xFFFE || cp == 0xFFFF) return false;
  return true;
}

static void repr_string(std::string& out, const std::string& s) {
  bool has_single = s.find('\'') != std::string::npos;
  bool has_double = s.find('"') != std::string::npos;
  char q = (has_single && !has_double) ? '"' : '\'';
  out += q;
  static const char* hex = "0123456789abcdef";
  for (uint32_t cp : utf8_decode(s)) {
    if (cp == static_cast<uint32_t>(q) || cp == '\\') {
      out += '\\';
      out += static_cast<char>(cp);
    } else if (cp == '\n') out += "\\n";
    else if (cp == '\r') out += "\\r";
    else if (cp == '\t') out += "\\t";
    else if (!py_printable(cp)) {
      if (cp < 0x100) {
        out += "\\x";
        out += hex[cp >> 4];
        out += hex[cp & 0xF];
      } else if (cp < 0x10000) {
        out += "\\u";
        for (int k = 3; k >= 0; --k) out += hex[(cp >> (4 * k)) & 0xF];
      } else {
        out += "\\U";
        for (int k = 7; k >= 0; --k) out += hex[(cp >> (4 * k)) & 0xF];
      }
    } else {
      utf8_append(out, cp);
    }
  }
  out += q;
}

static void range_repr(std::string& out, const impl::RangeObj& r) {
  out += "range(";
  out += std::to_string(r.start);
  out += ", ";
  out += std::to_string(r.stop);
  if (r.step != 1) {
    out += ", ";
    out += std::to_string(r.step);
  }
  out += ')';
}

static void repr_to(std::string& out, const Value& v, int depth) {
  QF_CHECK(depth < 512, "repr: nesting too deep");
  if (const impl::RangeObj* r = v.range_obj()) return range_repr(out, *r);
  switch (v.kind()) {
    case Kind::String: repr_string(out, v.str()); return;
    case Kind::List:
    case Kind::Tuple: {
      bool tup = v.is_tuple();
      out += tup ? '(' : '[';
      auto& l = v.list();
      for (size_t i = 0; i < l.size(); ++i) {
        if (i) out += ", ";
        repr_to(out, l[i], depth + 1);
      }
      if (tup && l.size() == 1) out += ',';
      out += tup ? ')' : ']';
      return;
    }
    case Kind::Dict:
    case Kind::Namespace: {
      bool ns = v.is_namespace();
      out += ns ? "<Namespace {" : "{";
      bool first = true;
      for (auto& kv : v.dict_ref().items) {
        if (!first) out += ", ";
        first = false;
        repr_to(out, kv.first, depth + 1);
        out += ": ";
        repr_to(out, kv.second, depth + 1);
      }
      out += ns ? "}>" : "}";
      return;
    }
    case Kind::Undefined: out += "Undefined"; return;
    default: py_str_to(out, v);
  }
}

void py_str_to(std::string& out, const Value& v) {
  switch (v.kind()) {
    case Kind::Undefined: return;
    case Kind::None: out += "None"; return;
    case Kind::Bool: out += v.as_bool() ? "True" : "False"; return;
    case Kind::Int: {
      char buf[24];
      auto r = std::to_chars(buf, buf + sizeof buf, v.as_int());
      out.append(buf, r.ptr);
      return;
    }
    case Kind::Float: out += float_repr(v.as_float()); return;
    case Kind::String: out += v.str(); return;
    case Kind::Native: out += "<"; out += v.type_name(); out += " object>"; return;
    default: repr_to(out, v, 0);
  }
}

std::string py_str(const Value& v) {
  std::string out;
  py_str_to(out, v);
  return out;
}

std::string py_repr(const Value& v) {
  std::string out;
  repr_to(out, v, 0);
  return out;
}

// --------------------------------------------------------------- json.loads
namespace {
struct JsonReader {
  std::string_view t;
  size_t p = 0;
  int depth = 0;

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
      char c = t[p++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else fail("bad \\u escape");
    }
    return v;
  }
  std::string string() {
    ++p;  // opening quote
    size_t run = p;
    p = plain_run(t, p, false);
    if (p < t.size() && t[p] == '"') {  // no escapes: one copy
      std::string s(t.data() + run, p - run);
      ++p;
      return s;
    }
    std::string s(t.data() + run, p - run);
    while (true) {
      if (p >= t.size()) fail("unterminated string");
      run = p;
      p = plain_run(t, p, false);
      s.append(t.data() + run, p - run);
      if (p >= t.size()) fail("unterminated string");
      char c = t[p++];
      if (c == '"') break;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
      if (p >= t.size()) fail("unterminated string");
      char e = t[p++];
      switch (e) {
        case '"': s += '"'; break;
        case '\\': s += '\\'; break;
        case '/': s += '/'; break;
        case 'b': s += '\b'; break;
        case 'f': s += '\f'; break;
        case 'n': s += '\n'; break;
        case 'r': s += '\r'; break;
        case 't': s += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && p + 1 < t.size() && t[p] == '\\' && t[p + 1] == 'u') {
            size_t save = p;
            p += 2;
            uint32_t lo = hex4();
            if (lo >= 0xDC00 && lo < 0xE000) cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            else p = save;
          }
          utf8_append(s, cp);
          break;
        }
        default: --p; fail("invalid escape");
      }
    }
    return s;
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
  bool lit(const char* w) {
    size_t n = std::strlen(w);
    if (t.substr(p, n) == w) {
      p += n;
      return true;
    }
    return false;
  }
  // Object keys repeat ("role", "content", ...): one Value per distinct
  // short key within a document, as CPython's decoder memoises keys.
  std::vector<Value> keys;
  Value key(std::string k) {
    if (k.size() > 32) return Value(std::move(k));
    for (auto& v : keys)
      if (v.str() == k) return v;
    Value v(std::move(k));
    if (keys.size() < 64) keys.push_back(v);
    return v;
  }

  // Children of the containers being parsed; each container takes its
  // exact range at the end (one allocation, no regrowth).
  std::vector<Value> items_stack;
  std::vector<std::pair<Value, Value>> pairs_stack;
  static constexpr size_t kScanKeys = 16;  // objects with more keys find repeats through a hash index

  Value value() {
    if (++depth > 1000) fail("nesting too deep");
    ws();
    if (p >= t.size()) fail("expecting value");
    Value out;
    char c = t[p];
    if (c == '{') {
      ++p;
      size_t base = pairs_stack.size();
      std::unordered_map<std::string_view, size_t> index;  // key -> place, once the object has many keys
      ws();
      if (p < t.size() && t[p] == '}') ++p;
      else {
        while (true) {
          ws();
          if (p >= t.size() || t[p] != '"') fail("expecting property name enclosed in double quotes");
          Value k = key(string());
          ws();
          if (p >= t.size() || t[p] != ':') fail("expecting ':' delimiter");
          ++p;
          Value v = value();
          // a repeated key keeps its first place and takes the last value, as in Python;
          // found by a scan while the object is small, through `index` after (no quadratic parse)
          size_t i = base;
          if (pairs_stack.size() - base < kScanKeys) {
            while (i < pairs_stack.size() && pairs_stack[i].first.identity() != k.identity() &&
                   pairs_stack[i].first.str() != k.str())
              ++i;
          } else {
            if (index.empty())
              for (size_t j = base; j < pairs_stack.size(); ++j) index.emplace(pairs_stack[j].first.str(), j);
            auto it = index.find(k.str());
            i = it == index.end() ? pairs_stack.size() : it->second;
          }
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
      out = Value(std::move(d));
    } else if (c == '[') {
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
      out = Value(std::move(l));
    } else if (c == '"') {
      out = Value(string());
    } else if (lit("true")) out = Value(true);
    else if (lit("false")) out = Value(false);
    else if (lit("null")) out = Value();
    else if (lit("NaN")) out = Value(std::nan(""));
    else if (lit("Infinity")) out = Value(HUGE_VAL);
    else if (lit("-Infinity")) out = Value(-HUGE_VAL);
    else out = number();
    --depth;
    return out;
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
