// Python's text operations (case mapping, strip, split, replace, hashing),
// argument readers, attribute paths and sorting, %-formatting and
// str.format: shared by the filters, tests and methods.
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>

#include "jinja_builtins.hpp"

namespace qforge::chat {

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

namespace builtins {

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
static uint32_t cp_at(std::string_view s, size_t i, size_t& len) {
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
static size_t format_number(Interp& in, const std::string& fmt, size_t& i, const Node& at) {
  unsigned __int128 n = 0;
  while (i < fmt.size() && fmt[i] >= '0' && fmt[i] <= '9') {
    n = n * 10 + static_cast<unsigned>(fmt[i++] - '0');
    in.check_output(n, at);
  }
  return static_cast<size_t>(n);
}

// s padded to `width` code points (left-aligned with '-'), cut to `prec` first.
static void pad_text(std::string& out, std::string s, bool left, size_t width, long long prec) {
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
static void format_field(Interp& in, std::string& out, const Value& v, const std::string& spec, const Node& at) {
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
std::string str_format(Interp& in, const std::string& fmt, Args& args, const Node& at, bool escape) {
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

}  // namespace builtins
}  // namespace qforge::chat
