// jinja2's builtin filters and tests, transformers' globals, and the Python
// str/list/dict methods templates call, with Python's semantics.
#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <ctime>
#include <unordered_map>
#include <unordered_set>

#include "jinja_rt.hpp"

namespace qforge::chat {

namespace {

// ------------------------------------------------------------ text helpers
uint32_t cp_upper(uint32_t c) {
  if (c >= 'a' && c <= 'z') return c - 32;
  if (c < 0x80) return c;
  if ((c >= 0xe0 && c <= 0xfe && c != 0xf7)) return c - 32;
  if (c >= 0x3b1 && c <= 0x3c9 && c != 0x3c2) return c - 32;
  if (c >= 0x430 && c <= 0x44f) return c - 32;
  if (c >= 0x450 && c <= 0x45f) return c - 80;
  return c;
}
uint32_t cp_lower(uint32_t c) {
  if (c >= 'A' && c <= 'Z') return c + 32;
  if (c < 0x80) return c;
  if ((c >= 0xc0 && c <= 0xde && c != 0xd7)) return c + 32;
  if (c >= 0x391 && c <= 0x3a9 && c != 0x3a2) return c + 32;
  if (c >= 0x410 && c <= 0x42f) return c + 32;
  if (c >= 0x400 && c <= 0x40f) return c + 80;
  return c;
}
bool cp_isupper(uint32_t c) { return cp_lower(c) != c; }
bool cp_islower(uint32_t c) { return cp_upper(c) != c; }
bool cp_isalpha(uint32_t c) { return (c < 0x80) ? ((c | 32) >= 'a' && (c | 32) <= 'z') : (cp_isupper(c) || cp_islower(c) || c >= 0x4e00); }
bool cp_isdigit(uint32_t c) { return c >= '0' && c <= '9'; }

std::string map_cps(const std::string& s, uint32_t (*fn)(uint32_t)) {
  std::string out;
  out.reserve(s.size());
  bool ascii = true;
  for (unsigned char c : s)
    if (c >= 0x80) ascii = false;
  if (ascii) {
    for (unsigned char c : s) out += static_cast<char>(fn(c));
    return out;
  }
  for (uint32_t cp : utf8_decode(s)) utf8_append(out, fn(cp));
  return out;
}
std::string upper(const std::string& s) {
  if (s.find("\xc3\x9f") == std::string::npos) return map_cps(s, cp_upper);
  std::string out;  // German sharp s upper-cases to "SS" in Python
  for (uint32_t cp : utf8_decode(s)) {
    if (cp == 0xdf) out += "SS";
    else utf8_append(out, cp_upper(cp));
  }
  return out;
}
std::string lower(const std::string& s) { return map_cps(s, cp_lower); }

std::string encode(const std::vector<uint32_t>& cps, size_t a, size_t b) {
  std::string out;
  for (size_t i = a; i < b; ++i) utf8_append(out, cps[i]);
  return out;
}

// strip with Python semantics: chars == nullptr -> whitespace
// the code point starting at byte i (and its length)
uint32_t cp_at(std::string_view s, size_t i, size_t& len) {
  size_t j = i + 1;
  while (j < s.size() && (static_cast<unsigned char>(s[j]) & 0xC0) == 0x80) ++j;
  len = j - i;
  auto cps = utf8_decode(s.substr(i, len));
  return cps.empty() ? 0xFFFD : cps[0];
}

// strip with Python semantics: chars == nullptr -> whitespace; works on
// UTF-8 bytes, decoding only the code points at the edges
std::string_view strip(std::string_view s, const Value* chars, bool left, bool right) {
  std::vector<uint32_t> set;
  bool ws = !chars || chars->is_none();
  if (!ws) set = utf8_decode(chars->str());
  auto strip_it = [&](uint32_t c) { return ws ? py_isspace(c) : std::find(set.begin(), set.end(), c) != set.end(); };
  size_t a = 0, b = s.size();
  if (left)
    while (a < b) {
      size_t len = 1;
      uint32_t c = static_cast<unsigned char>(s[a]);
      if (c >= 0x80) c = cp_at(s, a, len);
      if (!strip_it(c)) break;
      a += len;
    }
  if (right)
    while (b > a) {
      size_t start = b - 1;
      while (start > a && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
      size_t len = 1;
      uint32_t c = static_cast<unsigned char>(s[start]);
      if (c >= 0x80) c = cp_at(s, start, len);
      if (!strip_it(c)) break;
      b = start;
    }
  return s.substr(a, b - a);
}

// str.strip() and friends on a string value: the value itself when nothing is stripped.
Value strip_value(const Value& v, std::string_view s, const Value* chars, bool left, bool right) {
  std::string_view r = strip(s, chars, left, right);
  if (r.size() == s.size() && v.is_string() && !v.is_markup()) return v;
  return Value(r);
}

List split_ws(const std::string& s, int64_t maxsplit, bool from_right) {
  auto cps = utf8_decode(s);
  List out;
  if (!from_right) {
    size_t i = 0, n = cps.size();
    while (true) {
      while (i < n && py_isspace(cps[i])) ++i;
      if (i >= n) break;
      if (maxsplit >= 0 && static_cast<int64_t>(out.size()) >= maxsplit) {
        size_t e = n;
        while (e > i && py_isspace(cps[e - 1])) --e;
        out.push_back(Value(encode(cps, i, e)));
        break;
      }
      size_t j = i;
      while (j < n && !py_isspace(cps[j])) ++j;
      out.push_back(Value(encode(cps, i, j)));
      i = j;
    }
    return out;
  }
  int64_t i = static_cast<int64_t>(cps.size()) - 1;
  while (true) {
    while (i >= 0 && py_isspace(cps[i])) --i;
    if (i < 0) break;
    if (maxsplit >= 0 && static_cast<int64_t>(out.size()) >= maxsplit) {
      size_t a = 0;
      while (static_cast<int64_t>(a) < i && py_isspace(cps[a])) ++a;
      out.push_back(Value(encode(cps, a, i + 1)));
      break;
    }
    int64_t j = i;
    while (j >= 0 && !py_isspace(cps[j])) --j;
    out.push_back(Value(encode(cps, j + 1, i + 1)));
    i = j;
  }
  std::reverse(out.begin(), out.end());
  return out;
}

List split_sep(const std::string& s, const std::string& sep, int64_t maxsplit, bool from_right) {
  List out;
  if (!from_right) {
    size_t pos = 0;
    while (maxsplit < 0 || static_cast<int64_t>(out.size()) < maxsplit) {
      size_t f = s.find(sep, pos);
      if (f == std::string::npos) break;
      out.push_back(Value(s.substr(pos, f - pos)));
      pos = f + sep.size();
    }
    out.push_back(Value(s.substr(pos)));
    return out;
  }
  size_t end = s.size();
  while (maxsplit < 0 || static_cast<int64_t>(out.size()) < maxsplit) {
    if (end < sep.size()) break;
    size_t f = s.rfind(sep, end - sep.size());
    if (f == std::string::npos) break;
    out.push_back(Value(s.substr(f + sep.size(), end - f - sep.size())));
    end = f;
  }
  out.push_back(Value(s.substr(0, end)));
  std::reverse(out.begin(), out.end());
  return out;
}

std::string replace(const std::string& s, const std::string& old, const std::string& rep, int64_t count) {
  if (old.empty()) {
    auto cps = utf8_decode(s);
    std::string out;
    int64_t done = 0;
    for (size_t i = 0; i <= cps.size(); ++i) {
      if (count < 0 || done < count) {
        out += rep;
        ++done;
      }
      if (i < cps.size()) utf8_append(out, cps[i]);
    }
    return out;
  }
  std::string out;
  size_t pos = 0;
  int64_t done = 0;
  while (count < 0 || done < count) {
    size_t f = s.find(old, pos);
    if (f == std::string::npos) break;
    out.append(s, pos, f - pos);
    out += rep;
    pos = f + old.size();
    ++done;
  }
  out.append(s, pos, std::string::npos);
  return out;
}

bool hashable(const Value& v) {
  if (v.is_list() || v.is_dict() || v.is_namespace()) return false;
  if (v.is_tuple())
    for (auto& x : v.list())
      if (!hashable(x)) return false;
  return true;
}

// A hash of a hashable value that agrees with py_equal (1 == 1.0 == True,
// a Markup string equals the plain one). Tuples nest at most as deep as the
// value does, and values are bounded in depth where they are made.
uint64_t py_hash(const Value& v) {
  auto mix = [](uint64_t h) {
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    return h ^ (h >> 33);
  };
  if (v.is_string()) return std::hash<std::string_view>()(v.str());
  if (v.is_bool() || v.is_int()) return mix(static_cast<uint64_t>(v.as_int()));
  if (v.is_float()) {
    double d = v.as_float();
    if (d == std::trunc(d) && d >= -9223372036854775808.0 && d < 9223372036854775808.0)
      return mix(static_cast<uint64_t>(static_cast<int64_t>(d)));
    uint64_t bits;
    std::memcpy(&bits, &d, 8);
    return mix(bits);
  }
  if (v.is_tuple()) {
    uint64_t h = 0x345678;
    for (auto& x : v.list()) h = mix(h ^ py_hash(x)) + 0x9E3779B97F4A7C15ull;
    return h;
  }
  return static_cast<uint64_t>(v.kind()) * 0x9E3779B97F4A7C15ull;  // None, Undefined
}

// refuses a replace() whose result would exceed the output limit
void check_replace(Interp& in, const std::string& s, const std::string& old, const std::string& rep, int64_t count,
                   const Node& at) {
  size_t occ = 0;
  if (old.empty()) occ = utf8_length(s) + 1;
  else
    for (size_t p = s.find(old); p != std::string::npos; p = s.find(old, p + old.size())) ++occ;
  if (count >= 0) occ = std::min(occ, static_cast<size_t>(count));
  in.check_output(s.size() + occ * rep.size(), at);
}

List splitlines(const std::string& s, bool keepends) {
  auto cps = utf8_decode(s);
  List out;
  size_t i = 0, start = 0, n = cps.size();
  while (i < n) {
    uint32_t c = cps[i];
    bool brk = c == '\n' || c == '\r' || c == 0x0b || c == 0x0c || c == 0x1c || c == 0x1d || c == 0x1e || c == 0x85 ||
               c == 0x2028 || c == 0x2029;
    if (!brk) {
      ++i;
      continue;
    }
    size_t eol = i + 1;
    if (c == '\r' && i + 1 < n && cps[i + 1] == '\n') eol = i + 2;
    out.push_back(Value(encode(cps, start, keepends ? eol : i)));
    start = i = eol;
  }
  if (start < n) out.push_back(Value(encode(cps, start, n)));
  return out;
}

int64_t cp_index(const std::string& s, size_t byte_off) { return static_cast<int64_t>(utf8_length(std::string_view(s).substr(0, byte_off))); }

std::string as_text(const Value& v) { return py_str(v); }

const Value* arg(Args& a, size_t i, const char* name) { return a.get(i, name); }
bool arg_bool(Args& a, size_t i, const char* name, bool dflt) {
  const Value* v = a.get(i, name);
  return v ? v->truthy() : dflt;
}
int64_t arg_int(Interp& in, Args& a, size_t i, const char* name, int64_t dflt, const Node& at) {
  const Value* v = a.get(i, name);
  if (!v || v->is_none()) return dflt;
  if (!v->is_int() && !v->is_bool())
    in.fail("TypeError", detail::concat("'", v->type_name(), "' object cannot be interpreted as an integer"), at);
  return v->as_int();
}
const std::string& arg_str(Interp& in, Args& a, size_t i, const char* name, const Node& at) {
  const Value* v = a.get(i, name);
  if (!v) in.fail("TypeError", detail::concat("missing required argument '", name, "'"), at);
  if (!v->is_string())
    in.fail("TypeError", detail::concat("must be str, not ", v->type_name()), at);
  return v->str();
}

// environment.getitem for a dotted attribute path ("a.b", "0")
Value attr_path(Interp& in, const Value& item, const std::string& path, const Node& at) {
  Value cur = item;
  size_t pos = 0;
  while (true) {
    size_t dot = path.find('.', pos);
    std::string part = path.substr(pos, dot == std::string::npos ? std::string::npos : dot - pos);
    bool digits = !part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return c >= '0' && c <= '9'; });
    cur = in.getitem(cur, digits ? Value(static_cast<int64_t>(std::stoll(part))) : Value(part), at);
    if (dot == std::string::npos) break;
    pos = dot + 1;
  }
  return cur;
}

// Python's int(s, base) (base 0 or 2..36) on stripped text: a sign, a
// 0x / 0o / 0b prefix matching the base (any with base 0), single underscores
// between digits. False when s is not such an int (or the base is invalid:
// jinja2's int filter then tries float); OverflowError beyond 64 bits.
bool py_int_from_string(Interp& in, std::string_view s, int64_t base, int64_t& out, const Node& at) {
  if (base != 0 && (base < 2 || base > 36)) return false;
  size_t p = 0;
  bool negative = false;
  if (p < s.size() && (s[p] == '+' || s[p] == '-')) negative = s[p++] == '-';
  auto prefix = [&](char lower) {
    return p + 1 < s.size() && s[p] == '0' && (s[p + 1] | 0x20) == lower;
  };
  int64_t b = base;
  bool prefixed = true;
  if ((b == 16 || b == 0) && prefix('x')) b = 16;
  else if ((b == 8 || b == 0) && prefix('o')) b = 8;
  else if ((b == 2 || b == 0) && prefix('b')) b = 2;
  else prefixed = false;
  if (prefixed) p += 2;
  if (b == 0) b = 10;
  unsigned __int128 acc = 0;
  size_t digits = 0;
  for (; p < s.size(); ++p) {
    char c = s[p];
    if (c == '_') {  // between digits (after a prefix too), never doubled or trailing
      if ((digits == 0 && !prefixed) || p + 1 >= s.size() || s[p + 1] == '_') return false;
      continue;
    }
    int d = c >= '0' && c <= '9' ? c - '0' : (c | 0x20) >= 'a' && (c | 0x20) <= 'z' ? (c | 0x20) - 'a' + 10 : 99;
    if (d >= b) return false;
    acc = acc * static_cast<unsigned>(b) + static_cast<unsigned>(d);
    if (acc > (static_cast<unsigned __int128>(1) << 63)) in.fail("OverflowError", detail::concat("int too large for 64 bits: ", s), at);
    ++digits;
  }
  if (digits == 0) return false;
  if (!negative && acc == (static_cast<unsigned __int128>(1) << 63))
    in.fail("OverflowError", detail::concat("int too large for 64 bits: ", s), at);
  out = negative ? static_cast<int64_t>(-static_cast<__int128>(acc)) : static_cast<int64_t>(acc);
  return true;
}

// environment.getitem for a filter's attribute= argument: an int indexes
// (jinja2's make_attrgetter), a string is a dotted path.
Value attr_value(Interp& in, const Value& item, const Value& attribute, const Node& at) {
  if (attribute.is_int() && !attribute.is_bool()) return in.getitem(item, attribute, at);
  return attr_path(in, item, as_text(attribute), at);
}

Value sort_key(const Value& v, bool case_sensitive) {
  if (!case_sensitive && v.is_string()) return Value(lower(v.str()));
  return v;
}

void sort_values(Interp& in, List& l, const Node& at, bool reverse, bool case_sensitive, const std::string* attribute) {
  std::vector<std::pair<Value, Value>> keyed;
  keyed.reserve(l.size());
  for (auto& x : l) keyed.emplace_back(sort_key(attribute ? attr_path(in, x, *attribute, at) : x, case_sensitive), x);
  std::stable_sort(keyed.begin(), keyed.end(), [&](auto& a, auto& b) {
    return reverse ? in.cmp(b.first, a.first, at) < 0 : in.cmp(a.first, b.first, at) < 0;
  });
  for (size_t i = 0; i < l.size(); ++i) l[i] = keyed[i].second;
}

// int(x) of a float: Python's errors, and OverflowError where Python would
// make an int beyond 64 bits (docs/chat.md: integers are 64-bit).
int64_t float_to_int(Interp& in, double d, const Node& at) {
  if (std::isnan(d)) in.fail("ValueError", "cannot convert float NaN to integer", at);
  if (std::isinf(d)) in.fail("OverflowError", "cannot convert float infinity to integer", at);
  d = std::trunc(d);
  if (!(d >= -9223372036854775808.0 && d < 9223372036854775808.0))
    in.fail("OverflowError", detail::concat("int(", py_repr(Value(d)), ") does not fit in 64 bits"), at);
  return static_cast<int64_t>(d);
}

// `digits` of a %-format's width or precision, bounded by the output limit
// (a larger one could only produce a larger string).
size_t format_number(Interp& in, const std::string& fmt, size_t& i, const Node& at) {
  unsigned __int128 n = 0;
  while (i < fmt.size() && fmt[i] >= '0' && fmt[i] <= '9') {
    n = n * 10 + static_cast<unsigned>(fmt[i++] - '0');
    in.check_output(n, at);
  }
  return static_cast<size_t>(n);
}

// s padded to `width` code points (left-aligned with '-'), cut to `prec` first.
void pad_text(std::string& out, std::string s, bool left, size_t width, long long prec) {
  size_t len = utf8_length(s);
  if (prec >= 0 && len > static_cast<size_t>(prec)) {
    auto cps = utf8_decode(s);
    s = encode(cps, 0, static_cast<size_t>(prec));
    len = static_cast<size_t>(prec);
  }
  if (!left && width > len) out.append(width - len, ' ');
  out += s;
  if (left && width > len) out.append(width - len, ' ');
}

// printf-style "%" formatting of Python strings: flags, width, precision and
// the conversions s r a c d i u x X o f F e E g G, at any width or precision
// the output limit allows.
std::string percent_format(Interp& in, const std::string& fmt, const Value& rhs, const Node& at) {
  std::string out;
  List args;
  bool is_map = rhs.is_dict();
  bool mapping_like = is_map || rhs.is_list() || rhs.is_undefined();  // CPython skips the "not all converted" check
  if (rhs.is_tuple()) args = rhs.list();
  else args.push_back(rhs);
  size_t ai = 0;
  for (size_t i = 0; i < fmt.size(); ++i) {
    if (fmt[i] != '%') {
      out += fmt[i];
      continue;
    }
    if (++i >= fmt.size()) in.fail("ValueError", "incomplete format", at);
    if (fmt[i] == '%') {
      out += '%';
      continue;
    }
    Value val;
    if (fmt[i] == '(') {
      size_t e = fmt.find(')', i);
      if (e == std::string::npos || !is_map) in.fail("TypeError", "format requires a mapping", at);
      const Value* v = rhs.get(fmt.substr(i + 1, e - i - 1));
      if (!v) in.fail("KeyError", "'" + fmt.substr(i + 1, e - i - 1) + "'", at);
      val = *v;
      i = e + 1;
    } else {
      if (ai >= args.size()) in.fail("TypeError", "not enough arguments for format string", at);
      val = args[ai++];
    }
    std::string flags;
    while (i < fmt.size() && std::strchr("-+ #0", fmt[i]) && fmt[i]) flags += fmt[i++];
    size_t width = format_number(in, fmt, i, at);
    long long prec = -1;
    if (i < fmt.size() && fmt[i] == '.') {
      ++i;
      prec = static_cast<long long>(format_number(in, fmt, i, at));
    }
    while (i < fmt.size() && (fmt[i] == 'h' || fmt[i] == 'l' || fmt[i] == 'L')) ++i;  // length modifiers: ignored, as Python
    if (i >= fmt.size()) in.fail("ValueError", "incomplete format", at);
    char conv = fmt[i];
    bool left = flags.find('-') != std::string::npos;
    auto printf_into = [&](const std::string& spec, auto x) {
      // bounded above: the digits of a double (at most 310 before the point) + width + precision
      in.check_output(static_cast<unsigned __int128>(out.size()) + width + static_cast<size_t>(std::max(0LL, prec)) + 400, at);
      int len = std::snprintf(nullptr, 0, spec.c_str(), x);
      if (len < 0) in.fail("ValueError", "format failed", at);
      size_t at0 = out.size();
      out.resize(at0 + static_cast<size_t>(len) + 1);
      std::snprintf(out.data() + at0, static_cast<size_t>(len) + 1, spec.c_str(), x);
      out.resize(at0 + static_cast<size_t>(len));
    };
    std::string spec = "%";  // built by appends (GCC 12 misreports chained + with -Wrestrict)
    spec += flags;
    if (width) spec += std::to_string(width);
    if (prec >= 0) {
      spec += '.';
      spec += std::to_string(prec);
    }
    switch (conv) {
      case 's':
      case 'r':
      case 'a':
        in.check_output(static_cast<unsigned __int128>(out.size()) + width, at);
        pad_text(out, conv == 's' ? py_str(val) : py_repr(val), left, width, prec);
        break;
      case 'd':
      case 'i':
      case 'u':
        if (!val.is_number()) in.fail("TypeError", detail::concat("%", conv, " format: a real number is required, not ", val.type_name()), at);
        printf_into(spec + "lld", static_cast<long long>(val.is_float() ? float_to_int(in, val.as_float(), at) : val.as_int()));
        break;
      case 'x':
      case 'X':
      case 'o': {  // Python: a sign, then '0x'/'0X'/'0o' with '#', then the magnitude's digits
        if (!val.is_int() && !val.is_bool())
          in.fail("TypeError", detail::concat("%", conv, " format: an integer is required, not ", val.type_name()), at);
        in.check_output(static_cast<unsigned __int128>(out.size()) + width + static_cast<size_t>(std::max(0LL, prec)) + 32, at);
        int64_t x = val.as_int();
        uint64_t mag = x < 0 ? 0 - static_cast<uint64_t>(x) : static_cast<uint64_t>(x);
        char digits[32];
        std::snprintf(digits, sizeof digits, conv == 'o' ? "%llo" : conv == 'x' ? "%llx" : "%llX", static_cast<unsigned long long>(mag));
        std::string body(digits);
        if (prec > static_cast<long long>(body.size())) body.insert(0, static_cast<size_t>(prec) - body.size(), '0');
        std::string prefix = x < 0 ? "-" : flags.find('+') != std::string::npos ? "+" : flags.find(' ') != std::string::npos ? " " : "";
        if (flags.find('#') != std::string::npos) prefix += conv == 'o' ? "0o" : conv == 'x' ? "0x" : "0X";
        size_t len = prefix.size() + body.size(), pad = width > len ? width - len : 0;
        if (left) out += prefix + body + std::string(pad, ' ');
        else if (flags.find('0') != std::string::npos) out += prefix + std::string(pad, '0') + body;
        else out += std::string(pad, ' ') + prefix + body;
        break;
      }
      case 'c': {
        std::string ch;
        if (val.is_int() || val.is_bool()) {
          if (val.as_int() < 0 || val.as_int() > 0x10FFFF) in.fail("OverflowError", "%c arg not in range(0x110000)", at);
          utf8_append(ch, static_cast<uint32_t>(val.as_int()));
        } else if (val.is_string() && utf8_length(val.str()) == 1) {
          ch = val.str();
        } else {
          in.fail("TypeError", "%c requires an int or a unicode character, not " + std::string(val.is_string() ? "a string of length " + std::to_string(utf8_length(val.str())) : val.type_name()), at);
        }
        in.check_output(static_cast<unsigned __int128>(out.size()) + width, at);
        pad_text(out, ch, left, width, -1);
        break;
      }
      case 'f':
      case 'F':
      case 'e':
      case 'E':
      case 'g':
      case 'G':
        if (!val.is_number()) in.fail("TypeError", detail::concat("must be real number, not ", val.type_name()), at);
        printf_into(spec + conv, val.as_float());
        break;
      default: in.fail("ValueError", detail::concat("unsupported format character '", conv, "'"), at);
    }
    in.check_output(out.size(), at);
  }
  if (!mapping_like && ai < args.size()) in.fail("TypeError", "not all arguments converted during string formatting", at);
  return out;
}

// format(v, spec) for str.format: [[fill]align][sign][#][0][width][,|_][.precision][type]
// of str, int, bool and float as Python; '#' with floats and zero padding
// with grouping are a clear ValueError.
void format_field(Interp& in, std::string& out, const Value& v, const std::string& spec, const Node& at) {
  if (spec.empty()) {
    out += py_str(v);
    return;
  }
  size_t i = 0;
  std::string fill = " ";
  char align = 0, sign = '-';
  size_t fill_len = 1;  // the fill character's bytes
  if ((spec[0] & 0xC0) == 0xC0) {
    while (fill_len < spec.size() && (spec[fill_len] & 0xC0) == 0x80) ++fill_len;
  }
  if (spec.size() > fill_len && std::strchr("<>=^", spec[fill_len]) && spec[fill_len]) {
    fill = spec.substr(0, fill_len);
    align = spec[fill_len];
    i = fill_len + 1;
  } else if (std::strchr("<>=^", spec[0])) {
    align = spec[i++];
  }
  if (i < spec.size() && (spec[i] == '+' || spec[i] == '-' || spec[i] == ' ')) sign = spec[i++];
  bool alt = i < spec.size() && spec[i] == '#';
  if (alt) ++i;
  if (i < spec.size() && spec[i] == '0') {
    if (!align) {
      fill = "0";
      align = '=';
    }
    ++i;
  }
  size_t width = format_number(in, spec, i, at);
  char group = 0;
  if (i < spec.size() && (spec[i] == ',' || spec[i] == '_')) group = spec[i++];
  long long prec = -1;
  if (i < spec.size() && spec[i] == '.') {
    ++i;
    if (i >= spec.size() || spec[i] < '0' || spec[i] > '9') in.fail("ValueError", "Format specifier missing precision", at);
    prec = static_cast<long long>(format_number(in, spec, i, at));
  }
  char type = i < spec.size() ? spec[i++] : 0;
  if (i < spec.size()) in.fail("ValueError", "Invalid format specifier", at);
  in.check_output(static_cast<unsigned __int128>(out.size()) + width + static_cast<size_t>(std::max(0LL, prec)) + 400, at);
  auto unknown = [&]() { in.fail("ValueError", detail::concat("Unknown format code '", type, "' for object of type '", v.type_name(), "'"), at); };
  std::string body;  // the digits or text, sign excluded
  std::string sgn;
  if (v.is_string()) {
    if (type && type != 's') unknown();
    if (sign != '-') in.fail("ValueError", "Sign not allowed in string format specifier", at);
    if (alt) in.fail("ValueError", "Alternate form (#) not allowed in string format specifier", at);
    if (group) in.fail("ValueError", detail::concat("Cannot specify '", group, "' with 's'."), at);
    if (align == '=') in.fail("ValueError", "'=' alignment not allowed in string format specifier", at);
    body = v.str();
    if (prec >= 0 && utf8_length(body) > static_cast<size_t>(prec)) body = encode(utf8_decode(body), 0, static_cast<size_t>(prec));
    if (!align) align = '<';
  } else if (v.is_number()) {
    bool as_float = v.is_float() || (type && std::strchr("eEfFgG%", type));
    if (group && fill == "0" && align == '=') in.fail("ValueError", "zero padding with grouping is not supported", at);
    if (!as_float) {
      if (type && !std::strchr("dnbxXoc", type)) unknown();
      if (prec >= 0) in.fail("ValueError", "Precision not allowed in integer format specifier", at);
      if (group && (type == 'n' || type == 'c' || (group == ',' && type && type != 'd')))
        in.fail("ValueError", detail::concat("Cannot specify '", group, "' with '", type, "'."), at);
      int64_t x = v.as_int();
      if (type == 'c') {
        if (sign != '-') in.fail("ValueError", "Sign not allowed with integer format specifier 'c'", at);
        if (alt) in.fail("ValueError", "Alternate form (#) not allowed with integer format specifier 'c'", at);
        if (x < 0 || x > 0x10FFFF) in.fail("OverflowError", "%c arg not in range(0x110000)", at);
        utf8_append(body, static_cast<uint32_t>(x));
      } else {
        if (x < 0) sgn = "-";
        uint64_t mag = x < 0 ? 0 - static_cast<uint64_t>(x) : static_cast<uint64_t>(x);
        if (type == 'b') {
          do body.insert(body.begin(), static_cast<char>('0' + (mag & 1))); while (mag >>= 1);
        } else {
          char digits[32];
          std::snprintf(digits, sizeof digits, type == 'o' ? "%llo" : type == 'x' ? "%llx" : type == 'X' ? "%llX" : "%llu",
                        static_cast<unsigned long long>(mag));
          body = digits;
        }
        for (size_t k = group ? body.size() : 0, every = type && std::strchr("bxXo", type) ? 4 : 3; k > every; k -= every)
          body.insert(k - every, 1, group);
        if (sgn.empty() && sign != '-') sgn = std::string(1, sign);
        if (alt && type && std::strchr("bxXo", type)) sgn += type == 'b' ? "0b" : type == 'o' ? "0o" : type == 'x' ? "0x" : "0X";
      }
    } else {
      if (type && !std::strchr("eEfFgG%n", type)) unknown();
      if (alt) in.fail("ValueError", "format spec '#' of a float is not supported", at);
      if (type == 'n') type = 'g';
      double x = v.as_float();
      if (std::signbit(x) && !std::isnan(x)) sgn = "-";
      x = std::fabs(x);
      char conv = type ? type : 'g';
      std::string fmt = "%.";
      fmt += std::to_string(prec >= 0 ? prec : 6);
      if (type == '%') {
        x *= 100;
        conv = 'f';
      }
      fmt += conv;
      if (!type && prec < 0) {
        body = py_str(Value(x));  // repr
      } else {
        int len = std::snprintf(nullptr, 0, fmt.c_str(), x);
        body.resize(static_cast<size_t>(len) + 1);
        std::snprintf(body.data(), body.size(), fmt.c_str(), x);
        body.resize(static_cast<size_t>(len));
        if (!type && body.find_first_of(".ein") == std::string::npos) body += ".0";  // '' type keeps a decimal point
        if (type == '%') body += '%';
      }
      if (group) {  // separators in the integer part
        size_t end = body.find_first_not_of("0123456789");
        for (size_t k = end == std::string::npos ? body.size() : end; k > 3; k -= 3) body.insert(k - 3, 1, group);
      }
    }
    if (sgn.empty() && sign != '-') sgn = std::string(1, sign);
    if (!align) align = '>';
  } else {
    in.fail("TypeError", detail::concat("unsupported format string passed to ", v.type_name(), ".__format__"), at);
  }
  size_t len = utf8_length(sgn) + utf8_length(body);
  size_t pad = width > len ? width - len : 0;
  auto fills = [&](size_t k) {
    for (size_t j = 0; j < k; ++j) out += fill;
  };
  switch (align) {
    case '<': out += sgn + body; fills(pad); break;
    case '^': fills(pad / 2); out += sgn + body; fills(pad - pad / 2); break;
    case '=': out += sgn; fills(pad); out += body; break;
    default: fills(pad); out += sgn + body; break;
  }
}

// str.format; escape: Markup.format, which HTML-escapes each formatted field
// whose value is not Markup itself.
std::string str_format(Interp& in, const std::string& fmt, Args& args, const Node& at, bool escape = false) {
  std::string out;
  size_t auto_idx = 0;
  for (size_t i = 0; i < fmt.size(); ++i) {
    char c = fmt[i];
    if (c == '{') {
      if (i + 1 < fmt.size() && fmt[i + 1] == '{') {
        out += '{';
        ++i;
        continue;
      }
      size_t e = fmt.find('}', i);
      if (e == std::string::npos) in.fail("ValueError", "Single '{' encountered in format string", at);
      std::string field = fmt.substr(i + 1, e - i - 1);
      size_t colon = field.find(':');
      std::string spec = colon == std::string::npos ? "" : field.substr(colon + 1);
      std::string name = field.substr(0, colon);
      char conversion = 0;  // {x!r}, {x!s}, {x!a}
      if (size_t bang = name.find('!'); bang != std::string::npos) {
        if (bang + 2 != name.size() || !std::strchr("rsa", name[bang + 1]) || !name[bang + 1])
          in.fail("ValueError", "Unknown conversion specifier " + name.substr(bang + 1), at);
        conversion = name[bang + 1];
        name.resize(bang);
      }
      // field access after the argument name: .attr and [key], as jinja2's
      // sandboxed formatter resolves them (environment getattr / getitem)
      std::string access;
      if (size_t cut = name.find_first_of(".["); cut != std::string::npos) {
        access = name.substr(cut);
        name.resize(cut);
      }
      Value v;
      if (name.empty() && !access.empty()) in.fail("ValueError", "Empty attribute in format string", at);
      if (name.empty()) {
        if (auto_idx >= args.pos.size()) in.fail("IndexError", "Replacement index out of range for positional args tuple", at);
        v = args.pos[auto_idx++];
      } else if (std::all_of(name.begin(), name.end(), [](char d) { return d >= '0' && d <= '9'; })) {
        size_t k = name.size() > 9 ? args.pos.size() : std::stoul(name);  // (more digits: out of range)
        if (k >= args.pos.size()) in.fail("IndexError", "Replacement index out of range for positional args tuple", at);
        v = args.pos[k];
      } else {
        const Value* kv = nullptr;
        for (auto& p : args.kw)
          if (p.first == name) kv = &p.second;
        if (!kv) in.fail("KeyError", "'" + name + "'", at);
        v = *kv;
      }
      for (size_t a = 0; a < access.size();) {
        bool item = access[a] == '[';
        size_t end = item ? access.find(']', a) : access.find_first_of(".[", a + 1);
        if (item && end == std::string::npos) in.fail("ValueError", "Missing ']' in format string", at);
        std::string key = access.substr(a + 1, (end == std::string::npos ? access.size() : end) - a - 1);
        if (key.empty()) in.fail("ValueError", "Empty attribute in format string", at);
        bool digits = std::all_of(key.begin(), key.end(), [](char d) { return d >= '0' && d <= '9'; }) && key.size() < 19;
        v = item ? in.getitem(v, digits ? Value(static_cast<int64_t>(std::stoll(key))) : Value(key), at)
                 : in.getattr(v, key, at);
        a = end == std::string::npos ? access.size() : end + (item ? 1 : 0);
      }
      if (conversion) v = Value(conversion == 's' ? py_str(v) : py_repr(v));
      size_t field_start = out.size();
      format_field(in, out, v, spec, at);
      if (escape && !v.is_markup()) {
        std::string escaped = html_escape(out.substr(field_start));
        out.replace(field_start, std::string::npos, escaped);
      }
      in.check_output(out.size(), at);
      i = e;
    } else if (c == '}') {
      if (i + 1 < fmt.size() && fmt[i + 1] == '}') ++i;
      out += '}';
    } else {
      out += c;
    }
  }
  return out;
}

// ---------------------------------------------------------------- filters
enum FilterId {
  F_TOJSON, F_LENGTH, F_TRIM, F_DEFAULT, F_STRING, F_UPPER, F_LOWER, F_JOIN, F_ITEMS, F_DICTSORT, F_SAFE, F_LIST,
  F_MAP, F_SELECTATTR, F_REJECTATTR, F_SELECT, F_REJECT, F_INDENT, F_REPLACE, F_INT, F_FLOAT, F_UNIQUE, F_SORT,
  F_FIRST, F_LAST, F_ABS, F_CAPITALIZE, F_TITLE, F_CENTER, F_ROUND, F_SUM, F_MIN, F_MAX, F_REVERSE, F_WORDCOUNT,
  F_FORMAT, F_ESCAPE, F_ATTR, F_BATCH, F_BOOL, F_TRUNCATE,
};
struct NameId {
  const char* name;
  int id;
};
const NameId kFilters[] = {
    {"tojson", F_TOJSON}, {"length", F_LENGTH}, {"count", F_LENGTH}, {"trim", F_TRIM}, {"default", F_DEFAULT},
    {"d", F_DEFAULT}, {"string", F_STRING}, {"upper", F_UPPER}, {"lower", F_LOWER}, {"join", F_JOIN},
    {"items", F_ITEMS}, {"dictsort", F_DICTSORT}, {"safe", F_SAFE}, {"list", F_LIST}, {"map", F_MAP},
    {"selectattr", F_SELECTATTR}, {"rejectattr", F_REJECTATTR}, {"select", F_SELECT}, {"reject", F_REJECT},
    {"indent", F_INDENT}, {"replace", F_REPLACE}, {"int", F_INT}, {"float", F_FLOAT}, {"unique", F_UNIQUE},
    {"sort", F_SORT}, {"first", F_FIRST}, {"last", F_LAST}, {"abs", F_ABS}, {"capitalize", F_CAPITALIZE},
    {"title", F_TITLE}, {"center", F_CENTER}, {"round", F_ROUND}, {"sum", F_SUM}, {"min", F_MIN}, {"max", F_MAX},
    {"reverse", F_REVERSE}, {"wordcount", F_WORDCOUNT}, {"format", F_FORMAT}, {"escape", F_ESCAPE}, {"e", F_ESCAPE},
    {"forceescape", F_ESCAPE}, {"attr", F_ATTR}, {"batch", F_BATCH}, {"truncate", F_TRUNCATE},
};

enum TestId {
  T_DEFINED, T_UNDEFINED, T_NONE, T_STRING, T_MAPPING, T_ITERABLE, T_SEQUENCE, T_FALSE, T_TRUE, T_BOOLEAN, T_NUMBER,
  T_INTEGER, T_FLOAT, T_CALLABLE, T_EQ, T_NE, T_LT, T_LE, T_GT, T_GE, T_IN, T_DIVISIBLEBY, T_ODD, T_EVEN, T_LOWER,
  T_UPPER, T_SAMEAS, T_FILTER, T_TEST, T_ESCAPED,
};
const NameId kTests[] = {
    {"defined", T_DEFINED}, {"undefined", T_UNDEFINED}, {"none", T_NONE}, {"string", T_STRING},
    {"mapping", T_MAPPING}, {"iterable", T_ITERABLE}, {"sequence", T_SEQUENCE}, {"false", T_FALSE},
    {"true", T_TRUE}, {"boolean", T_BOOLEAN}, {"number", T_NUMBER}, {"integer", T_INTEGER}, {"float", T_FLOAT},
    {"callable", T_CALLABLE}, {"eq", T_EQ}, {"equalto", T_EQ}, {"==", T_EQ}, {"ne", T_NE}, {"!=", T_NE},
    {"lt", T_LT}, {"lessthan", T_LT}, {"<", T_LT}, {"le", T_LE}, {"<=", T_LE}, {"gt", T_GT},
    {"greaterthan", T_GT}, {">", T_GT}, {"ge", T_GE}, {">=", T_GE}, {"in", T_IN}, {"divisibleby", T_DIVISIBLEBY},
    {"odd", T_ODD}, {"even", T_EVEN}, {"lower", T_LOWER}, {"upper", T_UPPER}, {"sameas", T_SAMEAS},
    {"filter", T_FILTER}, {"test", T_TEST}, {"escaped", T_ESCAPED},
};

int lookup(const NameId* table, size_t n, std::string_view name) {
  for (size_t i = 0; i < n; ++i)
    if (name == table[i].name) return table[i].id;
  return -1;
}

}  // namespace

std::string html_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&#34;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

namespace {

Value generator(List l) { return Value(new IterObj(std::move(l), "generator")); }

Value select_or_reject(Interp& in, const Value& seq, Args& args, const Node& at, bool use_attr, bool keep) {
  List items, out;
  if (seq.truthy()) in.iterate(seq, items, at);
  size_t k = 0;
  std::string attribute;
  if (use_attr) attribute = arg_str(in, args, k++, "attribute", at);
  int tid = -1;
  std::string tname;
  if (k < args.pos.size()) {
    if (!args.pos[k].is_string()) in.fail("TypeError", "test name must be a string", at);
    tname = args.pos[k++].str();
    tid = test_id(tname);
    if (tid < 0) in.fail("TemplateRuntimeError", "No test named '" + tname + "'.", at);
  }
  Args targs;
  for (size_t i = k; i < args.pos.size(); ++i) targs.pos.push_back(args.pos[i]);
  for (auto& x : items) {
    in.tick(at);
    Value v = use_attr ? attr_path(in, x, attribute, at) : x;
    bool r = tid < 0 ? v.truthy() : apply_test(in, tid, tname, v, targs, at);
    if (r == keep) out.push_back(x);
  }
  return generator(std::move(out));
}

std::string indent(Interp& in, const std::string& s0, const Value* width, bool first, bool blank, const Node& at) {
  size_t width_bytes = width ? (width->is_string() ? width->str().size() : static_cast<size_t>(std::max<int64_t>(0, width->as_int()))) : 4;
  in.check_output(width_bytes, at);
  std::string ind = width && width->is_string() ? width->str() : std::string(width_bytes, ' ');
  std::string s = s0 + "\n";
  List lines = splitlines(s, false);
  in.check_output(s.size() + static_cast<unsigned __int128>(lines.size() + 1) * ind.size(), at);  // the result's bound
  std::string rv;
  if (blank) {
    for (size_t i = 0; i < lines.size(); ++i) {
      if (i) rv += "\n" + ind;
      rv += lines[i].str();
    }
  } else {
    rv = lines.empty() ? "" : lines[0].str();
    for (size_t i = 1; i < lines.size(); ++i) {
      rv += "\n";
      if (!lines[i].str().empty()) rv += ind;
      rv += lines[i].str();
    }
  }
  if (first) rv = ind + rv;
  return rv;
}

}  // namespace

int filter_id(std::string_view name) { return lookup(kFilters, std::size(kFilters), name); }
int test_id(std::string_view name) { return lookup(kTests, std::size(kTests), name); }

bool filter_view(const Node& n, const Value& input, std::string_view& piece) {
  if (n.sym != F_TRIM || n.args.size() != 1 || !n.kwargs.empty() || !input.is_string() || input.is_markup()) return false;
  piece = strip(input.str(), nullptr, true, true);
  return true;
}

bool emit_filter(Interp& in, const Node& n, const Value& v, Frame& f, std::string& out) {
  std::string_view piece;
  if (filter_view(n, v, piece)) {
    out += piece;
    return true;
  }
  if (n.sym != F_TOJSON) return false;
  RenderCache* cache = in.opt.cache;
  if (cache && (v.is_dict() || v.is_list())) {
    for (auto& e : cache->tojson_at)
      if (e.node == &n && e.identity == v.identity()) {
        out += e.json.str();
        return true;
      }
    if (cache->shared.count(v.identity())) {
      bool constant_args = true;
      for (size_t i = 1; i < n.args.size(); ++i) constant_args = constant_args && n.args[i]->kind == NK::Const;
      for (auto& kv : n.kwargs) constant_args = constant_args && kv.second->kind == NK::Const;
      Value json = in.apply_filter_node(n, v, f);
      if (constant_args && cache->tojson_at.size() < 1024) cache->tojson_at.push_back({&n, v.identity(), json});
      py_str_to(out, json);
      return true;
    }
  }
  if (n.args.size() != 1 || !n.kwargs.empty()) return false;
  try {
    json_dumps_to(out, v);
  } catch (const TemplateError&) {
    throw;
  } catch (const InvalidArgument& e) {
    in.fail("TypeError", e.what(), n);
  }
  return true;
}

Value apply_filter(Interp& in, int id, const std::string& name, Value v, Args& args, const Node& at) {
  switch (id) {
    case F_TOJSON: {
      RenderCache::Options k;
      k.ensure_ascii = arg_bool(args, 0, "ensure_ascii", false);
      if (const Value* ind = arg(args, 1, "indent"); ind && !ind->is_none()) {
        if (ind->is_string()) k.indent = ind->str();
        else if (ind->is_int()) {
          in.check_output(static_cast<size_t>(std::max<int64_t>(0, ind->as_int())), at);
          k.indent = std::string(static_cast<size_t>(std::max<int64_t>(0, ind->as_int())), ' ');
        }
        else in.fail("TypeError", "indent must be an int or str", at);
        k.has_indent = true;
      }
      if (const Value* sep = arg(args, 2, "separators"); sep && !sep->is_none()) {
        if (!sep->is_sequence() || sep->list().size() != 2 || !sep->list()[0].is_string() || !sep->list()[1].is_string())
          in.fail("ValueError", "separators must be a (item_separator, key_separator) pair", at);
        k.item_sep = sep->list()[0].str();
        k.key_sep = sep->list()[1].str();
        k.has_separators = true;
      }
      k.sort_keys = arg_bool(args, 3, "sort_keys", false);
      RenderCache* cache = in.opt.cache;
      bool cacheable = cache && (v.is_dict() || v.is_list()) && cache->shared.count(v.identity());
      if (cacheable)
        for (auto& e : cache->tojson)
          if (e.identity == v.identity() && e.options == k) return e.json;
      DumpOptions o;
      o.ensure_ascii = k.ensure_ascii;
      o.sort_keys = k.sort_keys;
      if (k.has_indent) o.indent = &k.indent;
      if (k.has_separators) {
        o.item_separator = &k.item_sep;
        o.key_separator = &k.key_sep;
      }
      try {
        Value out(json_dumps(v, o));
        if (cacheable && cache->tojson.size() < 1024) cache->tojson.push_back({v.identity(), k, out});
        return out;
      } catch (const TemplateError&) {
        throw;
      } catch (const InvalidArgument& e) {
        in.fail("TypeError", e.what(), at);
      }
    }
    case F_LENGTH:
      if (v.is_undefined()) return Value(int64_t(0));
      if (!v.is_string() && !v.is_sequence() && !v.is_dict())
        in.fail("TypeError", detail::concat("object of type '", v.type_name(), "' has no len()"), at);
      return Value(static_cast<int64_t>(v.size()));
    case F_TRIM:
      if (v.is_string()) return strip_value(v, v.str(), arg(args, 0, "chars"), true, true);
      return Value(strip(as_text(v), arg(args, 0, "chars"), true, true));
    case F_DEFAULT: {
      const Value* d = arg(args, 0, "default_value");
      bool boolean = arg_bool(args, 1, "boolean", false);
      if (v.is_undefined() || (boolean && !v.truthy())) return d ? *d : Value("");
      return v;
    }
    case F_STRING: return v.is_string() ? v : Value(as_text(v));
    case F_UPPER: return Value(upper(as_text(v)));
    case F_LOWER: return Value(lower(as_text(v)));
    case F_CAPITALIZE: {
      auto cps = utf8_decode(as_text(v));
      std::string out;
      for (size_t i = 0; i < cps.size(); ++i) utf8_append(out, i == 0 ? cp_upper(cps[i]) : cp_lower(cps[i]));
      return Value(out);
    }
    case F_TITLE: {
      auto cps = utf8_decode(as_text(v));
      std::string out;
      bool start = true;
      for (uint32_t c : cps) {
        bool sep = c == '-' || py_isspace(c) || c == '(' || c == '{' || c == '[' || c == '<';
        if (start && !sep && c == 0xdf) out += "SS";
        else utf8_append(out, sep ? c : start ? cp_upper(c) : cp_lower(c));
        start = sep;
      }
      return Value(out);
    }
    case F_JOIN: {
      List items;
      in.iterate(v, items, at);
      std::string sep;
      if (const Value* d = arg(args, 0, "d")) sep = as_text(*d);
      const Value* attribute = arg(args, 1, "attribute");
      std::string out;
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) out += sep;
        if (attribute && !attribute->is_none()) py_str_to(out, attr_value(in, items[i], *attribute, at));
        else py_str_to(out, items[i]);
        in.check_output(out.size(), at);
      }
      return Value(std::move(out));
    }
    case F_ITEMS: {  // a generator in jinja2 (always truthy, no len)
      if (v.is_undefined()) return generator({});
      if (!v.is_dict()) in.fail("TypeError", "Can only get item pairs from a mapping.", at);
      List out;
      for (auto& kv : v.dict_ref().items) out.push_back(Value::tuple({kv.first, kv.second}));
      return generator(std::move(out));
    }
    case F_DICTSORT: {
      if (v.is_undefined()) in.fail_undefined(v, at);
      if (!v.is_dict()) in.fail("AttributeError", detail::concat("'", v.type_name(), "' object has no attribute 'items'"), at);
      bool cs = arg_bool(args, 0, "case_sensitive", false);
      std::string by = "key";
      if (const Value* b = arg(args, 1, "by")) by = as_text(*b);
      bool rev = arg_bool(args, 2, "reverse", false);
      if (by != "key" && by != "value") in.fail("FilterArgumentError", "You can only sort by either \"key\" or \"value\"", at);
      List out;
      for (auto& kv : v.dict_ref().items) out.push_back(Value::tuple({kv.first, kv.second}));
      std::vector<std::pair<Value, Value>> keyed;
      for (auto& x : out) keyed.emplace_back(sort_key(x.list()[by == "key" ? 0 : 1], cs), x);
      std::stable_sort(keyed.begin(), keyed.end(), [&](auto& a, auto& b) {
        return rev ? in.cmp(b.first, a.first, at) < 0 : in.cmp(a.first, b.first, at) < 0;
      });
      for (size_t i = 0; i < out.size(); ++i) out[i] = keyed[i].second;
      return Value(std::move(out));
    }
    case F_SAFE: return v.is_markup() ? v : Value::markup(as_text(v));
    case F_ESCAPE: return v.is_markup() && name != "forceescape" ? v : Value::markup(html_escape(as_text(v)));
    case F_LIST: {
      List items;
      in.iterate(v, items, at);
      return Value(std::move(items));
    }
    case F_MAP: {
      List items, out;
      if (v.truthy()) in.iterate(v, items, at);
      const Value* attribute = nullptr;
      for (auto& kv : args.kw)
        if (kv.first == "attribute") attribute = &kv.second;
      if (attribute) {
        const Value* dflt = nullptr;
        for (auto& kv : args.kw)
          if (kv.first == "default") dflt = &kv.second;
        for (auto& x : items) {
          Value r = attr_value(in, x, *attribute, at);
          out.push_back(r.is_undefined() && dflt ? *dflt : r);
        }
        return generator(std::move(out));
      }
      if (args.pos.empty() || !args.pos[0].is_string()) in.fail("FilterArgumentError", "map requires a filter argument", at);
      std::string fname = args.pos[0].str();
      int fid = filter_id(fname);
      if (fid < 0) in.fail("TemplateRuntimeError", "No filter named '" + fname + "'.", at);
      Args fargs;
      fargs.pos.assign(args.pos.begin() + 1, args.pos.end());
      fargs.kw = args.kw;
      for (auto& x : items) {
        in.tick(at);
        Args a = fargs;
        out.push_back(apply_filter(in, fid, fname, x, a, at));
      }
      return generator(std::move(out));
    }
    case F_SELECTATTR: return select_or_reject(in, v, args, at, true, true);
    case F_REJECTATTR: return select_or_reject(in, v, args, at, true, false);
    case F_SELECT: return select_or_reject(in, v, args, at, false, true);
    case F_REJECT: return select_or_reject(in, v, args, at, false, false);
    case F_INDENT:
      if (v.is_undefined()) in.fail_undefined(v, at);
      if (v.is_list()) in.fail("AttributeError", "'list' object has no attribute 'splitlines'", at);  // list += str extends
      if (v.is_tuple()) in.fail("TypeError", "can only concatenate tuple (not \"str\") to tuple", at);
      if (!v.is_string()) in.fail("TypeError", detail::concat("unsupported operand type(s) for +=: '", v.type_name(), "' and 'str'"), at);
      return Value(indent(in, as_text(v), arg(args, 0, "width"), arg_bool(args, 1, "first", false), arg_bool(args, 2, "blank", false), at));
    case F_REPLACE: {
      const Value* old = arg(args, 0, "old");
      const Value* rep = arg(args, 1, "new");
      if (!old || !rep) in.fail("TypeError", "replace() missing required arguments", at);
      int64_t count = arg_int(in, args, 2, "count", -1, at);
      std::string text = as_text(v), o = as_text(*old), r = as_text(*rep);
      check_replace(in, text, o, r, count, at);
      return Value(replace(text, o, r, count));
    }
    case F_INT: {
      if (v.is_undefined()) in.fail_undefined(v, at);  // Undefined.__int__ raises
      const Value* d = arg(args, 0, "default");
      Value dflt = d ? *d : Value(int64_t(0));
      if (v.is_int() || v.is_bool()) return Value(v.as_int());
      if (v.is_float()) return std::isfinite(v.as_float()) ? Value(float_to_int(in, v.as_float(), at)) : dflt;
      if (v.is_string()) {
        std::string s(strip(v.str(), nullptr, true, true));
        int64_t iv;
        if (py_int_from_string(in, s, arg_int(in, args, 1, "base", 10, at), iv, at)) return Value(iv);
        char* end = nullptr;
        double dv = std::strtod(s.c_str(), &end);
        if (!s.empty() && end && *end == 0 && std::isfinite(dv)) return Value(float_to_int(in, dv, at));
      }
      return dflt;
    }
    case F_FLOAT: {
      if (v.is_undefined()) in.fail_undefined(v, at);
      const Value* d = arg(args, 0, "default");
      Value dflt = d ? *d : Value(0.0);
      if (v.is_number()) return Value(v.as_float());
      if (v.is_string()) {
        std::string s(strip(v.str(), nullptr, true, true));
        char* end = nullptr;
        double dv = std::strtod(s.c_str(), &end);
        if (!s.empty() && end && *end == 0) return Value(dv);
      }
      return dflt;
    }
    case F_UNIQUE: {
      List items, out;
      in.iterate(v, items, at);
      bool cs = arg_bool(args, 0, "case_sensitive", false);
      const Value* attribute = arg(args, 1, "attribute");
      std::unordered_multimap<uint64_t, Value> seen;  // hash -> key: O(n) expected, not O(n^2)
      seen.reserve(items.size());
      for (auto& x : items) {
        Value k = sort_key(attribute && !attribute->is_none() ? attr_value(in, x, *attribute, at) : x, cs);
        if (!hashable(k)) in.fail("TypeError", detail::concat("unhashable type: '", k.type_name(), "'"), at);
        uint64_t h = py_hash(k);
        auto [lo, hi] = seen.equal_range(h);
        bool dup = false;
        for (auto it = lo; it != hi && !dup; ++it) dup = py_equal(it->second, k);
        if (!dup) {
          seen.emplace(h, std::move(k));
          out.push_back(x);
        }
      }
      return generator(std::move(out));  // jinja2's unique yields
    }
    case F_SORT: {
      List items;
      in.iterate(v, items, at);
      const Value* attribute = arg(args, 2, "attribute");
      std::string attr_s = attribute && !attribute->is_none() ? as_text(*attribute) : "";
      sort_values(in, items, at, arg_bool(args, 0, "reverse", false), arg_bool(args, 1, "case_sensitive", false),
                  attr_s.empty() ? nullptr : &attr_s);
      return Value(std::move(items));
    }
    case F_FIRST: {
      List items;
      in.iterate(v, items, at);
      return items.empty() ? Value::undefined("No first item, sequence was empty.") : items.front();
    }
    case F_LAST: {  // next(iter(reversed(seq)))
      if (!v.is_sequence() && !v.is_dict() && !v.is_string() && !v.is_undefined())
        in.fail("TypeError", detail::concat("'", v.type_name(), "' object is not reversible"), at);
      List items;
      in.iterate(v, items, at);
      return items.empty() ? Value::undefined("No last item, sequence was empty.") : items.back();
    }
    case F_ABS:
      if (!v.is_number()) in.fail("TypeError", detail::concat("bad operand type for abs(): '", v.type_name(), "'"), at);
      if (!v.is_float() && v.as_int() == INT64_MIN) in.fail("OverflowError", "integer result does not fit in 64 bits", at);
      return v.is_float() ? Value(std::fabs(v.as_float())) : Value(v.as_int() < 0 ? -v.as_int() : v.as_int());
    case F_CENTER: {
      std::string s = as_text(v);
      int64_t width = arg_int(in, args, 0, "width", 80, at);
      in.check_output(static_cast<size_t>(std::max<int64_t>(0, width)), at);
      int64_t len = static_cast<int64_t>(utf8_length(s));
      if (width <= len) return Value(s);
      int64_t marg = width - len, left = marg / 2 + (marg & width & 1);
      return Value(std::string(left, ' ') + s + std::string(marg - left, ' '));
    }
    case F_ROUND: {
      if (!v.is_number()) in.fail("TypeError", detail::concat("type ", v.type_name(), " doesn't define __round__ method"), at);
      int64_t prec = arg_int(in, args, 0, "precision", 0, at);
      std::string method = "common";
      if (const Value* m = arg(args, 1, "method")) method = as_text(*m);
      if (method != "common" && method != "ceil" && method != "floor")
        in.fail("FilterArgumentError", "method must be common, ceil or floor", at);
      if (method == "common") {
        if (!v.is_float()) return Value(v.as_int());  // round(int, n) is the int
        if (!std::isfinite(v.as_float()) || prec > 330) return v;  // beyond a double's digits: itself
        if (prec < -330) return Value(std::copysign(0.0, v.as_float()));
        if (prec < 0 || prec > 300) {
          double p = std::pow(10.0, static_cast<double>(prec));
          return Value(std::nearbyint(v.as_float() * p) / p);
        }
        // Python rounds the exact binary value half-to-even, as printf does
        char buf[400];
        std::snprintf(buf, sizeof buf, "%.*f", static_cast<int>(prec), v.as_float());
        double r = std::strtod(buf, nullptr);
        return Value(r == 0 && std::signbit(v.as_float()) ? -0.0 : r);
      }
      if (prec > 308 || prec < -308) in.fail("OverflowError", "int too large to convert to float", at);  // 10**precision
      double p = std::pow(10.0, static_cast<double>(prec)), x = v.as_float() * p;
      return Value((method == "ceil" ? std::ceil(x) : std::floor(x)) / p);
    }
    case F_SUM: {
      List items;
      in.iterate(v, items, at);
      const Value* attribute = arg(args, 0, "attribute");
      Value total = arg(args, 1, "start") ? *arg(args, 1, "start") : Value(int64_t(0));
      for (auto& x : items)
        total = in.binop(Op::Add, total, attribute && !attribute->is_none() ? attr_value(in, x, *attribute, at) : x, at);
      return total;
    }
    case F_MIN:
    case F_MAX: {
      List items;
      in.iterate(v, items, at);
      if (items.empty()) return Value::undefined(id == F_MIN ? "No aggregated item, sequence was empty." : "No aggregated item, sequence was empty.");
      bool cs = arg_bool(args, 0, "case_sensitive", false);
      const Value* attribute = arg(args, 1, "attribute");
      auto key = [&](const Value& x) {
        return sort_key(attribute && !attribute->is_none() ? attr_value(in, x, *attribute, at) : x, cs);
      };
      Value best = items[0], best_key = key(best);
      for (auto& x : items) {
        Value k = key(x);
        int c = in.cmp(k, best_key, at, id == F_MIN ? "<" : ">");
        if (id == F_MIN ? c < 0 : c > 0) {
          best = x;
          best_key = std::move(k);
        }
      }
      return best;
    }
    case F_REVERSE: {
      if (v.is_string()) {
        auto cps = utf8_decode(v.str());
        std::reverse(cps.begin(), cps.end());
        return Value(encode(cps, 0, cps.size()));
      }
      List items;
      if (!v.is_sequence() && !v.is_dict() && !v.is_undefined() && !v.is_native())
        in.fail("FilterArgumentError", "argument must be iterable", at);
      in.iterate(v, items, at);
      std::reverse(items.begin(), items.end());
      return Value(new IterObj(std::move(items), "list_reverseiterator"));
    }
    case F_WORDCOUNT: {  // len(re.findall(r"\w+", s))
      int64_t words = 0;
      bool in_word = false;
      for (uint32_t c : utf8_decode(as_text(v))) {
        bool w = c == '_' || cp_isdigit(c) || cp_isalpha(c);
        if (w && !in_word) ++words;
        in_word = w;
      }
      return Value(words);
    }
    case F_FORMAT: {
      if (!args.kw.empty()) {
        Dict d;
        for (auto& kv : args.kw) d.set(Value(kv.first), kv.second);
        return Value(percent_format(in, as_text(v), Value(std::move(d)), at));
      }
      return Value(percent_format(in, as_text(v), Value::tuple(args.pos), at));
    }
    case F_ATTR: return in.getattr(v, arg_str(in, args, 0, "name", at), at);
    case F_BATCH: {
      List items, out, cur;
      in.iterate(v, items, at);
      int64_t n = arg_int(in, args, 0, "linecount", 1, at);
      if (n <= 0) in.fail("ValueError", "batch size must be positive", at);
      const Value* fill = arg(args, 1, "fill_with");
      for (auto& x : items) {
        cur.push_back(x);
        if (static_cast<int64_t>(cur.size()) == n) {
          out.push_back(Value(std::move(cur)));
          cur.clear();
        }
      }
      if (!cur.empty()) {
        if (fill && !fill->is_none()) {
          in.check_output(static_cast<unsigned __int128>(n) * sizeof(Value), at);  // n > cur.size() here
          while (static_cast<int64_t>(cur.size()) < n) cur.push_back(*fill);
        }
        out.push_back(Value(std::move(cur)));
      }
      return Value(std::move(out));
    }
    case F_TRUNCATE: {
      std::string s = as_text(v);
      int64_t length = arg_int(in, args, 0, "length", 255, at);
      bool killwords = arg_bool(args, 1, "killwords", false);
      std::string end = arg(args, 2, "end") ? as_text(*arg(args, 2, "end")) : "...";
      int64_t leeway = arg_int(in, args, 3, "leeway", 5, at);
      auto cps = utf8_decode(s);
      int64_t n = static_cast<int64_t>(cps.size()), elen = static_cast<int64_t>(utf8_length(end));
      // jinja2's asserts; then length - elen is in [0, length] and the sum is taken in 128 bits
      if (length < elen) in.fail("AssertionError", detail::concat("expected length >= ", elen, ", got ", length), at);
      if (leeway < 0) in.fail("AssertionError", detail::concat("expected leeway >= 0, got ", leeway), at);
      if (static_cast<__int128>(n) <= static_cast<__int128>(length) + leeway) return Value(s);
      size_t keep = static_cast<size_t>(std::min(length - elen, n));  // s[:length - len(end)]
      if (killwords) return Value(encode(cps, 0, keep) + end);
      std::string cut = encode(cps, 0, keep);
      size_t sp = cut.rfind(' ');
      if (sp != std::string::npos) cut.resize(sp);
      return Value(cut + end);
    }
    default: in.fail("TemplateRuntimeError", "No filter named '" + name + "'.", at);
  }
}

bool apply_test(Interp& in, int id, const std::string& name, const Value& v, Args& args, const Node& at) {
  auto other = [&]() -> const Value& {
    if (args.pos.empty()) in.fail("TypeError", "test '" + name + "' requires an argument", at);
    return args.pos[0];
  };
  switch (id) {
    case T_DEFINED: return !v.is_undefined();
    case T_UNDEFINED: return v.is_undefined();
    case T_NONE: return v.is_none();
    case T_STRING: return v.is_string();
    case T_MAPPING: return v.is_dict();
    case T_ITERABLE:
      return v.is_string() || v.is_sequence() || v.is_dict() || v.is_undefined() ||
             (v.is_native() && dynamic_cast<IterObj*>(v.native()));
    case T_SEQUENCE: return v.is_string() || v.is_sequence() || v.is_dict() || v.is_undefined();
    case T_FALSE: return v.is_bool() && !v.as_bool();
    case T_TRUE: return v.is_bool() && v.as_bool();
    case T_BOOLEAN: return v.is_bool();
    case T_NUMBER: return v.is_number();
    case T_INTEGER: return v.is_int();
    case T_FLOAT: return v.is_float();
    case T_CALLABLE: return v.is_undefined() || (v.is_native() && dynamic_cast<Callable*>(v.native()));
    case T_EQ: return in.compare(Op::Eq, v, other(), at);
    case T_NE: return in.compare(Op::Ne, v, other(), at);
    case T_LT: return in.compare(Op::Lt, v, other(), at);
    case T_LE: return in.compare(Op::Le, v, other(), at);
    case T_GT: return in.compare(Op::Gt, v, other(), at);
    case T_GE: return in.compare(Op::Ge, v, other(), at);
    case T_IN: return in.compare(Op::In, v, other(), at);
    case T_DIVISIBLEBY: return py_equal(in.binop(Op::Mod, v, other(), at), Value(int64_t(0)));  // value % num == 0
    case T_ODD:
    case T_EVEN: {
      Value r = in.binop(Op::Mod, v, Value(int64_t(2)), at);  // value % 2 == 1 / == 0, as jinja2
      return py_equal(r, Value(int64_t(id == T_ODD ? 1 : 0)));
    }
    case T_LOWER: {
      std::string s = as_text(v);
      return lower(s) == s && upper(s) != s;
    }
    case T_UPPER: {
      std::string s = as_text(v);
      return upper(s) == s && lower(s) != s;
    }
    case T_SAMEAS: {
      const Value& o = other();
      if (v.kind() != o.kind()) return false;
      if (v.is_none() || v.is_undefined()) return true;
      if (v.is_bool() || v.is_int()) return v.as_int() == o.as_int();
      return v.identity() == o.identity() && !(v.is_float());
    }
    case T_FILTER: return v.is_string() && filter_id(v.str()) >= 0;
    case T_TEST: return v.is_string() && test_id(v.str()) >= 0;
    case T_ESCAPED: return v.is_markup();  // Markup (|safe, |escape) has __html__
    default: in.fail("TemplateRuntimeError", "No test named '" + name + "'.", at);
  }
}

// ---------------------------------------------------------------- methods
static const char* kStrMethods[] = {
    "strip", "lstrip", "rstrip", "split", "rsplit", "splitlines", "startswith", "endswith", "replace", "upper",
    "lower", "title", "capitalize", "find", "rfind", "index", "rindex", "count", "join", "format", "isdigit",
    "isalpha", "isalnum", "isspace", "isupper", "islower", "isnumeric", "isdecimal", "zfill", "center", "ljust",
    "rjust", "partition", "rpartition", "removeprefix", "removesuffix", "casefold", "swapcase", "encode",
    "expandtabs", "format_map", "istitle", "isidentifier", "isprintable", "isascii", "translate", "maketrans"};
static const char* kDictMethods[] = {"get", "items", "keys", "values", "copy", "pop", "popitem", "setdefault",
                                     "update", "clear", "fromkeys"};
static const char* kListMethods[] = {"index", "count", "copy", "append", "extend", "insert", "pop", "remove",
                                     "reverse", "sort", "clear"};

bool has_method(const Value& obj, const std::string& name) {
  static const auto make = [](const char* const* t, size_t n) {
    std::unordered_set<std::string_view> set;
    for (size_t i = 0; i < n; ++i) set.insert(t[i]);
    return set;
  };
  static const std::unordered_set<std::string_view> str_methods = make(kStrMethods, std::size(kStrMethods));
  static const std::unordered_set<std::string_view> dict_methods = make(kDictMethods, std::size(kDictMethods));
  static const std::unordered_set<std::string_view> list_methods = make(kListMethods, std::size(kListMethods));
  // (length, first letter) of every method name: most attribute names (role, content, ...) stop here, unhashed
  static const std::array<uint32_t, 16> maybe = [] {
    std::array<uint32_t, 16> m{};
    for (auto* t : {&str_methods, &dict_methods, &list_methods})
      for (auto name : *t) m[std::min<size_t>(name.size(), 15)] |= 1u << (name[0] - 'a');
    return m;
  }();
  if (name.size() > 1 && name[0] == '_' && name[1] == '_' && !obj.is_namespace()) return true;
  if (name.empty() || name[0] < 'a' || name[0] > 'z' || !((maybe[std::min<size_t>(name.size(), 15)] >> (name[0] - 'a')) & 1))
    return false;
  switch (obj.kind()) {
    case Kind::String: return str_methods.count(name) > 0;
    case Kind::Dict: return dict_methods.count(name) > 0;
    case Kind::List: return list_methods.count(name) > 0;
    case Kind::Tuple: return name == "index" || name == "count";
    default: return false;
  }
}

bool is_dict_method(std::string_view name) {
  static const Value* const dict = process_values({Value::dict()});
  return has_method(*dict, std::string(name));
}

Value BoundMethod::call(Interp& in, Args& args, const Node& at) {
  if (self.is_native()) {
    if (auto* c = dynamic_cast<CyclerObj*>(self.native())) {
      if (name == "reset") {
        c->pos = 0;
        return Value();
      }
      Value v = c->items[c->pos];
      c->pos = (c->pos + 1) % c->items.size();
      return v;
    }
    if (auto* l = dynamic_cast<LoopObj*>(self.native())) {
      if (name == "cycle") {
        if (args.pos.empty()) in.fail("TypeError", "no items for cycling given", at);
        return args.pos[static_cast<size_t>(l->index0) % args.pos.size()];
      }
      if (name == "changed") {
        Value now = Value::tuple(args.pos);
        if (l->changed_seen && py_equal(now, l->last_changed)) return Value(false);
        l->changed_seen = true;
        l->last_changed = now;
        return Value(true);
      }
      in.fail("TypeError", "loop." + name + "() is not supported", at);
    }
  }
  bool found;
  return call_method(in, self, name, args, at, found);
}

Value call_method(Interp& in, const Value& obj, const std::string& name, Args& args, const Node& at, bool& found) {
  found = true;
  if (obj.is_string()) {
    const std::string& s = obj.str();
    if (name == "__mod__") {
      if (!obj.is_markup()) return Value(percent_format(in, s, args.pos[0], at));
      // Markup % args: each argument that is not a number or Markup is formatted escaped
      auto escaped = [](const Value& x) {
        return x.is_number() || x.is_markup() || x.is_none() ? x : Value::markup(html_escape(py_str(x)));
      };
      const Value& a = args.pos[0];
      Value safe_args = escaped(a);
      if (a.kind() == Kind::Tuple) {
        List items;
        for (auto& x : a.list()) items.push_back(escaped(x));
        safe_args = Value::tuple(std::move(items));
      } else if (a.is_dict()) {
        safe_args = Value::dict();
        for (auto& [k, x] : a.dict_ref().items) safe_args.set(k, escaped(x));
      }
      return Value::markup(percent_format(in, s, safe_args, at));
    }
    if (name == "strip") return strip_value(obj, s, arg(args, 0, "chars"), true, true);
    if (name == "lstrip") return strip_value(obj, s, arg(args, 0, "chars"), true, false);
    if (name == "rstrip") return strip_value(obj, s, arg(args, 0, "chars"), false, true);
    if (name == "split" || name == "rsplit") {
      const Value* sep = arg(args, 0, "sep");
      int64_t maxsplit = arg_int(in, args, 1, "maxsplit", -1, at);
      if (!sep || sep->is_none()) return Value(split_ws(s, maxsplit, name == "rsplit"));
      if (!sep->is_string()) in.fail("TypeError", detail::concat("must be str or None, not ", sep->type_name()), at);
      if (sep->str().empty()) in.fail("ValueError", "empty separator", at);
      return Value(split_sep(s, sep->str(), maxsplit, name == "rsplit"));
    }
    if (name == "splitlines") return Value(splitlines(s, arg_bool(args, 0, "keepends", false)));
    if (name == "startswith" || name == "endswith") {
      const Value* p = arg(args, 0, "prefix");
      if (!p) in.fail("TypeError", name + "() takes at least 1 argument (0 given)", at);
      List cands;
      if (p->is_tuple()) cands = p->list();
      else if (p->is_string()) cands.push_back(*p);
      else
        in.fail("TypeError", detail::concat(name, " first arg must be str or a tuple of str, not ", p->type_name()), at);
      for (auto& c : cands) {
        if (!c.is_string()) in.fail("TypeError", "tuple for " + name + " must only contain str", at);
        const std::string& x = c.str();
        if (x.size() > s.size()) continue;
        if (name == "startswith" ? s.compare(0, x.size(), x) == 0 : s.compare(s.size() - x.size(), x.size(), x) == 0) return Value(true);
      }
      return Value(false);
    }
    if (name == "replace") {
      const std::string &o = arg_str(in, args, 0, "old", at), &r = arg_str(in, args, 1, "new", at);
      int64_t count = arg_int(in, args, 2, "count", -1, at);
      check_replace(in, s, o, r, count, at);
      return Value(replace(s, o, r, count));
    }
    if (name == "upper") return Value(upper(s));
    if (name == "lower" || name == "casefold") return Value(lower(s));
    if (name == "swapcase") return Value(map_cps(s, [](uint32_t c) { return cp_isupper(c) ? cp_lower(c) : cp_upper(c); }));
    if (name == "title") {
      auto cps = utf8_decode(s);
      std::string out;
      bool prev_cased = false;
      for (uint32_t c : cps) {
        bool cased = cp_isalpha(c);
        utf8_append(out, cased ? (prev_cased ? cp_lower(c) : cp_upper(c)) : c);
        prev_cased = cased;
      }
      return Value(out);
    }
    if (name == "capitalize") {
      auto cps = utf8_decode(s);
      std::string out;
      for (size_t i = 0; i < cps.size(); ++i) utf8_append(out, i == 0 ? cp_upper(cps[i]) : cp_lower(cps[i]));
      return Value(out);
    }
    if (name == "find" || name == "rfind" || name == "index" || name == "rindex" || name == "count") {
      const std::string& sub = arg_str(in, args, 0, "sub", at);
      if (name == "count") {
        if (sub.empty()) return Value(static_cast<int64_t>(utf8_length(s) + 1));
        int64_t c = 0;
        for (size_t p = s.find(sub); p != std::string::npos; p = s.find(sub, p + sub.size())) ++c;
        return Value(c);
      }
      size_t p = (name[0] == 'r') ? s.rfind(sub) : s.find(sub);
      if (p == std::string::npos) {
        if (name == "index" || name == "rindex") in.fail("ValueError", "substring not found", at);
        return Value(int64_t(-1));
      }
      return Value(cp_index(s, p));
    }
    if (name == "join") {
      const Value* it = arg(args, 0, "iterable");
      if (!it) in.fail("TypeError", "join() takes exactly one argument (0 given)", at);
      List items;
      in.iterate(*it, items, at);
      std::string out;
      for (size_t i = 0; i < items.size(); ++i) {
        if (!items[i].is_string())
          in.fail("TypeError", detail::concat("sequence item ", i, ": expected str instance, ", items[i].type_name(), " found"), at);
        if (i) out += s;
        out += items[i].str();
        in.check_output(out.size(), at);
      }
      return Value(std::move(out));
    }
    if (name == "format") {
      std::string r = str_format(in, s, args, at, obj.is_markup());
      return obj.is_markup() ? Value::markup(std::move(r)) : Value(std::move(r));
    }
    if (name.rfind("is", 0) == 0) {
      auto cps = utf8_decode(s);
      if (name == "isascii") return Value(std::all_of(cps.begin(), cps.end(), [](uint32_t c) { return c < 0x80; }));
      if (cps.empty()) return Value(false);
      if (name == "isdigit" || name == "isnumeric" || name == "isdecimal") return Value(std::all_of(cps.begin(), cps.end(), cp_isdigit));
      if (name == "isalpha") return Value(std::all_of(cps.begin(), cps.end(), cp_isalpha));
      if (name == "isalnum") return Value(std::all_of(cps.begin(), cps.end(), [](uint32_t c) { return cp_isalpha(c) || cp_isdigit(c); }));
      if (name == "isspace") return Value(std::all_of(cps.begin(), cps.end(), py_isspace));
      if (name == "isupper" || name == "islower") {
        bool any = false;
        for (uint32_t c : cps) {
          if (name == "isupper" ? cp_islower(c) : cp_isupper(c)) return Value(false);
          any = any || (name == "isupper" ? cp_isupper(c) : cp_islower(c));
        }
        return Value(any);
      }
    }
    if (name == "zfill" || name == "center" || name == "ljust" || name == "rjust") {
      int64_t width = arg_int(in, args, 0, "width", 0, at);
      in.check_output(static_cast<size_t>(std::max<int64_t>(0, width)), at);
      std::string fill = name == "zfill" ? "0" : (arg(args, 1, "fillchar") ? arg_str(in, args, 1, "fillchar", at) : " ");
      int64_t len = static_cast<int64_t>(utf8_length(s));
      if (width <= len) return Value(s);
      int64_t pad = width - len;
      auto rep = [&](int64_t k) {
        std::string r;
        for (int64_t i = 0; i < k; ++i) r += fill;
        return r;
      };
      if (name == "ljust") return Value(s + rep(pad));
      if (name == "rjust") return Value(rep(pad) + s);
      if (name == "zfill") {
        if (!s.empty() && (s[0] == '-' || s[0] == '+')) return Value(s.substr(0, 1) + rep(pad) + s.substr(1));
        return Value(rep(pad) + s);
      }
      int64_t left = pad / 2 + (pad & width & 1);
      return Value(rep(left) + s + rep(pad - left));
    }
    if (name == "partition" || name == "rpartition") {
      const std::string& sep = arg_str(in, args, 0, "sep", at);
      if (sep.empty()) in.fail("ValueError", "empty separator", at);
      size_t p = name == "partition" ? s.find(sep) : s.rfind(sep);
      if (p == std::string::npos)
        return name == "partition" ? Value::tuple({Value(s), Value(""), Value("")}) : Value::tuple({Value(""), Value(""), Value(s)});
      return Value::tuple({Value(s.substr(0, p)), Value(sep), Value(s.substr(p + sep.size()))});
    }
    if (name == "removeprefix") {
      const std::string& p = arg_str(in, args, 0, "prefix", at);
      return Value(s.compare(0, p.size(), p) == 0 && p.size() <= s.size() ? s.substr(p.size()) : s);
    }
    if (name == "removesuffix") {
      const std::string& p = arg_str(in, args, 0, "suffix", at);
      return Value(!p.empty() && p.size() <= s.size() && s.compare(s.size() - p.size(), p.size(), p) == 0 ? s.substr(0, s.size() - p.size()) : s);
    }
  } else if (obj.is_dict()) {
    const Dict& d = obj.dict_ref();
    if (name == "get") {
      const Value* k = arg(args, 0, "key");
      if (!k) in.fail("TypeError", "get expected at least 1 argument, got 0", at);
      if (const Value* v = d.find(*k)) return *v;
      const Value* dflt = arg(args, 1, "default");
      return dflt ? *dflt : Value();
    }
    if (name == "items") {
      List out;
      for (auto& kv : d.items) out.push_back(Value::tuple({kv.first, kv.second}));
      return Value(std::move(out));
    }
    if (name == "keys" || name == "values") {
      List out;
      for (auto& kv : d.items) out.push_back(name == "keys" ? kv.first : kv.second);
      return Value(std::move(out));
    }
    if (name == "copy") return Value(Dict(d));
  } else if (obj.is_sequence()) {
    const List& l = obj.list();
    if (name == "index" || name == "count") {
      const Value* x = arg(args, 0, "value");
      if (!x) in.fail("TypeError", name + "() takes exactly one argument (0 given)", at);
      int64_t c = 0;
      for (size_t i = 0; i < l.size(); ++i)
        if (py_equal(l[i], *x)) {
          if (name == "index") return Value(static_cast<int64_t>(i));
          ++c;
        }
      if (name == "index") in.fail("ValueError", detail::concat(py_repr(*x), " is not in list"), at);
      return Value(c);
    }
    if (name == "copy") return Value(List(l), obj.kind());
  }
  found = false;
  if (!name.empty() && name[0] == '_')
    in.fail("SecurityError", detail::concat("access to attribute '", name, "' of '", obj.type_name(), "' object is unsafe."), at);
  in.fail("TypeError", detail::concat("'", obj.type_name(), "' method '", name, "' is not supported"), at);
}

// ---------------------------------------------------------------- globals
namespace {

struct Builtin : Callable {
  enum Id { Range, DictFn, NamespaceFn, RaiseException, StrftimeNow, Joiner, Cycler, DictFromKeys } id;
  explicit Builtin(Id i) : id(i) {}
  const char* type_name() const override { return "function"; }
  Value call(Interp& in, Args& args, const Node& at) override {
    switch (id) {
      case Range: {
        int64_t start = 0, stop, step = 1;
        auto num = [&](size_t i) {
          if (!args.pos[i].is_int() && !args.pos[i].is_bool())
            in.fail("TypeError", detail::concat("'", args.pos[i].type_name(), "' object cannot be interpreted as an integer"), at);
          return args.pos[i].as_int();
        };
        if (args.pos.size() == 1) stop = num(0);
        else if (args.pos.size() == 2 || args.pos.size() == 3) {
          start = num(0);
          stop = num(1);
          if (args.pos.size() == 3) step = num(2);
        } else {
          in.fail("TypeError", detail::concat("range expected at most 3 arguments, got ", args.pos.size()), at);
        }
        if (step == 0) in.fail("ValueError", "range() arg 3 must not be zero", at);
        __int128 span = step > 0 ? (__int128)stop - start : (__int128)start - stop;
        __int128 mag = step > 0 ? (__int128)step : -(__int128)step;
        int64_t n = span > 0 ? static_cast<int64_t>(std::min<__int128>((span + mag - 1) / mag, 1 << 30)) : 0;
        if (n > 100000) in.fail("OverflowError", "Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000).", at);
        in.charge(static_cast<size_t>(n), at);
        List l;
        l.reserve(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) l.push_back(Value(static_cast<int64_t>(start + static_cast<__int128>(i) * step)));  // i * step may not fit
        return Value::range(start, stop, step, std::move(l));
      }
      case DictFromKeys: {  // dict.fromkeys(iterable, value=None)
        if (args.pos.empty() || args.pos.size() > 2)
          in.fail("TypeError", detail::concat("fromkeys expected 1 or 2 arguments, got ", args.pos.size()), at);
        List keys;
        in.iterate(args.pos[0], keys, at);
        Value out = Value::dict();
        Value value = args.pos.size() > 1 ? args.pos[1] : Value();
        for (auto& k : keys) {
          if (!hashable(k)) in.fail("TypeError", detail::concat("unhashable type: '", k.type_name(), "'"), at);
          out.set(k, value);
        }
        return out;
      }
      case DictFn:
      case NamespaceFn: {
        Dict d;
        if (!args.pos.empty()) {
          if (args.pos.size() > 1) in.fail("TypeError", detail::concat("dict expected at most 1 argument, got ", args.pos.size()), at);
          const Value& src = args.pos[0];
          if (src.is_dict() || src.is_namespace()) d = src.dict_ref();
          else {
            List items;
            in.iterate(src, items, at);
            for (auto& kv : items) {
              if (!kv.is_sequence() || kv.list().size() != 2)
                in.fail("ValueError", "dictionary update sequence element has wrong length", at);
              d.set(kv.list()[0], kv.list()[1]);
            }
          }
        }
        for (auto& kv : args.kw) d.set(Value(kv.first), kv.second);
        if (id == NamespaceFn) {
          for (auto& kv : d.items)
            if (kv.first.is_string() && !kv.first.str().empty() && kv.first.str()[0] == '_')
              in.fail("SecurityError", "Chat templates cannot store underscore-prefixed attributes on a namespace, but got '" +
                                           kv.first.str() + "'. Please rename the attribute.", at);
          Value ns(std::move(d), Kind::Namespace);
          in.track_namespace(ns);
          return ns;
        }
        return Value(std::move(d));
      }
      case RaiseException: {
        std::string msg = args.pos.empty() ? "" : py_str(args.pos[0]);
        in.fail("TemplateError", msg, at);
      }
      case Joiner: {
        auto* j = new JoinerObj;
        Value joiner(j);
        const Value* sep = args.get(0, "sep");
        j->sep = sep ? *sep : Value(", ");
        return joiner;
      }
      case Cycler: {
        if (args.pos.empty()) in.fail("RuntimeError", "at least one item has to be provided", at);
        auto* c = new CyclerObj;
        Value cycler(c);
        c->items = args.pos;
        return cycler;
      }
      case StrftimeNow: {
        if (args.pos.empty() || !args.pos[0].is_string()) in.fail("TypeError", "strftime_now() requires a format string", at);
        std::time_t t = in.opt.now >= 0 ? static_cast<std::time_t>(in.opt.now) : std::time(nullptr);
        std::tm tm{};
        if (in.opt.now >= 0) gmtime_r(&t, &tm);
        else localtime_r(&t, &tm);
        // transformers formats a naive datetime.now(): %Z and %z are empty
        std::string fmt;
        const std::string& f = args.pos[0].str();
        for (size_t i = 0; i < f.size(); ++i) {
          if (f[i] == '%' && i + 1 < f.size() && (f[i + 1] == 'Z' || f[i + 1] == 'z')) {
            ++i;
            continue;
          }
          fmt += f[i];
          if (f[i] == '%' && i + 1 < f.size()) fmt += f[++i];
        }
        char buf[512];
        size_t n = std::strftime(buf, sizeof buf, fmt.c_str(), &tm);
        return Value(std::string(buf, n));
      }
    }
    return Value();
  }
};

}  // namespace

const Value* builtin_attribute(const Value& obj, const std::string& name) {
  auto* b = obj.is_native() ? dynamic_cast<Builtin*>(obj.native()) : nullptr;
  if (!b || b->id != Builtin::DictFn || name != "fromkeys") return nullptr;
  static const Value* const fromkeys = process_values({Value(new Builtin(Builtin::DictFromKeys))});
  return fromkeys;
}

void link_builtins(Program& prog) {
  static const std::pair<const char*, Builtin::Id> table[] = {
      {"range", Builtin::Range}, {"dict", Builtin::DictFn}, {"namespace", Builtin::NamespaceFn},
      {"raise_exception", Builtin::RaiseException}, {"strftime_now", Builtin::StrftimeNow},
      {"joiner", Builtin::Joiner}, {"cycler", Builtin::Cycler}};
  static const Value* const fns = [] {  // stateless: shared by every render
    std::vector<Value> v;
    for (auto& [name, id] : table) v.emplace_back(new Builtin(id));
    return process_values(std::move(v));
  }();
  prog.builtins.clear();
  for (size_t i = 0; i < std::size(table); ++i) {
    int sym = prog.find_sym(table[i].first);
    if (sym >= 0) prog.builtins.emplace_back(sym, fns[i]);
  }
}

}  // namespace qforge::chat
