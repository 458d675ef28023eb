// The evaluator: expressions with Python semantics, statements with jinja2's
// scoping (a fresh frame per loop iteration, live closures for macros).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "jinja_rt.hpp"

namespace qforge::chat {

namespace {

struct MacroObj : Callable {
  const Node* def;      // Macro or CallBlock node (params in kwargs, body in body)
  FramePtr closure;
  std::string name;
  Value caller;         // the caller() of a {% call %} block
  bool catch_varargs, catch_kwargs;
  const char* type_name() const override { return "Macro"; }
  Value call(Interp& in, Args& args, const Node& at) override {
    if (++in.depth > in.opt.limits.max_call_depth) in.fail_blocks(at);
    in.check_stack(at);
    Scope scope(true, closure.get());  // shared: macros defined inside may capture it
    Frame* frame = &scope.frame;
    auto& params = def->kwargs;
    if (args.pos.size() > params.size() && !catch_varargs)
      in.fail("TypeError", detail::concat("macro '", name, "' takes not more than ", params.size(), " argument(s)"), at);
    std::vector<bool> bound(params.size(), false);
    for (size_t i = 0; i < params.size() && i < args.pos.size(); ++i) {
      frame->set(in.prog.sym_ids.at(params[i].first), args.pos[i]);
      bound[i] = true;
    }
    Dict extra_kw;
    bool caller_given = false;
    for (auto& kv : args.kw) {
      size_t k = 0;
      while (k < params.size() && params[k].first != kv.first) ++k;
      if (k < params.size()) {
        if (bound[k]) in.fail("TypeError", detail::concat("macro '", name, "' got multiple values for argument '", kv.first, "'"), at);
        frame->set(in.prog.sym_ids.at(params[k].first), kv.second);
        bound[k] = true;
      } else if (kv.first == "caller" && def->kind == NK::Macro) {
        frame->set(in.prog.sym_ids.at("caller"), kv.second);  // interned at compile time
        caller_given = true;
      } else if (catch_kwargs) {
        extra_kw.set(Value(kv.first), kv.second);
      } else {
        in.fail("TypeError", detail::concat("macro '", name, "' takes no keyword argument '", kv.first, "'"), at);
      }
    }
    for (size_t i = 0; i < params.size(); ++i) {
      if (bound[i]) continue;
      int sym = in.prog.sym_ids.at(params[i].first);
      if (params[i].second) frame->set(sym, in.eval(*params[i].second, *frame));
      else frame->set(sym, Value::undefined(detail::concat("parameter '", params[i].first, "' was not provided")));
    }
    if (catch_varargs) {
      List rest;
      for (size_t i = params.size(); i < args.pos.size(); ++i) rest.push_back(args.pos[i]);
      frame->set(in.prog.sym_ids.at("varargs"), Value::tuple(std::move(rest)));
    }
    if (catch_kwargs) frame->set(in.prog.sym_ids.at("kwargs"), Value(std::move(extra_kw)));
    if (!caller.is_none()) frame->set(in.prog.sym_ids.at("caller"), caller);
    else if (def->kind == NK::Macro && !caller_given &&
             std::none_of(params.begin(), params.end(), [](auto& p) { return p.first == "caller"; })) {
      // a macro's `caller` is its own (jinja2 adds the parameter), never an outer variable
      frame->set(in.prog.sym_ids.at("caller"), Value::undefined("No caller defined"));
    }
    std::string out;
    in.exec(def->body, *frame, out);
    --in.depth;
    return Value(std::move(out));
  }
};

bool is_intlike(const Value& v) { return v.is_int() || v.is_bool(); }

int64_t floordiv(int64_t a, int64_t b) {
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

}  // namespace

[[noreturn]] void Interp::fail_undefined(const Value& u, const Node& at) {
  const std::string& hint = u.str();
  if (hint.rfind("access to attribute", 0) == 0) fail("SecurityError", hint, at);
  fail("UndefinedError", hint.empty() ? "undefined value" : hint, at);
}

std::string object_type_repr(const Value& v) {
  if (v.is_none()) return "None";
  if (v.is_namespace()) return "jinja2.utils.Namespace object";
  return std::string(v.type_name()) + " object";
}

static Value undefined_attr(const Value& obj, const std::string& name) {
  std::string hint = "'";  // built by appends (GCC 12 misreports "'" + std::string with -Wrestrict)
  hint += object_type_repr(obj);
  hint += "' has no attribute '";
  hint += name;
  hint += "'";
  return Value::undefined(std::move(hint));
}

static bool unsafe_method(const Value& obj, const std::string& name) {
  if (name.size() && name[0] == '_') return true;
  if (obj.is_list()) {
    static const char* bad[] = {"append", "clear", "extend", "insert", "pop", "remove", "reverse", "sort"};
    for (auto* b : bad)
      if (name == b) return true;
  }
  if (obj.is_dict()) {
    static const char* bad[] = {"clear", "pop", "popitem", "setdefault", "update"};
    for (auto* b : bad)
      if (name == b) return true;
  }
  return false;
}

static Value unsafe_undefined(const Value& obj, const std::string& name) {
  return Value::undefined(detail::concat("access to attribute '", name, "' of '", obj.type_name(), "' object is unsafe."));
}

static Value loop_attr(const LoopObj& l, const std::string& name, const Value& self) {
  if (name == "index") return Value(l.index0 + 1);
  if (name == "index0") return Value(l.index0);
  if (name == "first") return Value(l.index0 == 0);
  if (name == "last") return Value(l.index0 == l.length - 1);
  if (name == "length") return Value(l.length);
  if (name == "revindex") return Value(l.length - l.index0);
  if (name == "revindex0") return Value(l.length - l.index0 - 1);
  if (name == "depth") return Value(int64_t(l.depth));
  if (name == "depth0") return Value(int64_t(l.depth - 1));
  if (name == "previtem")
    return l.index0 > 0 ? (*l.items)[l.index0 - 1] : Value::undefined("there is no previous item");
  if (name == "nextitem")
    return l.index0 + 1 < l.length ? (*l.items)[l.index0 + 1] : Value::undefined("there is no next item");
  if (name == "cycle" || name == "changed") return Value(new BoundMethod(self, name));
  return Value::undefined(detail::concat("'LoopContext' object has no attribute '", name, "'"));
}

Value Interp::getattr(const Value& obj, const std::string& name, const Node& at) {
  switch (obj.kind()) {
    case Kind::Undefined: fail_undefined(obj, at);
    case Kind::Dict:
      if (has_method(obj, name)) {
        if (unsafe_method(obj, name)) return unsafe_undefined(obj, name);
        return Value(new BoundMethod(obj, name));
      }
      if (const Value* v = obj.get(name)) return *v;
      return undefined_attr(obj, name);
    case Kind::Namespace:
      if (const Value* v = obj.get(name)) return *v;
      return undefined_attr(obj, name);
    case Kind::Native:
      if (auto* l = dynamic_cast<LoopObj*>(obj.native())) return loop_attr(*l, name, obj);
      if (auto* c = dynamic_cast<CyclerObj*>(obj.native())) {
        if (name == "current") return c->items[c->pos];
        if (name == "next" || name == "reset") return Value(new BoundMethod(obj, name));
      }
      if (const Value* v = builtin_attribute(obj, name)) return *v;
      return undefined_attr(obj, name);
    default:
      if (has_method(obj, name)) {
        if (unsafe_method(obj, name)) return unsafe_undefined(obj, name);
        return Value(new BoundMethod(obj, name));
      }
      return undefined_attr(obj, name);
  }
}

// Python slice indices for a sequence of length n.
static void slice_indices(const Value* s0, const Value* s1, const Value* s2, int64_t n, int64_t& start, int64_t& stop,
                          int64_t& step, Interp& in, const Node& at) {
  auto num = [&](const Value* v, int64_t dflt) -> std::pair<bool, int64_t> {
    if (!v || v->is_none()) return {false, dflt};
    if (!is_intlike(*v)) in.fail("TypeError", "slice indices must be integers or None or have an __index__ method", at);
    return {true, v->as_int()};
  };
  auto [has_step, st] = num(s2, 1);
  (void)has_step;
  if (st == 0) in.fail("ValueError", "slice step cannot be zero", at);
  step = st;
  auto adjust = [&](const Value* v, bool is_start) {
    auto [has, x] = num(v, 0);
    if (!has) return step > 0 ? (is_start ? int64_t(0) : n) : (is_start ? n - 1 : int64_t(-1));
    if (x < 0) {
      x += n;
      if (x < 0) x = step < 0 ? -1 : 0;
    } else if (x >= n) {
      x = step < 0 ? n - 1 : n;
    }
    return x;
  };
  start = adjust(s0, true);
  stop = adjust(s1, false);
  if (step > n) step = n + 1;  // one element at most; keeps i += step from overflowing
  if (step < -n) step = -(n + 1);
}

Value Interp::getitem(const Value& obj, const Value& key, const Node& at) {
  if (obj.is_undefined()) fail_undefined(obj, at);
  auto missing = [&]() -> Value {
    if (key.is_string()) {
      if (has_method(obj, key.str())) {
        if (unsafe_method(obj, key.str())) return unsafe_undefined(obj, key.str());
        return Value(new BoundMethod(obj, key.str()));
      }
      return undefined_attr(obj, key.str());
    }
    return Value::undefined(detail::concat(object_type_repr(obj), " has no element ", py_repr(key)));
  };
  switch (obj.kind()) {
    case Kind::Dict:
    case Kind::Namespace: {
      // a namespace has no __getitem__: jinja2's getitem falls back to getattr for str keys
      if (obj.is_namespace()) return key.is_string() ? getattr(obj, key.str(), at) : missing();
      if (const Value* v = obj.dict_ref().find(key)) return *v;
      return missing();
    }
    case Kind::List:
    case Kind::Tuple:
    case Kind::String: {
      bool is_str = obj.is_string();
      charge_text(obj, at);  // decoded to code points
      std::vector<uint32_t> cps;
      int64_t n;
      if (is_str) {
        cps = utf8_decode(obj.str());
        n = static_cast<int64_t>(cps.size());
      } else {
        n = static_cast<int64_t>(obj.list().size());
      }
      if (is_intlike(key)) {
        int64_t i = key.as_int();
        if (i < 0) i += n;
        if (i < 0 || i >= n) return missing();
        if (is_str) {
          std::string s;
          utf8_append(s, cps[i]);
          return Value(std::move(s));
        }
        return obj.list()[i];
      }
      return missing();
    }
    default: return missing();
  }
}

static Value do_slice(Interp& in, const Value& obj, const Node& slice, Frame& f) {
  Value parts[3];
  const Value* p[3] = {nullptr, nullptr, nullptr};
  for (int k = 0; k < 3; ++k)
    if (slice.args[k]) {
      parts[k] = in.eval(*slice.args[k], f);
      p[k] = &parts[k];
    }
  if (obj.is_undefined()) in.fail_undefined(obj, slice);
  if (!obj.is_string() && !obj.is_sequence())
    return Value::undefined(detail::concat(object_type_repr(obj), " has no element slice"));
  std::vector<uint32_t> cps;
  int64_t n;
  in.charge_text(obj, slice);
  if (obj.is_string()) {
    cps = utf8_decode(obj.str());
    n = static_cast<int64_t>(cps.size());
  } else {
    n = static_cast<int64_t>(obj.list().size());
  }
  int64_t start, stop, step;
  slice_indices(p[0], p[1], p[2], n, start, stop, step, in, slice);
  if (obj.is_string()) {
    std::string s;
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) utf8_append(s, cps[i]);
    return Value(std::move(s));
  }
  List out;
  auto& l = obj.list();
  int64_t count = step > 0 ? (stop - start + step - 1) / step : (start - stop - step - 1) / -step;
  out.reserve(static_cast<size_t>(std::max<int64_t>(0, count)));
  for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) out.push_back(l[i]);
  if (const impl::RangeObj* r = obj.range_obj()) {  // a range's slice is a range, as Python's
    // range(r)[i:j:k] == range(r.start + i*r.step, r.start + j*r.step, r.step*k); each fits: |i|, |j|, |k| <= n + 1
    __int128 b = (__int128)r->start + (__int128)start * r->step, e = (__int128)r->start + (__int128)stop * r->step;
    int64_t slice_step = p[2] && !p[2]->is_none() ? p[2]->as_int() : 1;  // `step` is clamped to n + 1
    __int128 st = (__int128)r->step * slice_step;
    if (b == (int64_t)b && e == (int64_t)e && st == (int64_t)st) return Value::range((int64_t)b, (int64_t)e, (int64_t)st, std::move(out));
  }
  return Value(std::move(out), obj.kind());
}

void Interp::iterate(const Value& v, List& out, const Node& at) {
  iterate_items(v, out, at);
  charge(out.size(), at);  // what the caller walks next
}

void Interp::iterate_items(const Value& v, List& out, const Node& at) {
  switch (v.kind()) {
    case Kind::Undefined: return;
    case Kind::List:
    case Kind::Tuple: out = v.list(); return;
    case Kind::Dict:
      for (auto& kv : v.dict_ref().items) out.push_back(kv.first);
      return;
    case Kind::String:
      for (uint32_t cp : utf8_decode(v.str())) {
        std::string s;
        utf8_append(s, cp);
        out.push_back(Value(std::move(s)));
      }
      return;
    default:
      if (v.is_native())
        if (auto* it = dynamic_cast<IterObj*>(v.native())) {
          out = it->items;
          return;
        }
      fail("TypeError", detail::concat("'", v.type_name(), "' object is not iterable"), at);
  }
}

Value Interp::call(const Value& callee, Args& args, const Node& at) {
  tick(at);
  if (callee.is_undefined()) fail_undefined(callee, at);
  if (callee.is_native())
    if (auto* c = dynamic_cast<Callable*>(callee.native())) return c->call(*this, args, at);
  fail("TypeError", detail::concat("'", callee.type_name(), "' object is not callable"), at);
}

int Interp::cmp(const Value& a, const Value& b, const Node& at, const char* op) { return cmp_rec(a, b, at, 0, op); }

int Interp::cmp_rec(const Value& a, const Value& b, const Node& at, int depth, const char* op) {
  if (depth > 500) fail("RecursionError", "maximum recursion depth exceeded in comparison", at);
  if (a.is_number() && b.is_number()) {
    if (a.is_float() || b.is_float()) {
      double x = a.as_float(), y = b.as_float();
      return x < y ? -1 : x > y ? 1 : 0;
    }
    return a.as_int() < b.as_int() ? -1 : a.as_int() > b.as_int() ? 1 : 0;
  }
  if (a.is_string() && b.is_string()) {
    int c = a.str().compare(b.str());
    return c < 0 ? -1 : c > 0 ? 1 : 0;
  }
  if ((a.is_list() && b.is_list()) || (a.is_tuple() && b.is_tuple())) {
    auto& x = a.list();
    auto& y = b.list();
    for (size_t i = 0; i < x.size() && i < y.size(); ++i) {
      if (py_equal(x[i], y[i])) continue;
      return cmp_rec(x[i], y[i], at, depth + 1, op);
    }
    return x.size() < y.size() ? -1 : x.size() > y.size() ? 1 : 0;
  }
  if (a.is_undefined()) fail_undefined(a, at);
  if (b.is_undefined()) fail_undefined(b, at);
  fail("TypeError", detail::concat("'", op, "' not supported between instances of '", a.type_name(), "' and '", b.type_name(), "'"), at);
}

static bool contains(Interp& in, const Value& container, const Value& item, const Node& at) {
  switch (container.kind()) {
    case Kind::String:
      if (!item.is_string())
        in.fail("TypeError", detail::concat("'in <string>' requires string as left operand, not ", item.type_name()), at);
      in.charge_text(container, at);
      return container.str().find(item.str()) != std::string::npos;
    case Kind::List:
    case Kind::Tuple:
      in.charge(container.list().size(), at);
      for (auto& x : container.list())
        if (py_equal(x, item)) return true;
      return false;
    case Kind::Dict:
      if (item.is_list() || item.is_dict() || item.is_namespace())
        in.fail("TypeError", detail::concat("unhashable type: '", item.type_name(), "'"), at);
      return container.dict_ref().find(item) != nullptr;
    case Kind::Undefined: return false;
    default:
      if (container.is_native())
        if (auto* it = dynamic_cast<IterObj*>(container.native())) {
          for (auto& x : it->items)
            if (py_equal(x, item)) return true;
          return false;
        }
      in.fail("TypeError", detail::concat("argument of type '", container.type_name(), "' is not iterable"), at);
  }
}

bool Interp::compare(Op op, const Value& a, const Value& b, const Node& at) {
  switch (op) {
    case Op::Eq: return py_equal(a, b);
    case Op::Ne: return !py_equal(a, b);
    case Op::Lt: return cmp(a, b, at, "<") < 0;
    case Op::Le: return cmp(a, b, at, "<=") <= 0;
    case Op::Gt: return cmp(a, b, at, ">") > 0;
    case Op::Ge: return cmp(a, b, at, ">=") >= 0;
    case Op::In: return contains(*this, b, a, at);
    case Op::NotIn: return !contains(*this, b, a, at);
    default: return false;
  }
}

Value Interp::binop(Op op, const Value& a, const Value& b, const Node& at) {
  if (op == Op::Mod && a.is_string()) {  // printf-style formatting (an Undefined argument is a mapping to CPython)
    Args args;
    args.pos.push_back(b);
    bool found;
    return call_method(*this, a, "__mod__", args, at, found);
  }
  if (a.is_undefined()) fail_undefined(a, at);
  if (b.is_undefined()) fail_undefined(b, at);
  static const char* names[] = {"+", "-", "*", "/", "//", "%", "**"};
  auto type_error = [&]() -> Value {
    fail("TypeError", detail::concat("unsupported operand type(s) for ", names[int(op)], ": '", a.type_name(), "' and '",
                                     b.type_name(), "'"), at);
  };
  if (a.is_number() && b.is_number()) {
    bool fl = a.is_float() || b.is_float();
    switch (op) {
      case Op::Add:
      case Op::Sub:
      case Op::Mul: {
        if (fl)
          return Value(op == Op::Add ? a.as_float() + b.as_float()
                       : op == Op::Sub ? a.as_float() - b.as_float() : a.as_float() * b.as_float());
        int64_t r;
        bool overflow = op == Op::Add ? __builtin_add_overflow(a.as_int(), b.as_int(), &r)
                        : op == Op::Sub ? __builtin_sub_overflow(a.as_int(), b.as_int(), &r)
                                        : __builtin_mul_overflow(a.as_int(), b.as_int(), &r);
        if (overflow) fail("OverflowError", "integer result does not fit in 64 bits", at);
        return Value(r);
      }
      case Op::Div:
        if (b.as_float() == 0) fail("ZeroDivisionError", fl ? "float division by zero" : "division by zero", at);
        return Value(a.as_float() / b.as_float());
      case Op::FloorDiv:
        if (b.as_float() == 0)
          fail("ZeroDivisionError", fl ? "float floor division by zero" : "integer division or modulo by zero", at);
        if (!fl && b.as_int() == -1 && a.as_int() == INT64_MIN) fail("OverflowError", "integer result does not fit in 64 bits", at);
        return fl ? Value(std::floor(a.as_float() / b.as_float())) : Value(floordiv(a.as_int(), b.as_int()));
      case Op::Mod:
        if (b.as_float() == 0) fail("ZeroDivisionError", fl ? "float modulo" : "integer modulo by zero", at);
        if (fl) {
          double r = std::fmod(a.as_float(), b.as_float());
          if (r != 0 && ((r < 0) != (b.as_float() < 0))) r += b.as_float();
          return Value(r);
        }
        if (b.as_int() == -1) return Value(int64_t(0));
        return Value(a.as_int() - floordiv(a.as_int(), b.as_int()) * b.as_int());
      case Op::Pow:
        if (!fl && b.as_int() >= 0) {
          int64_t r = 1;
          for (int64_t i = 0; i < b.as_int(); ++i) {
            if (__builtin_mul_overflow(r, a.as_int(), &r)) fail("OverflowError", "integer result does not fit in 64 bits", at);
            if (r == 0 || r == 1) break;
            if (r == -1) {
              r = ((b.as_int() - i - 1) % 2 == 0) ? -1 : 1;
              break;
            }
          }
          return Value(r);
        }
        return Value(std::pow(a.as_float(), b.as_float()));
      default: break;
    }
  }
  if (op == Op::Add) {
    if (a.is_string() && b.is_string()) {
      check_output(a.str().size() + b.str().size(), at);
      charge((a.str().size() + b.str().size()) >> kBytesPerStepLog2, at);
      if (a.is_markup() && !b.is_markup()) return Value::markup(a.str() + html_escape(b.str()));
      if (b.is_markup() && !a.is_markup()) return Value::markup(html_escape(a.str()) + b.str());
      if (a.is_markup()) return Value::markup(a.str() + b.str());
      return Value(a.str() + b.str());
    }
    if (((a.is_list() && b.is_list()) || (a.is_tuple() && b.is_tuple())) && !a.range_obj() && !b.range_obj()) {
      check_output(16 * (a.list().size() + b.list().size()), at);
      charge(a.list().size() + b.list().size(), at);
      List l = a.list();
      l.insert(l.end(), b.list().begin(), b.list().end());
      return Value(std::move(l), a.kind());
    }
    if (a.is_string())
      fail("TypeError", detail::concat("can only concatenate str (not \"", b.type_name(), "\") to str"), at);
    if ((a.is_list() || a.is_tuple()) && !a.range_obj())
      fail("TypeError", detail::concat("can only concatenate ", a.type_name(), " (not \"", b.type_name(), "\") to ",
                                       a.type_name()), at);
  }
  if (op == Op::Mul) {
    auto repeatable = [](const Value& v) { return v.is_string() || (v.is_sequence() && !v.range_obj()); };
    const Value* seq = repeatable(a) ? &a : repeatable(b) ? &b : nullptr;
    const Value* cnt = seq == &a ? &b : &a;
    if (seq && is_intlike(*cnt)) {
      int64_t k = std::max<int64_t>(0, cnt->as_int()), total;
      int64_t unit = static_cast<int64_t>(seq->is_string() ? seq->str().size() : 16 * seq->list().size());
      if (__builtin_mul_overflow(k, unit, &total)) fail_output(at);
      check_output(static_cast<uint64_t>(total), at);
      if (unit == 0) return seq->is_string() ? Value("") : Value(List(), seq->kind());  // '' * huge: at once, as Python
      charge(seq->is_string() ? static_cast<size_t>(total) >> kBytesPerStepLog2 : static_cast<size_t>(total) / 16, at);
      if (seq->is_string()) {
        std::string s;
        for (int64_t i = 0; i < k; ++i) s += seq->str();
        return Value(std::move(s));
      }
      List l;
      for (int64_t i = 0; i < k; ++i) l.insert(l.end(), seq->list().begin(), seq->list().end());
      return Value(std::move(l), seq->kind());
    }
    if (seq)
      fail("TypeError", detail::concat("can't multiply sequence by non-int of type '",
                                       (seq == &a ? b : a).type_name(), "'"), at);
  }
  return type_error();
}

// ------------------------------------------------------------- expressions
// The value of `n` without copying it when it is a variable or a constant
// (the frame / node outlives the use); otherwise evaluated into `tmp`.
const Value& Interp::ref_other(const Node& n, Frame& f, Value& tmp) {
  if (n.kind == NK::Getattr || n.kind == NK::Getitem) return ref_item(n, f, tmp);
  tmp = eval(n, f);
  return tmp;
}

// obj.name, obj['key'] and obj[i] read in place when obj is a dict or a list
// (immutable in the sandbox: the item lives as long as obj does); the general
// rules of getattr/getitem otherwise.
const Value& Interp::ref_item(const Node& n, Frame& f, Value& tmp) {
  const Node* key = n.kind == NK::Getitem ? n.args[1].get() : nullptr;
  const Value& obj = ref(*n.args[0], f, tmp);
  const Value* hit = nullptr;
  if (obj.is_dict() && obj.dict_ref().items.size() > kScanItemsFree)
    charge(obj.dict_ref().items.size() >> kBytesPerStepLog2, n);  // lookups scan the keys
  if (!key) {
    if (obj.is_dict() && !n.dict_method) hit = obj.dict_ref().find(std::string_view(n.name));
  } else if (key->kind == NK::Const) {
    const Value& k = key->value;
    if (k.is_string() && obj.is_dict()) {
      hit = obj.dict_ref().find(std::string_view(k.str()));
    } else if (k.is_int() && obj.is_sequence()) {
      const List& l = obj.list();
      int64_t i = k.as_int(), size = static_cast<int64_t>(l.size());
      if (i < 0) i += size;
      if (i >= 0 && i < size) hit = &l[static_cast<size_t>(i)];
    }
  }
  if (hit) {
    if (&obj != &tmp) return *hit;
    Value item = *hit;  // obj is the temporary: keep the item, drop obj
    tmp = std::move(item);
    return tmp;
  }
  if (!key) {
    tmp = getattr(obj, n.name, n);
  } else if (key->kind == NK::Slice) {
    tmp = do_slice(*this, obj, *key, f);
  } else {
    Value ktmp;
    tmp = getitem(obj, ref(*key, f, ktmp), n);
  }
  return tmp;
}

Value Interp::eval(const Node& n, Frame& f) {
  switch (n.kind) {
    case NK::Const: return n.value;
    case NK::Name: {
      if (Value* v = f.find(n.sym)) return *v;
      return n.value;
    }
    case NK::Getattr:
    case NK::Getitem: {
      Value tmp;
      const Value& item = ref_item(n, f, tmp);
      if (&item == &tmp) return tmp;
      return item;
    }
    case NK::Call: {
      const Node& callee = *n.args[0];
      Args args;
      auto collect = [&]() { collect_args(n, f, args); };
      if (callee.kind == NK::Getattr) {
        Value otmp;
        const Value& obj = ref(*callee.args[0], f, otmp);
        if (!obj.is_undefined() && !obj.is_native() && !obj.is_namespace() && has_method(obj, callee.name)) {
          if (unsafe_method(obj, callee.name)) fail_undefined(unsafe_undefined(obj, callee.name), callee);
          collect();
          tick(n);
          charge_text(obj, n);
          bool found;
          Value out = call_method(*this, obj, callee.name, args, n, found);
          charge_text(out, n);
          return out;
        }
        Value fn = getattr(obj, callee.name, callee);
        collect();
        return call(fn, args, n);
      }
      Value fn = eval(callee, f);
      collect();
      return call(fn, args, n);
    }
    case NK::Filter: return apply_filter_node(n, eval(*n.args[0], f), f);
    case NK::Test: return Value(test(n, f));
    case NK::Neg:
    case NK::Pos: {
      Value v = eval(*n.args[0], f);
      if (v.is_undefined()) fail_undefined(v, n);
      if (!v.is_number())
        fail("TypeError", detail::concat("bad operand type for unary ", n.kind == NK::Neg ? "-" : "+", ": '", v.type_name(), "'"), n);
      if (n.kind == NK::Pos) return v.is_bool() ? Value(v.as_int()) : v;
      if (!v.is_float() && v.as_int() == INT64_MIN) fail("OverflowError", "integer result does not fit in 64 bits", n);
      return v.is_float() ? Value(-v.as_float()) : Value(-v.as_int());
    }
    case NK::Not: return Value(!truth(*n.args[0], f));
    case NK::And: {
      Value a = eval(*n.args[0], f);
      return a.truthy() ? eval(*n.args[1], f) : a;
    }
    case NK::Or: {
      Value a = eval(*n.args[0], f);
      return a.truthy() ? a : eval(*n.args[1], f);
    }
    case NK::BinOp: {
      Value lt, rt;
      const Value& a = ref(*n.args[0], f, lt);
      return binop(n.op, a, ref(*n.args[1], f, rt), n);
    }
    case NK::Compare: {
      if (n.ops.size() == 1) {
        Value lt, rt;
        const Value& left = ref(*n.args[0], f, lt);
        return Value(compare(n.ops[0], left, ref(*n.args[1], f, rt), n));
      }
      Value left = eval(*n.args[0], f);
      for (size_t i = 0; i < n.ops.size(); ++i) {
        Value right = eval(*n.args[i + 1], f);
        if (!compare(n.ops[i], left, right, n)) return Value(false);
        left = std::move(right);
      }
      return Value(true);
    }
    case NK::CondExpr: {
      if (truth(*n.args[0], f)) return eval(*n.args[1], f);
      if (n.args[2]) return eval(*n.args[2], f);
      return Value::undefined("the inline if-expression on line " + std::to_string(n.line) +
                              " evaluated to false and no else section was defined.");
    }
    case NK::ListLit:
    case NK::TupleLit: {
      List l;
      l.reserve(n.args.size());
      for (auto& a : n.args) l.push_back(eval(*a, f));
      return Value(std::move(l), n.kind == NK::ListLit ? Kind::List : Kind::Tuple);
    }
    case NK::DictLit: {
      Dict d;
      for (size_t i = 0; i + 1 < n.args.size(); i += 2) {
        Value k = eval(*n.args[i], f);
        if (k.is_list() || k.is_dict()) fail("TypeError", detail::concat("unhashable type: '", k.type_name(), "'"), n);
        d.set(std::move(k), eval(*n.args[i + 1], f));
      }
      return Value(std::move(d));
    }
    case NK::Concat: {
      std::string s;
      for (auto& a : n.args) {
        py_str_to(s, eval(*a, f));
        check_output(s.size(), n);
      }
      charge(s.size() >> kBytesPerStepLog2, n);
      return Value(std::move(s));
    }
    case NK::Slice: fail("TypeError", "slice outside of subscript", n);
    default: fail("TemplateRuntimeError", "statement used as expression", n);
  }
}

// The arguments of a call, filter or test node: args[1:] and kwargs, with
// `*x` spread into the positional ones and `**x` into the keywords (Python's
// f(*args, **kwargs); the keys of **x must be strings).
void Interp::collect_args(const Node& n, Frame& f, Args& args) {
  args.pos.reserve(n.args.size() - 1);
  for (size_t i = 1; i < n.args.size(); ++i) args.pos.push_back(eval(*n.args[i], f));
  for (auto& [name, expr] : n.kwargs) {
    if (name == "*") {
      List items;
      Value v = eval(*expr, f);  // an Undefined spreads nothing, as jinja2's iterates empty
      if (!v.is_undefined() && !v.is_string() && !v.is_sequence() && !v.is_dict() && !v.is_native())
        fail("TypeError", detail::concat("Value after * must be an iterable, not ", v.type_name()), *expr);
      iterate(v, items, *expr);
      args.pos.insert(args.pos.end(), items.begin(), items.end());
    } else if (name == "**") {
      Value v = eval(*expr, f);
      if (v.is_undefined()) fail_undefined(v, *expr);  // jinja2 reads its keys()
      if (!v.is_dict()) fail("TypeError", detail::concat("argument after ** must be a mapping, not ", v.type_name()), *expr);
      for (auto& [k, x] : v.dict_ref().items) {
        if (!k.is_string()) fail("TypeError", "keywords must be strings", *expr);
        args.kw.emplace_back(k.str(), x);
      }
    } else {
      args.kw.emplace_back(name, eval(*expr, f));
    }
  }
}

Value Interp::apply_filter_node(const Node& n, Value input, Frame& f) {
  Args args;
  collect_args(n, f, args);
  if (n.sym < 0) fail("TemplateRuntimeError", detail::concat("No filter named '", n.name, "' found."), n);
  tick(n);
  charge_text(input, n);
  Value out = apply_filter(*this, n.sym, n.name, std::move(input), args, n);
  charge_text(out, n);
  return out;
}

bool Interp::test(const Node& n, Frame& f) {
  Value vtmp;
  const Value& v = ref(*n.args[0], f, vtmp);
  Args args;
  collect_args(n, f, args);
  if (n.sym < 0) fail("TemplateRuntimeError", detail::concat("No test named '", n.name, "' found."), n);
  bool r = apply_test(*this, n.sym, n.name, v, args, n);
  return n.negated ? !r : r;
}

// The truth of `n` where only that is needed (if, not, a for loop's filter):
// and/or/not, comparisons and tests without building their values.
bool Interp::truth(const Node& n, Frame& f) {
  switch (n.kind) {
    case NK::Not: return !truth(*n.args[0], f);
    case NK::And: return truth(*n.args[0], f) && truth(*n.args[1], f);
    case NK::Or: return truth(*n.args[0], f) || truth(*n.args[1], f);
    case NK::Test: return test(n, f);
    case NK::Compare:
      if (n.ops.size() == 1) {
        Value lt, rt;
        const Value& left = ref(*n.args[0], f, lt);
        return compare(n.ops[0], left, ref(*n.args[1], f, rt), n);
      }
      break;
    default: break;
  }
  Value tmp;
  return ref(n, f, tmp).truthy();
}

// -------------------------------------------------------------- statements
// {% set x | f | g %} / {% filter f | g %}: the chain's innermost input is the
// captured block text.
Value Interp::filter_chain(const Node& last, Value v, Frame& f) {
  std::vector<const Node*> chain;
  for (const Node* x = &last; x && x->kind == NK::Filter; x = x->args[0].get()) chain.push_back(x);
  for (auto it = chain.rbegin(); it != chain.rend(); ++it) {
    const Node& fn = **it;
    Args args;
    collect_args(fn, f, args);
    if (fn.sym < 0) fail("TemplateRuntimeError", "No filter named '" + fn.name + "' found.", fn);
    tick(fn);
    charge_text(v, fn);
    v = apply_filter(*this, fn.sym, fn.name, std::move(v), args, fn);
    charge_text(v, fn);
  }
  return v;
}

// {{ a + b + c }}: when every operand is a plain string, append them straight
// to the output instead of building the intermediate sums.
void Interp::emit_sum(const Node& e, Frame& f, std::string& out) {
  constexpr size_t kMax = 8;
  const Node* leaves[kMax];
  const Node* adds[kMax];
  size_t n = 0;
  const Node* cur = &e;
  while (cur->kind == NK::BinOp && cur->op == Op::Add) {
    if (n + 1 >= kMax) {
      py_str_to(out, eval(e, f));
      return;
    }
    adds[n] = cur;
    leaves[n++] = cur->args[1].get();
    cur = cur->args[0].get();
  }
  leaves[n++] = cur;
  Value tmp[kMax];
  const Value* vals[kMax];  // nullptr: pieces[i] is a trimmed view
  struct Piece {
    const char* data;
    size_t size;
  } pieces[kMax];  // (left uninitialised: set before use)
  size_t total = 0;
  bool plain = true;
  for (size_t i = 0; i < n; ++i) {
    const Node& leaf = *leaves[n - 1 - i];
    std::string_view piece;
    if (leaf.kind == NK::Filter) {
      const Value& input = ref(*leaf.args[0], f, tmp[i]);
      if (filter_view(leaf, input, piece)) {
        vals[i] = nullptr;
        pieces[i] = {piece.data(), piece.size()};
        total += piece.size();
        continue;
      }
      Value result = apply_filter_node(leaf, input, f);
      tmp[i] = std::move(result);
      vals[i] = &tmp[i];
    } else {
      vals[i] = &ref(leaf, f, tmp[i]);
    }
    if (vals[i]->is_string() && !vals[i]->is_markup()) {
      const std::string& s = vals[i]->str();
      pieces[i] = {s.data(), s.size()};
      total += s.size();
    } else {
      plain = false;
    }
  }
  if (plain) {  // one resize, then the parts copied in
    size_t at = out.size();
    out.resize(at + total);
    char* dst = out.data() + at;
    for (size_t i = 0; i < n; ++i) {
      std::memcpy(dst, pieces[i].data, pieces[i].size);
      dst += pieces[i].size;
    }
    return;
  }
  for (size_t i = 0; i < n; ++i)
    if (!vals[i]) {
      tmp[i] = Value(std::string_view(pieces[i].data, pieces[i].size));
      vals[i] = &tmp[i];
    }
  Value acc = *vals[0];
  for (size_t i = 1; i < n; ++i) acc = binop(Op::Add, acc, *vals[i], *adds[n - 1 - i]);
  py_str_to(out, acc);
}

static void assign(Interp& in, const Node& target, const Value& v, Frame& f) {
  if (target.kind == NK::Name) {
    f.set(target.sym, v);
    return;
  }
  if (target.kind == NK::TupleLit) {
    List items;
    if (!v.is_string() && !v.is_sequence() && !v.is_dict() && !v.is_undefined() && !v.is_native())
      in.fail("TypeError", detail::concat("cannot unpack non-iterable ", v.type_name(), " object"), target);
    in.iterate(v, items, target);
    if (items.size() < target.args.size())
      in.fail("ValueError", detail::concat("not enough values to unpack (expected ", target.args.size(), ", got ", items.size(), ")"), target);
    if (items.size() > target.args.size())
      in.fail("ValueError", detail::concat("too many values to unpack (expected ", target.args.size(), ")"), target);
    for (size_t i = 0; i < items.size(); ++i) assign(in, *target.args[i], items[i], f);
    return;
  }
  // namespace attribute
  const Node& nsnode = *target.args[0];
  Value* ns = f.find(nsnode.sym);
  if (!ns || !ns->is_namespace()) in.fail("TemplateRuntimeError", "cannot assign attribute on non-namespace object", target);
  if (!target.name.empty() && target.name[0] == '_')
    in.fail("SecurityError", "Chat templates cannot store underscore-prefixed attributes on a namespace, but got '" + target.name +
                                 "'. Please rename the attribute.", target);
  ns->dict_mut().set(Value(target.name), v);
}

// {{ e }}: constants, ~ chains, + sums and filters written straight into out
void Interp::exec_emit(const Node& n, Frame& f, std::string& out) {
  const Node& e = *n.args[0];
  if (e.kind == NK::Const && e.value.is_string()) out += e.value.str();
  else if (e.kind == NK::Concat)
    for (auto& a : e.args) py_str_to(out, eval(*a, f));
  else if (e.kind == NK::BinOp && e.op == Op::Add) emit_sum(e, f, out);
  else if (e.kind == NK::Filter) {
    Value tmp;
    const Value& input = ref(*e.args[0], f, tmp);
    if (!emit_filter(*this, e, input, f, out)) py_str_to(out, apply_filter_node(e, input, f));
  } else {
    Value tmp;
    py_str_to(out, ref(e, f, tmp));
  }
  check_output(out.size(), n);
}

// {% for target in seq [if cond] %}body{% else %}orelse{% endfor %}
Interp::Flow Interp::exec_for(const Node& n, Frame& f, std::string& out) {
  auto* loop = new LoopObj;
  Value loopv(loop);
  loop->seq = eval(*n.args[1], f);
  if (loop->seq.is_sequence()) loop->items = &loop->seq.list();  // iterated in place (immutable)
  else iterate(loop->seq, loop->own, n);
  Scope scope(prog.has_macros, &f);
  Frame& frame = scope.frame;
  frame.vars.reserve(4);
  if (n.loop_filter) {
    List kept;
    for (auto& it : *loop->items) {
      tick(n);
      frame.vars.clear();
      assign(*this, *n.args[0], it, frame);
      if (truth(*n.args[2], frame)) kept.push_back(it);
    }
    loop->own.swap(kept);
    loop->items = &loop->own;
  }
  const List& items = *loop->items;
  if (items.empty()) {
    frame.vars.clear();
    return exec(n.orelse, frame, out) == Flow::Break ? Flow::Break : Flow::Normal;
  }
  if (++depth > opt.limits.max_call_depth) fail_blocks(n);
  loop->length = static_cast<int64_t>(items.size());
  const int loop_sym = prog.loop_sym;
  for (size_t i = 0; i < items.size(); ++i) {
    tick(n);
    loop->index0 = static_cast<int64_t>(i);
    frame.vars.clear();
    if (loop_sym >= 0) frame.vars.emplace_back(loop_sym, loopv);
    const Node& target = *n.args[0];
    if (target.kind == NK::Name && target.sym != loop_sym) frame.vars.emplace_back(target.sym, items[i]);
    else assign(*this, target, items[i], frame);
    if (exec(n.body, frame, out) == Flow::Break) break;
  }
  loop->last_changed = Value();  // loop.changed(loop) would keep the loop alive forever
  --depth;
  return Flow::Normal;
}

// {% set target %}body{% endset %}, through an optional filter chain
void Interp::exec_set_block(const Node& n, Frame& f) {
  std::string captured;
  if (++depth > opt.limits.max_call_depth) fail_blocks(n);
  exec(n.body, f, captured);
  --depth;
  Value v(std::move(captured));
  if (n.args.size() > 1) v = filter_chain(*n.args[1], std::move(v), f);
  assign(*this, *n.args[0], v, f);
}

// {% with a = x, ... %}: the values see the enclosing scope; the names live in the block only
Interp::Flow Interp::exec_with(const Node& n, Frame& f, std::string& out) {
  List values;
  for (size_t i = 1; i < n.args.size(); i += 2) values.push_back(eval(*n.args[i], f));
  Scope scope(prog.has_macros, &f);
  for (size_t i = 0; i < n.args.size(); i += 2) assign(*this, *n.args[i], values[i / 2], scope.frame);
  if (++depth > opt.limits.max_call_depth) fail_blocks(n);
  Flow fl = exec(n.body, scope.frame, out);
  --depth;
  return fl;
}

// {% filter f %}body{% endfilter %}
void Interp::exec_filter_block(const Node& n, Frame& f, std::string& out) {
  std::string captured;
  exec(n.body, f, captured);
  Value v = filter_chain(*n.args[0], Value(std::move(captured)), f);
  py_str_to(out, v);
}

// {% macro %} defines the macro in f; {% call m(args) %}body{% endcall %} calls m with caller=<body>
void Interp::exec_macro(const Node& n, Frame& f, std::string& out) {
  auto* m = new MacroObj;
  Value macro(m);
  m->def = &n;
  m->closure = f.shared_from_this();
  m->name = n.kind == NK::Macro ? n.name : "caller";
  m->catch_varargs = prog.sym_ids.count("varargs") > 0;
  m->catch_kwargs = prog.sym_ids.count("kwargs") > 0;
  if (n.kind == NK::Macro) {
    f.set(n.sym, macro);
    return;
  }
  // {% call macro(args) %}body{% endcall %}: macro gets caller=<body>
  const Node& call = *n.args[0];
  Value fn = eval(*call.args[0], f);
  Args args;
  collect_args(call, f, args);
  args.kw.emplace_back("caller", macro);
  py_str_to(out, this->call(fn, args, call));
}

Interp::Flow Interp::exec(const std::vector<NodePtr>& body, Frame& f, std::string& out) {
  for (auto& np : body) {
    const Node& n = *np;
    Flow fl = Flow::Normal;
    switch (n.kind) {
      case NK::Text:
        out += n.name;
        check_output(out.size(), n);
        break;
      case NK::Emit: exec_emit(n, f, out); break;
      case NK::If: fl = truth(*n.args[0], f) ? exec(n.body, f, out) : exec(n.orelse, f, out); break;
      case NK::For: fl = exec_for(n, f, out); break;
      case NK::Set: assign(*this, *n.args[0], eval(*n.args[1], f), f); break;
      case NK::SetBlock: exec_set_block(n, f); break;
      case NK::With: fl = exec_with(n, f, out); break;
      case NK::FilterBlock: exec_filter_block(n, f, out); break;
      case NK::Macro:
      case NK::CallBlock: exec_macro(n, f, out); break;
      case NK::Break: return Flow::Break;
      case NK::Continue: return Flow::Continue;
      case NK::Generation: {
        size_t start = out.size();
        fl = exec(n.body, f, out);
        if (generation && &out == root_out) generation->emplace_back(start, out.size());
        break;
      }
      default: fail("TemplateRuntimeError", "unexpected node", n);
    }
    if (fl != Flow::Normal) return fl;
  }
  return Flow::Normal;
}

// ------------------------------------------------------------------ limits
void Interp::fail_output(const Node& at) {
  fail("OutputLimit", detail::concat("a string, list or the output would exceed RenderLimits.max_output_bytes (",
                                     opt.limits.max_output_bytes, " bytes)"), at);
}
void Interp::fail_steps(const Node& at) {
  fail("StepLimit", detail::concat("the render exceeded RenderLimits.max_steps (", opt.limits.max_steps,
                                   " loop iterations, calls and items walked)"), at);
}
void Interp::fail_stack(const Node& at) {
  fail("RecursionError", detail::concat("nested calls exceed RenderLimits.max_stack_bytes (", opt.limits.max_stack_bytes,
                                        " bytes of stack)"), at);
}
void Interp::fail_blocks(const Node& at) {
  fail("RecursionError", detail::concat("blocks and macro calls nested deeper than RenderLimits.max_call_depth (",
                                        opt.limits.max_call_depth, ")"), at);
}

void Interp::track_namespace(const Value& ns) {
  if (namespaces_.size() >= prune_at_) {  // drop the ones nothing else holds: amortised O(1) a namespace
    std::erase_if(namespaces_, [](const Value& v) { return v.is_unique(); });
    prune_at_ = std::max<size_t>(64, 2 * namespaces_.size());
  }
  namespaces_.push_back(ns);
}

// A namespace can hold itself (`{% set ns.me = ns %}`, or through a list or
// a loop object); reference counts never free such a cycle, so every
// namespace the render made is emptied when it ends.
Interp::~Interp() {
  for (auto& ns : namespaces_) {
    Dict items = std::move(ns.dict_mut());
    ns.dict_mut() = Dict();
  }  // `items` freed here, each after its namespace was emptied
}

// ---------------------------------------------------------------- Template
Template::Template(std::string_view source) : program_(compile_template(source)), source_(source) {}

RenderResult Template::render_tracked(const Value& context, const RenderOptions& opt) const {
  QF_CHECK(context.is_dict() || context.is_none(), "template context must be a dict, got ", context.type_name());
  Interp in(*program_, opt);
  in.steps_left = opt.limits.max_steps;
  in.stack_base = static_cast<const char*>(__builtin_frame_address(0));
  Scope global_scope(program_->has_macros, nullptr);
  Frame& globals = global_scope.frame;
  globals.vars.reserve(program_->builtins.size() + context.dict_ref().items.size());
  globals.vars = program_->builtins;
  for (auto& kv : context.dict_ref().items) {
    if (!kv.first.is_string()) continue;
    int sym = program_->find_sym(kv.first.str());
    if (sym >= 0) globals.set(sym, kv.second);
  }
  Scope top(program_->has_macros, &globals);
  top.frame.vars.reserve(8);
  RenderResult res;
  res.text.reserve(opt.reserve ? opt.reserve : 1024);
  in.generation = &res.generation;
  in.root_out = &res.text;
  in.exec(program_->root->body, top.frame, res.text);
  return res;
}

std::string Template::render(const Value& context, const RenderOptions& opt) const {
  return render_tracked(context, opt).text;
}

}  // namespace qforge::chat
