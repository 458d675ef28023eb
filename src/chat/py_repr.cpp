// Python's repr() and str() of Values, floats' shortest round-trip repr included.
#include "qforge/chat/value.hpp"

#include <charconv>
#include <cmath>

#include "qforge/error.hpp"

namespace qforge::chat {

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

}  // namespace qforge::chat
