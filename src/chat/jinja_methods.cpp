// The Python str / list / dict methods templates call (read-only: the
// sandbox refuses the mutating ones), and bound methods of loop and cycler.
#include <algorithm>
#include <array>
#include <unordered_set>

#include "jinja_builtins.hpp"

namespace qforge::chat {

using namespace builtins;

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

namespace {

// obj.name(args); `name` tells the methods one function serves apart (split / rsplit, ...)
using MethodFn = Value (*)(Interp& in, const Value& obj, const std::string& name, Args& args, const Node& at);
struct NamedMethod {
  const char* name;
  MethodFn fn;
};

Value str_mod(Interp& in, const Value& obj, const std::string&, Args& args, const Node& at) {
  const std::string& s = obj.str();
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

Value str_strip(Interp&, const Value& obj, const std::string&, Args& args, const Node&) {
  return strip_value(obj, obj.str(), arg(args, 0, "chars"), true, true);
}

Value str_lstrip(Interp&, const Value& obj, const std::string&, Args& args, const Node&) {
  return strip_value(obj, obj.str(), arg(args, 0, "chars"), true, false);
}

Value str_rstrip(Interp&, const Value& obj, const std::string&, Args& args, const Node&) {
  return strip_value(obj, obj.str(), arg(args, 0, "chars"), false, true);
}

Value str_split(Interp& in, const Value& obj, const std::string& name, Args& args, const Node& at) {
  const std::string& s = obj.str();
  const Value* sep = arg(args, 0, "sep");
  int64_t maxsplit = arg_int(in, args, 1, "maxsplit", -1, at);
  if (!sep || sep->is_none()) return Value(split_ws(s, maxsplit, name == "rsplit"));
  if (!sep->is_string()) in.fail("TypeError", detail::concat("must be str or None, not ", sep->type_name()), at);
  if (sep->str().empty()) in.fail("ValueError", "empty separator", at);
  return Value(split_sep(s, sep->str(), maxsplit, name == "rsplit"));
}

Value str_splitlines(Interp&, const Value& obj, const std::string&, Args& args, const Node&) {
  return Value(splitlines(obj.str(), arg_bool(args, 0, "keepends", false)));
}

Value str_starts_or_ends_with(Interp& in, const Value& obj, const std::string& name, Args& args, const Node& at) {
  const std::string& s = obj.str();
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

Value str_replace(Interp& in, const Value& obj, const std::string&, Args& args, const Node& at) {
  const std::string& s = obj.str();
  const std::string &o = arg_str(in, args, 0, "old", at), &r = arg_str(in, args, 1, "new", at);
  int64_t count = arg_int(in, args, 2, "count", -1, at);
  check_replace(in, s, o, r, count, at);
  return Value(replace(s, o, r, count));
}

Value str_upper(Interp&, const Value& obj, const std::string&, Args&, const Node&) { return Value(upper(obj.str())); }

Value str_lower(Interp&, const Value& obj, const std::string&, Args&, const Node&) { return Value(lower(obj.str())); }

Value str_swapcase(Interp&, const Value& obj, const std::string&, Args&, const Node&) {
  return Value(map_cps(obj.str(), [](uint32_t c) { return cp_isupper(c) ? cp_lower(c) : cp_upper(c); }));
}

Value str_title(Interp&, const Value& obj, const std::string&, Args&, const Node&) {
  const std::string& s = obj.str();
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

Value str_capitalize(Interp&, const Value& obj, const std::string&, Args&, const Node&) {
  const std::string& s = obj.str();
  auto cps = utf8_decode(s);
  std::string out;
  for (size_t i = 0; i < cps.size(); ++i) utf8_append(out, i == 0 ? cp_upper(cps[i]) : cp_lower(cps[i]));
  return Value(out);
}

Value str_find_index_count(Interp& in, const Value& obj, const std::string& name, Args& args, const Node& at) {
  const std::string& s = obj.str();
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

Value str_join(Interp& in, const Value& obj, const std::string&, Args& args, const Node& at) {
  const std::string& s = obj.str();
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

Value str_format_method(Interp& in, const Value& obj, const std::string&, Args& args, const Node& at) {
  const std::string& s = obj.str();
  std::string r = builtins::str_format(in, s, args, at, obj.is_markup());
  return obj.is_markup() ? Value::markup(std::move(r)) : Value(std::move(r));
}

Value str_character_test(Interp&, const Value& obj, const std::string& name, Args&, const Node&) {
  const std::string& s = obj.str();
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
  return Value(false);  // not reached: the table sends only the names above
}

Value str_pad(Interp& in, const Value& obj, const std::string& name, Args& args, const Node& at) {
  const std::string& s = obj.str();
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

Value str_partition(Interp& in, const Value& obj, const std::string& name, Args& args, const Node& at) {
  const std::string& s = obj.str();
  const std::string& sep = arg_str(in, args, 0, "sep", at);
  if (sep.empty()) in.fail("ValueError", "empty separator", at);
  size_t p = name == "partition" ? s.find(sep) : s.rfind(sep);
  if (p == std::string::npos)
    return name == "partition" ? Value::tuple({Value(s), Value(""), Value("")}) : Value::tuple({Value(""), Value(""), Value(s)});
  return Value::tuple({Value(s.substr(0, p)), Value(sep), Value(s.substr(p + sep.size()))});
}

Value str_removeprefix(Interp& in, const Value& obj, const std::string&, Args& args, const Node& at) {
  const std::string& s = obj.str();
  const std::string& p = arg_str(in, args, 0, "prefix", at);
  return Value(s.compare(0, p.size(), p) == 0 && p.size() <= s.size() ? s.substr(p.size()) : s);
}

Value str_removesuffix(Interp& in, const Value& obj, const std::string&, Args& args, const Node& at) {
  const std::string& s = obj.str();
  const std::string& p = arg_str(in, args, 0, "suffix", at);
  return Value(!p.empty() && p.size() <= s.size() && s.compare(s.size() - p.size(), p.size(), p) == 0 ? s.substr(0, s.size() - p.size()) : s);
}

Value dict_get(Interp& in, const Value& obj, const std::string&, Args& args, const Node& at) {
  const Dict& d = obj.dict_ref();
  const Value* k = arg(args, 0, "key");
  if (!k) in.fail("TypeError", "get expected at least 1 argument, got 0", at);
  if (const Value* v = d.find(*k)) return *v;
  const Value* dflt = arg(args, 1, "default");
  return dflt ? *dflt : Value();
}

Value dict_items(Interp&, const Value& obj, const std::string&, Args&, const Node&) {
  const Dict& d = obj.dict_ref();
  List out;
  for (auto& kv : d.items) out.push_back(Value::tuple({kv.first, kv.second}));
  return Value(std::move(out));
}

Value dict_keys_or_values(Interp&, const Value& obj, const std::string& name, Args&, const Node&) {
  const Dict& d = obj.dict_ref();
  List out;
  for (auto& kv : d.items) out.push_back(name == "keys" ? kv.first : kv.second);
  return Value(std::move(out));
}

Value dict_copy(Interp&, const Value& obj, const std::string&, Args&, const Node&) {
  return Value(Dict(obj.dict_ref()));
}

Value list_index_or_count(Interp& in, const Value& obj, const std::string& name, Args& args, const Node& at) {
  const List& l = obj.list();
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

Value list_copy(Interp&, const Value& obj, const std::string&, Args&, const Node&) {
  return Value(List(obj.list()), obj.kind());
}

const NamedMethod kStrMethodFns[] = {
    {"__mod__", str_mod},
    {"strip", str_strip},
    {"lstrip", str_lstrip},
    {"rstrip", str_rstrip},
    {"split", str_split},
    {"rsplit", str_split},
    {"splitlines", str_splitlines},
    {"startswith", str_starts_or_ends_with},
    {"endswith", str_starts_or_ends_with},
    {"replace", str_replace},
    {"upper", str_upper},
    {"lower", str_lower},
    {"casefold", str_lower},
    {"swapcase", str_swapcase},
    {"title", str_title},
    {"capitalize", str_capitalize},
    {"find", str_find_index_count},
    {"rfind", str_find_index_count},
    {"index", str_find_index_count},
    {"rindex", str_find_index_count},
    {"count", str_find_index_count},
    {"join", str_join},
    {"format", str_format_method},
    {"isascii", str_character_test},
    {"isdigit", str_character_test},
    {"isnumeric", str_character_test},
    {"isdecimal", str_character_test},
    {"isalpha", str_character_test},
    {"isalnum", str_character_test},
    {"isspace", str_character_test},
    {"isupper", str_character_test},
    {"islower", str_character_test},
    {"isupper", str_character_test},
    {"isupper", str_character_test},
    {"zfill", str_pad},
    {"center", str_pad},
    {"ljust", str_pad},
    {"rjust", str_pad},
    {"partition", str_partition},
    {"rpartition", str_partition},
    {"removeprefix", str_removeprefix},
    {"removesuffix", str_removesuffix},
};
const NamedMethod kDictMethodFns[] = {
    {"get", dict_get},
    {"items", dict_items},
    {"keys", dict_keys_or_values},
    {"values", dict_keys_or_values},
    {"copy", dict_copy},
};
const NamedMethod kListMethodFns[] = {
    {"index", list_index_or_count},
    {"count", list_index_or_count},
    {"copy", list_copy},
};

template <size_t N>
MethodFn find_method(const NamedMethod (&table)[N], const std::string& name) {
  for (auto& m : table)
    if (name == m.name) return m.fn;
  return nullptr;
}

}  // namespace

Value call_method(Interp& in, const Value& obj, const std::string& name, Args& args, const Node& at, bool& found) {
  found = true;
  MethodFn fn = obj.is_string() ? find_method(kStrMethodFns, name)
                : obj.is_dict() ? find_method(kDictMethodFns, name)
                : obj.is_sequence() ? find_method(kListMethodFns, name)
                                    : nullptr;
  if (fn) return fn(in, obj, name, args, at);
  found = false;
  if (!name.empty() && name[0] == '_')
    in.fail("SecurityError", detail::concat("access to attribute '", name, "' of '", obj.type_name(), "' object is unsafe."), at);
  in.fail("TypeError", detail::concat("'", obj.type_name(), "' method '", name, "' is not supported"), at);
}

}  // namespace qforge::chat
