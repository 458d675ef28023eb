// Private: the evaluator's runtime objects shared by jinja_eval.cpp and
// jinja_builtins.cpp.
#pragma once
#include <algorithm>
#include <functional>
#include <memory>
#include <string>
#include <unordered_set>
#include <vector>

#include "jinja.hpp"

namespace qforge::chat {

struct Frame : std::enable_shared_from_this<Frame> {
  std::vector<std::pair<int, Value>> vars;
  Frame* up = nullptr;            // the enclosing scope, for lookups
  std::shared_ptr<Frame> parent;  // owns `up` where closures may outlive it (templates with macros)
  Value* find(int sym) {
    for (Frame* f = this; f; f = f->up)
      for (auto& kv : f->vars)
        if (kv.first == sym) return &kv.second;
    return nullptr;
  }
  Value* find_local(int sym) {
    for (auto& kv : vars)
      if (kv.first == sym) return &kv.second;
    return nullptr;
  }
  void set(int sym, Value v) {
    if (Value* slot = find_local(sym)) *slot = std::move(v);
    else vars.emplace_back(sym, std::move(v));
  }
};
using FramePtr = std::shared_ptr<Frame>;

// A scope inside `up` (nullptr: the outermost). On the stack, unless the
// template defines macros: a macro's closure keeps its defining scopes alive,
// so there every scope is shared.
struct Scope {
  std::shared_ptr<Frame> shared;
  Frame local;
  Frame& frame;
  Scope(bool closures, Frame* up) : frame(closures ? *(shared = std::make_shared<Frame>()) : local) {
    frame.up = up;
    if (closures && up) frame.parent = up->shared_from_this();
  }
  // Macros hold their defining frame, frames hold macros: break that cycle
  // when the scope ends (also on exceptions).
  ~Scope() { frame.vars.clear(); }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;
};

struct Args {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
  // positional i, else keyword `name`, else nullptr
  const Value* get(size_t i, const char* name) const {
    if (i < pos.size()) return &pos[i];
    for (auto& kv : kw)
      if (kv.first == name) return &kv.second;
    return nullptr;
  }
};

class Interp;

// tojson of the values a batch shares (tools, documents, kwargs), computed
// once per thread. Only registered values are cached: a conversation's own
// values die with it.
struct RenderCache {
  struct Options {
    bool ensure_ascii = false, sort_keys = false, has_indent = false, has_separators = false;
    std::string indent, item_sep, key_sep;
    bool operator==(const Options&) const = default;
  };
  struct Entry {
    const void* identity;
    Options options;
    Value json;
  };
  // `x | tojson(<constant arguments>)` at one place of the template: its
  // text for x, found without evaluating the arguments again
  struct NodeEntry {
    const Node* node;
    const void* identity;
    Value json;
  };
  std::unordered_set<const void*> shared;
  std::vector<Value> keep_alive;  // what `shared` points into
  std::vector<Entry> tojson;
  std::vector<NodeEntry> tojson_at;
  // Registers v and the lists/dicts nested in it (a template may dump tools[i].function).
  void share(const Value& v, int depth = 0) {
    if (!(v.is_list() || v.is_dict()) || depth > 4 || shared.size() > 4096) return;
    if (depth == 0) keep_alive.push_back(v);
    shared.insert(v.identity());
    if (v.is_list())
      for (auto& x : v.list()) share(x, depth + 1);
    else
      for (auto& kv : v.dict_ref().items) share(kv.second, depth + 1);
  }
};

// Callables visible to templates.
struct Callable : Native {
  virtual Value call(Interp& in, Args& args, const Node& at) = 0;
};

struct LoopObj : Native {
  Value seq;                 // what is iterated: `items` may point into it
  List own;                  // items, when they are not seq's own list
  const List* items = &own;
  int64_t index0 = 0, length = 0;
  int depth = 1;
  bool changed_seen = false;  // loop.changed() state
  Value last_changed;
  const char* type_name() const override { return "LoopContext"; }
};

// A lazy iterator in Python (map/select/reject results, reversed lists):
// iterable, always truthy, no len(), not JSON serializable.
struct IterObj : Native {
  List items;
  const char* tname;
  IterObj(List l, const char* t) : items(std::move(l)), tname(t) {}
  const char* type_name() const override { return tname; }
};

// jinja2's joiner(sep): "" on the first call, sep afterwards.
struct JoinerObj : Callable {
  Value sep;
  bool used = false;
  const char* type_name() const override { return "Joiner"; }
  Value call(Interp&, Args&, const Node&) override {
    if (!used) {
      used = true;
      return Value("");
    }
    return sep;
  }
};

// jinja2's cycler(*items): .next(), .current, .reset()
struct CyclerObj : Native {
  List items;
  size_t pos = 0;
  const char* type_name() const override { return "Cycler"; }
};

struct BoundMethod : Callable {
  Value self;
  std::string name;
  BoundMethod(Value s, std::string n) : self(std::move(s)), name(std::move(n)) {}
  const char* type_name() const override { return "builtin_function_or_method"; }
  Value call(Interp& in, Args& args, const Node& at) override;
};

class Interp {
 public:
  Interp(const Program& p, const RenderOptions& o) : prog(p), opt(o) {}
  ~Interp();
  Interp(const Interp&) = delete;
  Interp& operator=(const Interp&) = delete;
  const Program& prog;
  const RenderOptions& opt;
  std::vector<std::pair<size_t, size_t>>* generation = nullptr;
  std::string* root_out = nullptr;
  int depth = 0;
  int64_t steps_left = 0;        // RenderLimits::max_steps, counted down
  const char* stack_base = nullptr;  // the render's entry frame (see check_stack)

  Value eval(const Node& n, Frame& f);
  // Constants and variables in place (the commonest operands: inline).
  const Value& ref(const Node& n, Frame& f, Value& tmp) {
    if (n.kind == NK::Const) return n.value;
    if (n.kind == NK::Name) {
      if (Value* v = f.find(n.sym)) return *v;
      return n.value;  // the Undefined naming it
    }
    return ref_other(n, f, tmp);
  }
  const Value& ref_other(const Node& n, Frame& f, Value& tmp);
  const Value& ref_item(const Node& n, Frame& f, Value& tmp);  // obj.name, obj[key]
  bool truth(const Node& n, Frame& f);                         // bool(n)
  bool test(const Node& n, Frame& f);                          // v is name(args)
  enum class Flow { Normal, Break, Continue };
  Flow exec(const std::vector<NodePtr>& body, Frame& f, std::string& out);
  // the statements exec() hands over
  void exec_emit(const Node& n, Frame& f, std::string& out);
  Flow exec_for(const Node& n, Frame& f, std::string& out);
  void exec_set_block(const Node& n, Frame& f);
  Flow exec_with(const Node& n, Frame& f, std::string& out);
  void exec_filter_block(const Node& n, Frame& f, std::string& out);
  void exec_macro(const Node& n, Frame& f, std::string& out);
  void emit_sum(const Node& e, Frame& f, std::string& out);
  Value filter_chain(const Node& last, Value v, Frame& f);
  Value apply_filter_node(const Node& n, Value input, Frame& f);  // input | name(args...)
  void collect_args(const Node& n, Frame& f, Args& args);         // a call's args[1:], kwargs, *x, **x

  // Python/jinja2 semantics shared with the builtins
  Value getattr(const Value& obj, const std::string& name, const Node& at);
  Value getitem(const Value& obj, const Value& key, const Node& at);
  void iterate(const Value& v, List& out, const Node& at);  // list(v), charging a step per item
  void iterate_items(const Value& v, List& out, const Node& at);
  // namespace() objects this render made, emptied when it ends (~Interp)
  void track_namespace(const Value& ns);
  Value call(const Value& callee, Args& args, const Node& at);
  Value binop(Op op, const Value& a, const Value& b, const Node& at);
  bool compare(Op op, const Value& a, const Value& b, const Node& at);
  // -1/0/1, or Python's TypeError naming the comparison `op`
  int cmp(const Value& a, const Value& b, const Node& at, const char* op = "<");
  int cmp_rec(const Value& a, const Value& b, const Node& at, int depth, const char* op);
  [[noreturn]] void fail_undefined(const Value& u, const Node& at);
  [[noreturn]] void fail(const char* kind, const std::string& msg, const Node& at) { raise(kind, msg, at.line, at.col); }
  // A string/list of `size` bytes (or the output) is about to be made.
  void check_output(unsigned __int128 size, const Node& at) {
    if (size > opt.limits.max_output_bytes) fail_output(at);
  }
  [[noreturn]] void fail_output(const Node& at);
  // One step of work (a loop iteration, a call); charge(n): n items walked.
  void tick(const Node& at) {
    if (--steps_left < 0) fail_steps(at);
  }
  void charge(size_t n, const Node& at) {
    steps_left -= static_cast<int64_t>(std::min<size_t>(n, size_t(1) << 62));
    if (steps_left < 0) fail_steps(at);
  }
  // A string read or built: a step per 64 bytes (kBytesPerStep).
  static constexpr int kBytesPerStepLog2 = 6;
  static constexpr size_t kScanItemsFree = 64;  // dict lookups charge a step per 64 keys beyond this
  void charge_text(const Value& v, const Node& at) {
    if (v.is_string()) charge(v.str().size() >> kBytesPerStepLog2, at);
  }
  [[noreturn]] void fail_steps(const Node& at);
  // Nested calls: stop before the native stack runs out.
  void check_stack(const Node& at) {  // frame addresses: the real stack even where ASan moves locals to the heap
    const char* here = static_cast<const char*>(__builtin_frame_address(0));
    if (stack_base && here < stack_base && static_cast<size_t>(stack_base - here) > opt.limits.max_stack_bytes) fail_stack(at);
  }
  [[noreturn]] void fail_stack(const Node& at);
  [[noreturn]] void fail_blocks(const Node& at);

 private:
  std::vector<Value> namespaces_;
  size_t prune_at_ = 64;

 public:
  std::string to_str(const Value& v) { return py_str(v); }
};

// Builtins (jinja_builtins.cpp)
Value apply_filter(Interp& in, int id, const std::string& name, Value input, Args& args, const Node& at);
// The filters a template emits most, without building their result:
// `input | trim` of a plain string as a view into it (filter_view), and
// `input | tojson` of a value not cached as shared, written straight to out
// (emit_filter; a shared value's text is kept for each such place in the
// template). Both return false when `n` is not such a case.
bool filter_view(const Node& n, const Value& input, std::string_view& piece);
bool emit_filter(Interp& in, const Node& n, const Value& input, Frame& f, std::string& out);
bool apply_test(Interp& in, int id, const std::string& name, const Value& v, Args& args, const Node& at);
// obj.name(args) for str/list/dict methods; found=false when obj has no such method.
Value call_method(Interp& in, const Value& obj, const std::string& name, Args& args, const Node& at, bool& found);
// An attribute of a global function (dict.fromkeys); nullptr when it has none.
const Value* builtin_attribute(const Value& obj, const std::string& name);
bool has_method(const Value& obj, const std::string& name);
std::string object_type_repr(const Value& v);
std::string html_escape(const std::string& s);  // markupsafe.escape

}  // namespace qforge::chat
