// Python's marshal format (version 4) for the JSON-like types: how the Python
// layer hands conversations to the engine. marshal.dumps is 4x faster than
// json.dumps on chat messages, and keeps tuples as tuples (as jinja2 sees
// them). Only data types are read: code objects, bytes, sets and the like are
// refused with the offset where they appear.
#include <bit>
#include <cmath>
#include <cstring>
#include <iterator>

#include "qforge/chat/value.hpp"
#include "qforge/error.hpp"

namespace qforge::chat {

namespace {

// Working space of a read, kept per thread across documents (one per conversation).
struct Scratch {
  std::vector<Value> refs;  // FLAG_REF objects, in the order the writer flagged them
  std::vector<bool> ready;  // false while a flagged container is still being read
  std::vector<std::pair<Value, Value>> items;  // the dicts being read (marshal gives no size): sized once at the end
  void clear() {
    refs.clear();
    ready.clear();
    items.clear();
  }
};

struct MarshalReader {
  std::string_view t;
  std::vector<Value>& refs;
  std::vector<bool>& ready;
  std::vector<std::pair<Value, Value>>& items;
  size_t p = 0;
  int depth = 0;

  [[noreturn]] void fail(const std::string& what) {
    throw InvalidArgument(detail::concat("invalid marshal data: ", what, " at offset ", p));
  }
  void need(size_t n) {
    if (t.size() - p < n) fail("truncated");
  }
  uint8_t u8() {
    need(1);
    return static_cast<uint8_t>(t[p++]);
  }
  int32_t i32() {
    static_assert(std::endian::native == std::endian::little, "marshal integers are little-endian");
    need(4);
    int32_t v;
    std::memcpy(&v, t.data() + p, 4);
    p += 4;
    return v;
  }
  size_t length() {
    int32_t n = i32();
    if (n < 0) fail("negative length");
    return static_cast<size_t>(n);
  }
  std::string bytes(size_t n) {
    need(n);
    std::string s(t.data() + p, n);
    p += n;
    return s;
  }
  // TYPE_LONG: signed count of 15-bit digits, least significant first
  Value big_int() {
    int32_t n = i32();
    size_t count = static_cast<size_t>(n < 0 ? -static_cast<int64_t>(n) : n);
    need(2 * count);
    double d = 0, scale = 1;
    unsigned __int128 acc = 0;
    bool fits = count <= 5;  // 75 bits hold any int64
    for (size_t k = 0; k < count; ++k) {
      uint16_t digit;
      std::memcpy(&digit, t.data() + p + 2 * k, 2);
      if (digit >= (1u << 15)) fail("bad long digit");
      d += digit * scale;
      scale *= 32768.0;
      if (fits) acc |= static_cast<unsigned __int128>(digit) << (15 * k);
    }
    p += 2 * count;
    if (fits) {
      if (n >= 0 && acc <= static_cast<unsigned __int128>(INT64_MAX)) return Value(static_cast<int64_t>(acc));
      if (n < 0 && acc <= static_cast<unsigned __int128>(INT64_MAX) + 1) return Value(static_cast<int64_t>(-acc));
    }
    return Value(n < 0 ? -d : d);  // beyond int64: a float, as the JSON reader does
  }

  Value value() {
    if (++depth > 1000) fail("nesting too deep");
    uint8_t code = u8();
    bool flag = code & 0x80;
    char type = static_cast<char>(code & 0x7f);
    size_t slot = refs.size();
    if (flag) {
      refs.emplace_back();
      ready.push_back(false);
    }
    Value v;
    switch (type) {
      case 'N': break;
      case 'T': v = Value(true); break;
      case 'F': v = Value(false); break;
      case 'i': v = Value(static_cast<int64_t>(i32())); break;
      case 'l': v = big_int(); break;
      case 'g': {
        need(8);
        double d;
        std::memcpy(&d, t.data() + p, 8);
        p += 8;
        v = Value(d);
        break;
      }
      case 'z':
      case 'Z': v = Value(bytes(u8())); break;
      case 'a':
      case 'A':
      case 'u':
      case 't': v = Value(bytes(length())); break;
      case 'r': {
        size_t i = length();
        if (i >= refs.size() || !ready[i]) fail("reference to an object not yet read (a recursive structure?)");
        v = refs[i];
        break;
      }
      case '[':
      case '(':
      case ')': {
        size_t n = type == ')' ? u8() : length();
        if (n > t.size() - p) fail("list longer than the data");
        List items;
        items.reserve(n);
        for (size_t i = 0; i < n; ++i) items.push_back(value());
        v = Value(std::move(items), type == '[' ? Kind::List : Kind::Tuple);
        break;
      }
      case '{': {
        size_t start = items.size();
        while (true) {
          need(1);
          if (t[p] == '0') {
            ++p;
            break;
          }
          Value k = value();
          if (k.is_list() || k.is_dict()) fail("unhashable dict key");
          Value item = value();
          items.emplace_back(std::move(k), std::move(item));  // marshal writes each key once
        }
        Dict d;
        d.items.assign(std::make_move_iterator(items.begin() + static_cast<std::ptrdiff_t>(start)),
                       std::make_move_iterator(items.end()));
        items.resize(start);
        v = Value(std::move(d));
        break;
      }
      default:
        --p;
        fail(detail::concat("unsupported type code '", type, "' (only None, bool, int, float, str, list, tuple and "
                            "dict are chat data)"));
    }
    if (flag) {
      refs[slot] = v;
      ready[slot] = true;
    }
    --depth;
    return v;
  }
};

}  // namespace

Value marshal_loads(std::string_view data) {
  thread_local Scratch scratch;
  struct Release {  // what the document's values hold goes with it, also on errors
    Scratch& s;
    ~Release() { s.clear(); }
  } release{scratch};
  MarshalReader r{data, scratch.refs, scratch.ready, scratch.items};
  Value v = r.value();
  if (r.p != data.size()) r.fail("extra data");
  return v;
}

}  // namespace qforge::chat
