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

}  // namespace qforge::chat
