// transformers' template globals: range, dict (and dict.fromkeys), namespace,
// raise_exception, strftime_now, joiner, cycler.
#include <algorithm>
#include <ctime>

#include "jinja_builtins.hpp"

namespace qforge::chat {

using namespace builtins;

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
