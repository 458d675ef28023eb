// jinja2's builtin filters, one function each, found by name at parse time
// (filter_id: the index in kFilters, held by the Filter node).
#include <algorithm>
#include <cmath>

#include "jinja_builtins.hpp"

namespace qforge::chat {

using namespace builtins;

namespace {

using FilterFn = Value (*)(Interp& in, Value input, Args& args, const Node& at);

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

Value filter_tojson(Interp& in, Value v, Args& args, const Node& at) {
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

Value filter_length(Interp& in, Value v, Args&, const Node& at) {
  if (v.is_undefined()) return Value(int64_t(0));
  if (!v.is_string() && !v.is_sequence() && !v.is_dict())
    in.fail("TypeError", detail::concat("object of type '", v.type_name(), "' has no len()"), at);
  return Value(static_cast<int64_t>(v.size()));
}

Value filter_trim(Interp&, Value v, Args& args, const Node&) {
  if (v.is_string()) return strip_value(v, v.str(), arg(args, 0, "chars"), true, true);
  return Value(strip(as_text(v), arg(args, 0, "chars"), true, true));
}

Value filter_default(Interp&, Value v, Args& args, const Node&) {
  const Value* d = arg(args, 0, "default_value");
  bool boolean = arg_bool(args, 1, "boolean", false);
  if (v.is_undefined() || (boolean && !v.truthy())) return d ? *d : Value("");
  return v;
}

Value filter_string(Interp&, Value v, Args&, const Node&) { return v.is_string() ? v : Value(as_text(v)); }

Value filter_upper(Interp&, Value v, Args&, const Node&) { return Value(upper(as_text(v))); }

Value filter_lower(Interp&, Value v, Args&, const Node&) { return Value(lower(as_text(v))); }

Value filter_capitalize(Interp&, Value v, Args&, const Node&) {
  auto cps = utf8_decode(as_text(v));
  std::string out;
  for (size_t i = 0; i < cps.size(); ++i) utf8_append(out, i == 0 ? cp_upper(cps[i]) : cp_lower(cps[i]));
  return Value(out);
}

Value filter_title(Interp&, Value v, Args&, const Node&) {
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

Value filter_join(Interp& in, Value v, Args& args, const Node& at) {
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

Value filter_items(Interp& in, Value v, Args&, const Node& at) {
  // a generator in jinja2 (always truthy, no len)
  if (v.is_undefined()) return generator({});
  if (!v.is_dict()) in.fail("TypeError", "Can only get item pairs from a mapping.", at);
  List out;
  for (auto& kv : v.dict_ref().items) out.push_back(Value::tuple({kv.first, kv.second}));
  return generator(std::move(out));
}

Value filter_dictsort(Interp& in, Value v, Args& args, const Node& at) {
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

Value filter_safe(Interp&, Value v, Args&, const Node&) { return v.is_markup() ? v : Value::markup(as_text(v)); }

Value filter_escape(Interp&, Value v, Args&, const Node&) {
  return v.is_markup() ? v : Value::markup(html_escape(as_text(v)));
}

Value filter_forceescape(Interp&, Value v, Args&, const Node&) { return Value::markup(html_escape(as_text(v))); }

Value filter_list(Interp& in, Value v, Args&, const Node& at) {
  List items;
  in.iterate(v, items, at);
  return Value(std::move(items));
}

Value filter_map(Interp& in, Value v, Args& args, const Node& at) {
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

Value filter_selectattr(Interp& in, Value v, Args& args, const Node& at) { return select_or_reject(in, v, args, at, true, true); }

Value filter_rejectattr(Interp& in, Value v, Args& args, const Node& at) { return select_or_reject(in, v, args, at, true, false); }

Value filter_select(Interp& in, Value v, Args& args, const Node& at) { return select_or_reject(in, v, args, at, false, true); }

Value filter_reject(Interp& in, Value v, Args& args, const Node& at) { return select_or_reject(in, v, args, at, false, false); }

Value filter_indent(Interp& in, Value v, Args& args, const Node& at) {
  if (v.is_undefined()) in.fail_undefined(v, at);
  if (v.is_list()) in.fail("AttributeError", "'list' object has no attribute 'splitlines'", at);  // list += str extends
  if (v.is_tuple()) in.fail("TypeError", "can only concatenate tuple (not \"str\") to tuple", at);
  if (!v.is_string()) in.fail("TypeError", detail::concat("unsupported operand type(s) for +=: '", v.type_name(), "' and 'str'"), at);
  return Value(indent(in, as_text(v), arg(args, 0, "width"), arg_bool(args, 1, "first", false), arg_bool(args, 2, "blank", false), at));
}

Value filter_replace(Interp& in, Value v, Args& args, const Node& at) {
  const Value* old = arg(args, 0, "old");
  const Value* rep = arg(args, 1, "new");
  if (!old || !rep) in.fail("TypeError", "replace() missing required arguments", at);
  int64_t count = arg_int(in, args, 2, "count", -1, at);
  std::string text = as_text(v), o = as_text(*old), r = as_text(*rep);
  check_replace(in, text, o, r, count, at);
  return Value(replace(text, o, r, count));
}

Value filter_int(Interp& in, Value v, Args& args, const Node& at) {
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

Value filter_float(Interp& in, Value v, Args& args, const Node& at) {
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

Value filter_unique(Interp& in, Value v, Args& args, const Node& at) {
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

Value filter_sort(Interp& in, Value v, Args& args, const Node& at) {
  List items;
  in.iterate(v, items, at);
  const Value* attribute = arg(args, 2, "attribute");
  std::string attr_s = attribute && !attribute->is_none() ? as_text(*attribute) : "";
  sort_values(in, items, at, arg_bool(args, 0, "reverse", false), arg_bool(args, 1, "case_sensitive", false),
              attr_s.empty() ? nullptr : &attr_s);
  return Value(std::move(items));
}

Value filter_first(Interp& in, Value v, Args&, const Node& at) {
  List items;
  in.iterate(v, items, at);
  return items.empty() ? Value::undefined("No first item, sequence was empty.") : items.front();
}

Value filter_last(Interp& in, Value v, Args&, const Node& at) {
  // next(iter(reversed(seq)))
  if (!v.is_sequence() && !v.is_dict() && !v.is_string() && !v.is_undefined())
    in.fail("TypeError", detail::concat("'", v.type_name(), "' object is not reversible"), at);
  List items;
  in.iterate(v, items, at);
  return items.empty() ? Value::undefined("No last item, sequence was empty.") : items.back();
}

Value filter_abs(Interp& in, Value v, Args&, const Node& at) {
  if (!v.is_number()) in.fail("TypeError", detail::concat("bad operand type for abs(): '", v.type_name(), "'"), at);
  if (!v.is_float() && v.as_int() == INT64_MIN) in.fail("OverflowError", "integer result does not fit in 64 bits", at);
  return v.is_float() ? Value(std::fabs(v.as_float())) : Value(v.as_int() < 0 ? -v.as_int() : v.as_int());
}

Value filter_center(Interp& in, Value v, Args& args, const Node& at) {
  std::string s = as_text(v);
  int64_t width = arg_int(in, args, 0, "width", 80, at);
  in.check_output(static_cast<size_t>(std::max<int64_t>(0, width)), at);
  int64_t len = static_cast<int64_t>(utf8_length(s));
  if (width <= len) return Value(s);
  int64_t marg = width - len, left = marg / 2 + (marg & width & 1);
  return Value(std::string(left, ' ') + s + std::string(marg - left, ' '));
}

Value filter_round(Interp& in, Value v, Args& args, const Node& at) {
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

Value filter_sum(Interp& in, Value v, Args& args, const Node& at) {
  List items;
  in.iterate(v, items, at);
  const Value* attribute = arg(args, 0, "attribute");
  Value total = arg(args, 1, "start") ? *arg(args, 1, "start") : Value(int64_t(0));
  for (auto& x : items)
    total = in.binop(Op::Add, total, attribute && !attribute->is_none() ? attr_value(in, x, *attribute, at) : x, at);
  return total;
}

// min / max: the first smallest / largest item (by attribute, case-folded unless case_sensitive)
Value min_or_max(Interp& in, Value v, Args& args, const Node& at, bool smallest) {
  List items;
  in.iterate(v, items, at);
  if (items.empty()) return Value::undefined("No aggregated item, sequence was empty.");
  bool cs = arg_bool(args, 0, "case_sensitive", false);
  const Value* attribute = arg(args, 1, "attribute");
  auto key = [&](const Value& x) {
    return sort_key(attribute && !attribute->is_none() ? attr_value(in, x, *attribute, at) : x, cs);
  };
  Value best = items[0], best_key = key(best);
  for (auto& x : items) {
    Value k = key(x);
    int c = in.cmp(k, best_key, at, smallest ? "<" : ">");
    if (smallest ? c < 0 : c > 0) {
      best = x;
      best_key = std::move(k);
    }
  }
  return best;
}

Value filter_min(Interp& in, Value v, Args& args, const Node& at) { return min_or_max(in, std::move(v), args, at, true); }

Value filter_max(Interp& in, Value v, Args& args, const Node& at) { return min_or_max(in, std::move(v), args, at, false); }

Value filter_reverse(Interp& in, Value v, Args&, const Node& at) {
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

Value filter_wordcount(Interp&, Value v, Args&, const Node&) {
  // len(re.findall(r"\w+", s))
  int64_t words = 0;
  bool in_word = false;
  for (uint32_t c : utf8_decode(as_text(v))) {
    bool w = c == '_' || cp_isdigit(c) || cp_isalpha(c);
    if (w && !in_word) ++words;
    in_word = w;
  }
  return Value(words);
}

Value filter_format(Interp& in, Value v, Args& args, const Node& at) {
  if (!args.kw.empty()) {
    Dict d;
    for (auto& kv : args.kw) d.set(Value(kv.first), kv.second);
    return Value(percent_format(in, as_text(v), Value(std::move(d)), at));
  }
  return Value(percent_format(in, as_text(v), Value::tuple(args.pos), at));
}

Value filter_attr(Interp& in, Value v, Args& args, const Node& at) { return in.getattr(v, arg_str(in, args, 0, "name", at), at); }

Value filter_batch(Interp& in, Value v, Args& args, const Node& at) {
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

Value filter_truncate(Interp& in, Value v, Args& args, const Node& at) {
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

struct NamedFilter {
  const char* name;
  FilterFn fn;
};
const NamedFilter kFilters[] = {
    {"tojson", filter_tojson},
    {"length", filter_length},
    {"count", filter_length},
    {"trim", filter_trim},
    {"default", filter_default},
    {"d", filter_default},
    {"string", filter_string},
    {"upper", filter_upper},
    {"lower", filter_lower},
    {"join", filter_join},
    {"items", filter_items},
    {"dictsort", filter_dictsort},
    {"safe", filter_safe},
    {"list", filter_list},
    {"map", filter_map},
    {"selectattr", filter_selectattr},
    {"rejectattr", filter_rejectattr},
    {"select", filter_select},
    {"reject", filter_reject},
    {"indent", filter_indent},
    {"replace", filter_replace},
    {"int", filter_int},
    {"float", filter_float},
    {"unique", filter_unique},
    {"sort", filter_sort},
    {"first", filter_first},
    {"last", filter_last},
    {"abs", filter_abs},
    {"capitalize", filter_capitalize},
    {"title", filter_title},
    {"center", filter_center},
    {"round", filter_round},
    {"sum", filter_sum},
    {"min", filter_min},
    {"max", filter_max},
    {"reverse", filter_reverse},
    {"wordcount", filter_wordcount},
    {"format", filter_format},
    {"escape", filter_escape},
    {"e", filter_escape},
    {"forceescape", filter_forceescape},
    {"attr", filter_attr},
    {"batch", filter_batch},
    {"truncate", filter_truncate},
};

}  // namespace

static bool is_filter(const Node& n, FilterFn fn) { return n.sym >= 0 && kFilters[n.sym].fn == fn; }

int filter_id(std::string_view name) {
  for (size_t i = 0; i < std::size(kFilters); ++i)
    if (name == kFilters[i].name) return static_cast<int>(i);
  return -1;
}

Value apply_filter(Interp& in, int id, const std::string& name, Value v, Args& args, const Node& at) {
  if (id < 0 || id >= static_cast<int>(std::size(kFilters))) in.fail("TemplateRuntimeError", "No filter named '" + name + "'.", at);
  return kFilters[id].fn(in, std::move(v), args, at);
}

bool filter_view(const Node& n, const Value& input, std::string_view& piece) {
  if (!is_filter(n, filter_trim) || n.args.size() != 1 || !n.kwargs.empty() || !input.is_string() || input.is_markup()) return false;
  piece = strip(input.str(), nullptr, true, true);
  return true;
}

bool emit_filter(Interp& in, const Node& n, const Value& v, Frame& f, std::string& out) {
  std::string_view piece;
  if (filter_view(n, v, piece)) {
    out += piece;
    return true;
  }
  if (!is_filter(n, filter_tojson)) return false;
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

}  // namespace qforge::chat
