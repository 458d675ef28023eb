// jinja2's builtin tests, one function each, found by name at parse time
// (test_id: the index in kTests, held by the Test node).
#include "jinja_builtins.hpp"

namespace qforge::chat {

using namespace builtins;

namespace {

using TestFn = bool (*)(Interp& in, const Value& v, Args& args, const Node& at);

bool test_defined(Interp&, const Value& v, Args&, const Node&) { return !v.is_undefined(); }
bool test_undefined(Interp&, const Value& v, Args&, const Node&) { return v.is_undefined(); }
bool test_none(Interp&, const Value& v, Args&, const Node&) { return v.is_none(); }
bool test_string(Interp&, const Value& v, Args&, const Node&) { return v.is_string(); }
bool test_mapping(Interp&, const Value& v, Args&, const Node&) { return v.is_dict(); }
bool test_iterable(Interp&, const Value& v, Args&, const Node&) {
  return v.is_string() || v.is_sequence() || v.is_dict() || v.is_undefined() ||
         (v.is_native() && dynamic_cast<IterObj*>(v.native()));
}
bool test_sequence(Interp&, const Value& v, Args&, const Node&) { return v.is_string() || v.is_sequence() || v.is_dict() || v.is_undefined(); }
bool test_false(Interp&, const Value& v, Args&, const Node&) { return v.is_bool() && !v.as_bool(); }
bool test_true(Interp&, const Value& v, Args&, const Node&) { return v.is_bool() && v.as_bool(); }
bool test_boolean(Interp&, const Value& v, Args&, const Node&) { return v.is_bool(); }
bool test_number(Interp&, const Value& v, Args&, const Node&) { return v.is_number(); }
bool test_integer(Interp&, const Value& v, Args&, const Node&) { return v.is_int(); }
bool test_float(Interp&, const Value& v, Args&, const Node&) { return v.is_float(); }
bool test_callable(Interp&, const Value& v, Args&, const Node&) { return v.is_undefined() || (v.is_native() && dynamic_cast<Callable*>(v.native())); }
bool test_eq(Interp& in, const Value& v, Args& args, const Node& at) { return in.compare(Op::Eq, v, args.pos[0], at); }
bool test_ne(Interp& in, const Value& v, Args& args, const Node& at) { return in.compare(Op::Ne, v, args.pos[0], at); }
bool test_lt(Interp& in, const Value& v, Args& args, const Node& at) { return in.compare(Op::Lt, v, args.pos[0], at); }
bool test_le(Interp& in, const Value& v, Args& args, const Node& at) { return in.compare(Op::Le, v, args.pos[0], at); }
bool test_gt(Interp& in, const Value& v, Args& args, const Node& at) { return in.compare(Op::Gt, v, args.pos[0], at); }
bool test_ge(Interp& in, const Value& v, Args& args, const Node& at) { return in.compare(Op::Ge, v, args.pos[0], at); }
bool test_in(Interp& in, const Value& v, Args& args, const Node& at) { return in.compare(Op::In, v, args.pos[0], at); }
bool test_divisibleby(Interp& in, const Value& v, Args& args, const Node& at) {
  // value % num == 0
  return py_equal(in.binop(Op::Mod, v, args.pos[0], at), Value(int64_t(0)));
}
bool test_odd(Interp& in, const Value& v, Args&, const Node& at) {
  Value r = in.binop(Op::Mod, v, Value(int64_t(2)), at);  // value % 2 == 1 / == 0, as jinja2
  return py_equal(r, Value(int64_t(1)));
}
bool test_even(Interp& in, const Value& v, Args&, const Node& at) {
  Value r = in.binop(Op::Mod, v, Value(int64_t(2)), at);  // value % 2 == 1 / == 0, as jinja2
  return py_equal(r, Value(int64_t(0)));
}
bool test_lower(Interp&, const Value& v, Args&, const Node&) {
  std::string s = as_text(v);
  return lower(s) == s && upper(s) != s;
}
bool test_upper(Interp&, const Value& v, Args&, const Node&) {
  std::string s = as_text(v);
  return upper(s) == s && lower(s) != s;
}
bool test_sameas(Interp&, const Value& v, Args& args, const Node&) {
  const Value& o = args.pos[0];
  if (v.kind() != o.kind()) return false;
  if (v.is_none() || v.is_undefined()) return true;
  if (v.is_bool() || v.is_int()) return v.as_int() == o.as_int();
  return v.identity() == o.identity() && !(v.is_float());
}
bool test_filter(Interp&, const Value& v, Args&, const Node&) { return v.is_string() && filter_id(v.str()) >= 0; }
bool test_test(Interp&, const Value& v, Args&, const Node&) { return v.is_string() && test_id(v.str()) >= 0; }
bool test_escaped(Interp&, const Value& v, Args&, const Node&) {
  // Markup (|safe, |escape) has __html__
  return v.is_markup();
}

struct NamedTest {
  const char* name;
  TestFn fn;
  bool takes_argument;  // `v is eq(x)`: the dispatcher checks it is given
};
const NamedTest kTests[] = {
    {"defined", test_defined, false},
    {"undefined", test_undefined, false},
    {"none", test_none, false},
    {"string", test_string, false},
    {"mapping", test_mapping, false},
    {"iterable", test_iterable, false},
    {"sequence", test_sequence, false},
    {"false", test_false, false},
    {"true", test_true, false},
    {"boolean", test_boolean, false},
    {"number", test_number, false},
    {"integer", test_integer, false},
    {"float", test_float, false},
    {"callable", test_callable, false},
    {"eq", test_eq, true},
    {"equalto", test_eq, true},
    {"==", test_eq, true},
    {"ne", test_ne, true},
    {"!=", test_ne, true},
    {"lt", test_lt, true},
    {"lessthan", test_lt, true},
    {"<", test_lt, true},
    {"le", test_le, true},
    {"<=", test_le, true},
    {"gt", test_gt, true},
    {"greaterthan", test_gt, true},
    {">", test_gt, true},
    {"ge", test_ge, true},
    {">=", test_ge, true},
    {"in", test_in, true},
    {"divisibleby", test_divisibleby, true},
    {"odd", test_odd, false},
    {"even", test_even, false},
    {"lower", test_lower, false},
    {"upper", test_upper, false},
    {"sameas", test_sameas, true},
    {"filter", test_filter, false},
    {"test", test_test, false},
    {"escaped", test_escaped, false},
};

}  // namespace

int test_id(std::string_view name) {
  for (size_t i = 0; i < std::size(kTests); ++i)
    if (name == kTests[i].name) return static_cast<int>(i);
  return -1;
}

bool apply_test(Interp& in, int id, const std::string& name, const Value& v, Args& args, const Node& at) {
  if (id < 0 || id >= static_cast<int>(std::size(kTests))) in.fail("TemplateRuntimeError", "No test named '" + name + "'.", at);
  if (kTests[id].takes_argument && args.pos.empty()) in.fail("TypeError", "test '" + name + "' requires an argument", at);
  return kTests[id].fn(in, v, args, at);
}

}  // namespace qforge::chat
