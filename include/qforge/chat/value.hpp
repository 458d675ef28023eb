// A JSON-and-Python value: what chat messages, tools and Jinja template values
// are made of. Serialises exactly like Python: json.dumps (any indent,
// separators, sort_keys, ensure_ascii) and str()/repr() of None, bools, ints,
// floats (shortest round-trip repr), strings, lists, tuples and dicts.
// Lists and dicts are shared, immutable once built (the Jinja sandbox never
// mutates them); dicts keep insertion order like Python's.
//
// A Value is 16 bytes: a kind and a number or a pointer to a reference-counted
// object. The counts are plain integers, as in CPython: a value graph belongs
// to one thread at a time (deep_copy() makes a private copy for another
// thread). Values reachable from a compiled Template are immortal (never
// counted), so one Template renders on many threads at once.
#pragma once
#include "qforge/export.hpp"
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace qforge::chat {

class Value;
using List = std::vector<Value>;
struct Dict;

namespace impl {
// Blocks for objects, recycled per thread: reading one conversation or
// rendering it makes and drops dozens of strings, lists and dicts of a few
// sizes, more than the C library's per-thread cache holds (value.cpp).
QFORGE_API void* obj_alloc(size_t size);
QFORGE_API void obj_free(void* p, size_t size) noexcept;
struct RangeObj;
}  // namespace impl

// What a Value points at: strings, lists, dicts and template objects.
struct QFORGE_API Obj {
  static constexpr uint32_t kImmortal = 0x80000000u;
  uint32_t refs = 0;
  Obj() = default;
  Obj(const Obj&) = delete;
  Obj& operator=(const Obj&) = delete;
  virtual ~Obj() = default;
  // `delete obj` passes the dynamic type's size (virtual destructor)
  static void* operator new(size_t size) { return impl::obj_alloc(size); }
  static void operator delete(void* p, size_t size) noexcept { impl::obj_free(p, size); }
};
QFORGE_API void destroy_obj(Obj* o);  // delete, iteratively for deep nesting (value.cpp)
inline void retain(Obj* o) {
  if (!(o->refs & Obj::kImmortal)) ++o->refs;
}
inline void release(Obj* o) {
  if (!(o->refs & Obj::kImmortal) && --o->refs == 0) destroy_obj(o);
}

// Template-only objects (callables, the loop object, ...) derive from this.
struct QFORGE_API Native : Obj {
  virtual const char* type_name() const = 0;
};

enum class Kind : uint8_t {
  Undefined,  // jinja2's Undefined: prints '', falsy, errors on most uses
  None,
  Bool,
  Int,
  Float,
  String,
  List,
  Tuple,
  Dict,
  Namespace,  // jinja2 namespace(): a dict whose attributes can be assigned
  Native,     // macros, builtin functions, loop objects
};

class QFORGE_API Value {
 public:
  Value() : kind_(Kind::None), i_(0) {}
  Value(std::nullptr_t) : Value() {}
  Value(bool b) : kind_(Kind::Bool), i_(b) {}
  Value(int v) : kind_(Kind::Int), i_(v) {}
  Value(int64_t v) : kind_(Kind::Int), i_(v) {}
  Value(double v) : kind_(Kind::Float), f_(v) {}
  Value(const char* s) : Value(std::string(s)) {}
  Value(std::string_view s) : Value(std::string(s)) {}
  Value(std::string s);
  Value(List l, Kind k = Kind::List);
  Value(Dict d, Kind k = Kind::Dict);
  // Takes a new Native (refs == 0) or shares one.
  explicit Value(Native* n) : kind_(Kind::Native), p_(n) { retain(n); }

  Value(const Value& o) : kind_(o.kind_), markup_(o.markup_), i_(o.i_) {
    if (owns()) retain(p_);
  }
  Value(Value&& o) noexcept : kind_(o.kind_), markup_(o.markup_), i_(o.i_) { o.kind_ = Kind::None; }
  Value& operator=(const Value& o) {
    Value tmp(o);
    swap(tmp);
    return *this;
  }
  Value& operator=(Value&& o) noexcept {
    Value tmp(std::move(o));
    swap(tmp);
    return *this;
  }
  ~Value() {
    if (owns()) release(p_);
  }
  void swap(Value& o) noexcept {
    std::swap(kind_, o.kind_);
    std::swap(markup_, o.markup_);
    std::swap(i_, o.i_);
  }

  // An Undefined; `hint` is jinja2's message for it ("'x' is undefined").
  static Value undefined(std::string hint = {});
  static Value tuple(List l) { return Value(std::move(l), Kind::Tuple); }
  // range(start, stop, step) holding its items: a list to every reader but
  // str(), ==, json.dumps, + and * (as Python's range)
  static Value range(int64_t start, int64_t stop, int64_t step, List items);
  const impl::RangeObj* range_obj() const;  // nullptr unless a range
  static Value dict();
  // markupsafe.Markup (from |safe / |escape): a str whose + escapes the other side
  static Value markup(std::string s) {
    Value v(std::move(s));
    v.markup_ = true;
    return v;
  }
  bool is_markup() const { return markup_; }

  Kind kind() const { return kind_; }
  bool is_undefined() const { return kind_ == Kind::Undefined; }
  bool is_none() const { return kind_ == Kind::None; }
  bool is_bool() const { return kind_ == Kind::Bool; }
  bool is_int() const { return kind_ == Kind::Int; }
  bool is_float() const { return kind_ == Kind::Float; }
  bool is_number() const { return kind_ == Kind::Int || kind_ == Kind::Float || kind_ == Kind::Bool; }
  bool is_string() const { return kind_ == Kind::String; }
  bool is_list() const { return kind_ == Kind::List; }
  bool is_tuple() const { return kind_ == Kind::Tuple; }
  bool is_sequence() const { return kind_ == Kind::List || kind_ == Kind::Tuple; }
  bool is_dict() const { return kind_ == Kind::Dict; }
  bool is_namespace() const { return kind_ == Kind::Namespace; }
  bool is_mapping() const { return kind_ == Kind::Dict; }
  bool is_native() const { return kind_ == Kind::Native; }

  bool as_bool() const { return i_ != 0; }
  int64_t as_int() const { return i_; }
  double as_float() const { return kind_ == Kind::Float ? f_ : static_cast<double>(i_); }
  // String (or the Undefined's hint); "" otherwise
  inline const std::string& str() const;
  static const std::string& empty_string();
  inline const List& list() const;      // List or Tuple
  inline const Dict& dict_ref() const;  // Dict or Namespace
  Dict& dict_mut();                     // only while building / for namespaces
  List& list_mut();                     // only while building
  Native* native() const { return kind_ == Kind::Native ? static_cast<Native*>(p_) : nullptr; }
  const void* identity() const { return owns() ? p_ : nullptr; }
  // Whether this is the only reference to its object (false for immortals).
  bool is_unique() const { return owns() && p_->refs == 1; }

  // Python truthiness (Undefined is falsy).
  bool truthy() const { return kind_ == Kind::Bool ? i_ != 0 : truthy_slow(); }

  // Dict helpers: lookup by string key (nullptr when absent); set keeps order.
  const Value* get(std::string_view key) const;
  void set(Value key, Value v);
  void push_back(Value v);
  size_t size() const;  // items of a list/tuple/dict, code points of a string

  // Python's type name, as jinja2 reports it ("str", "dict", "list", ...).
  const char* type_name() const;

  // Never counted or freed from now on (with everything it reaches): for
  // values a compiled template holds and many threads read.
  void make_immortal() const;

 private:
  bool truthy_slow() const;
  bool owns() const { return (kind_ >= Kind::String || kind_ == Kind::Undefined) && p_; }
  Kind kind_;
  bool markup_ = false;
  union {
    int64_t i_;
    double f_;
    Obj* p_;
  };
};

struct QFORGE_API Dict {
  std::vector<std::pair<Value, Value>> items;
  const Value* find(const Value& key) const;
  Value* find(const Value& key);
  const Value* find(std::string_view key) const;
  void set(Value key, Value v);
};

namespace impl {
struct QFORGE_API StrObj : Obj {
  std::string s;
  explicit StrObj(std::string x) : s(std::move(x)) {}
};
struct QFORGE_API ListObj : Obj {
  bool is_range = false;  // a RangeObj
  List l;
  explicit ListObj(List&& x) : l(std::move(x)) {}
};
// Python's range(start, stop, step): its items, held as a list, and the
// arguments that str() prints ("range(0, 3)").
struct QFORGE_API RangeObj : ListObj {
  int64_t start, stop, step;
  RangeObj(List&& x, int64_t b, int64_t e, int64_t s) : ListObj(std::move(x)), start(b), stop(e), step(s) {
    is_range = true;
  }
};
struct QFORGE_API DictObj : Obj {
  Dict d;
  explicit DictObj(Dict&& x) : d(std::move(x)) {}
};
extern QFORGE_API const List kEmptyList;
extern QFORGE_API const Dict kEmptyDict;
}  // namespace impl

inline const std::string& Value::str() const {
  if ((kind_ == Kind::String || kind_ == Kind::Undefined) && p_) return static_cast<const impl::StrObj*>(p_)->s;
  return empty_string();
}
inline const List& Value::list() const {
  if (kind_ == Kind::List || kind_ == Kind::Tuple) return static_cast<const impl::ListObj*>(p_)->l;
  return impl::kEmptyList;
}
inline const impl::RangeObj* Value::range_obj() const {
  if (kind_ == Kind::List && static_cast<const impl::ListObj*>(p_)->is_range) return static_cast<const impl::RangeObj*>(p_);
  return nullptr;
}
inline const Dict& Value::dict_ref() const {
  if (kind_ == Kind::Dict || kind_ == Kind::Namespace) return static_cast<const impl::DictObj*>(p_)->d;
  return impl::kEmptyDict;
}

// Values made once for the whole process and shared by every render on
// every thread: immortal and never freed (kept reachable, so leak checkers
// stay quiet). Returns the first of them.
QFORGE_API const Value* process_values(std::vector<Value> values);

// Undoes make_immortal() for everything `roots` reach, counting the
// references among them: once every root is gone, all of it is freed (a
// compiled Template's constants, when the Template goes).
QFORGE_API void make_mortal(const std::vector<const Value*>& roots);

// A copy sharing nothing with `v` (for handing values to another thread).
QFORGE_API Value deep_copy(const Value& v);

// Byte equality of two short runs, without a call: dict keys and the strings
// templates compare are a few bytes long.
inline bool same_bytes(const char* a, const char* b, size_t n) {
  auto load8 = [](const char* p) { uint64_t w; std::memcpy(&w, p, 8); return w; };
  auto load4 = [](const char* p) { uint32_t w; std::memcpy(&w, p, 4); return w; };
  if (n >= 8) {
    for (size_t i = 0; i + 8 < n; i += 8)
      if (load8(a + i) != load8(b + i)) return false;
    return load8(a + n - 8) == load8(b + n - 8);
  }
  if (n >= 4) return load4(a) == load4(b) && load4(a + n - 4) == load4(b + n - 4);
  for (size_t i = 0; i < n; ++i)
    if (a[i] != b[i]) return false;
  return true;
}
inline bool same_string(std::string_view a, std::string_view b) {
  return a.size() == b.size() && same_bytes(a.data(), b.data(), a.size());
}

// Python == between values (1 == 1.0 == True, deep for lists/dicts).
QFORGE_API bool py_equal_slow(const Value& a, const Value& b);
inline bool py_equal(const Value& a, const Value& b) {
  if (a.is_string() && b.is_string()) return same_string(a.str(), b.str());
  return py_equal_slow(a, b);
}

// json.dumps(v, ensure_ascii, indent, separators, sort_keys). indent: nullptr
// for None, else the per-level indent string (Python turns an int n into n
// spaces). separators: {item, key}; defaults follow Python (", " ": " without
// indent, "," ": " with). Throws InvalidArgument for values JSON cannot hold
// (Undefined, callables), with Python's message.
struct QFORGE_API DumpOptions {
  bool ensure_ascii = false;
  const std::string* indent = nullptr;
  const std::string* item_separator = nullptr;
  const std::string* key_separator = nullptr;
  bool sort_keys = false;
};
QFORGE_API std::string json_dumps(const Value& v, const DumpOptions& opt = {});
QFORGE_API void json_dumps_to(std::string& out, const Value& v, const DumpOptions& opt = {});

// Python's repr() and str() of a value (str of a string is the string).
QFORGE_API std::string py_repr(const Value& v);
QFORGE_API std::string py_str(const Value& v);
QFORGE_API void py_str_to(std::string& out, const Value& v);
QFORGE_API std::string float_repr(double d);

// json.loads: objects keep key order, ints that fit int64 stay ints.
// Throws InvalidArgument naming the offset of the first error.
QFORGE_API Value json_loads(std::string_view text);
// Parses one JSON value at text[pos...]; advances pos past it (no trailing check).
QFORGE_API Value json_parse_prefix(std::string_view text, size_t& pos);

// Python's str.strip()/lstrip()/rstrip() with no argument (Unicode whitespace).
QFORGE_API std::string_view py_strip(std::string_view s, bool left = true, bool right = true);
QFORGE_API bool py_isspace(uint32_t cp);

// UTF-8 helpers (code points as Python counts them).
QFORGE_API size_t utf8_length(std::string_view s);
QFORGE_API std::vector<uint32_t> utf8_decode(std::string_view s);
QFORGE_API void utf8_append(std::string& out, uint32_t cp);

}  // namespace qforge::chat
