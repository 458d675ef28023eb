// Value: construction, Python equality, UTF-8 and str.strip (JSON in json.cpp, repr/str in py_repr.cpp).
#include "qforge/chat/value.hpp"

#include <cstdlib>
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

}  // namespace qforge::chat
