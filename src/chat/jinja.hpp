// Private: the Jinja AST, lexer/parser entry and the evaluator's helpers.
#pragma once
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "qforge/chat/template.hpp"
#include "qforge/chat/value.hpp"

namespace qforge::chat {

enum class NK : uint8_t {
  // expressions
  Const, Name, Getattr, Getitem, Slice, Call, Filter, Test, Neg, Pos, Not, And, Or,
  BinOp, Compare, CondExpr, ListLit, TupleLit, DictLit, Concat,
  // statements
  Text, Emit, If, For, Set, SetBlock, Macro, CallBlock, FilterBlock, With, Break, Continue,
  Generation, Body,
};

enum class Op : uint8_t { Add, Sub, Mul, Div, FloorDiv, Mod, Pow, Eq, Ne, Lt, Le, Gt, Ge, In, NotIn };

struct Node;
using NodePtr = std::unique_ptr<Node>;

struct Node {
  NK kind;
  int line = 0, col = 0;
  Op op = Op::Add;
  bool negated = false;          // Test: `is not`
  bool loop_filter = false;      // For: `{% for x in xs if cond %}` (the condition is args[2])
  bool dict_method = false;      // Getattr: the name is a dict method, which shadows a key of that name
  int sym = -1;        // Name: symbol id; Filter/Test: builtin id
  std::string name;    // identifier / attribute / filter / test / text
  Value value;         // Const
  std::vector<NodePtr> args;                          // children
  std::vector<std::pair<std::string, NodePtr>> kwargs;
  std::vector<Op> ops;                                // Compare chain
  std::vector<NodePtr> body, orelse;
  Node(NK k, int l, int c) : kind(k), line(l), col(c) {}
  ~Node();  // frees the subtree without recursion (a rejected template may be deeper than the stack allows)
  Node(const Node&) = delete;
  Node& operator=(const Node&) = delete;
};

// How deep a compiled template's syntax tree may be: brackets, blocks and
// every link of a chain (`a + b + ...`, `x.a.b...`, `x|f|g...`, `not not ...`,
// `- - x`, `elif`) count one level. Every walk of the tree (the evaluator,
// sealing, freeing) recurses at most this deep, so a template can never run
// the stack out; a deeper one is a TemplateSyntaxError naming this limit.
constexpr int kMaxTemplateNesting = 256;

struct Program {
  NodePtr root;
  std::vector<std::string> symbols;            // id -> name
  struct NameHash {  // looks names up by string_view without copying them
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  std::unordered_map<std::string, int, NameHash, std::equal_to<>> sym_ids;
  // Set once compiled, read by every render:
  std::vector<std::pair<int, Value>> builtins;  // the global functions the template names (immortal)
  int loop_sym = -1;                            // `loop`, or -1 when no loop object is ever read
  bool has_macros = false;                      // macros or call blocks: scopes may outlive their block
  Program() = default;
  Program(const Program&) = delete;
  Program& operator=(const Program&) = delete;
  ~Program();  // frees the constants (immortal while renders could share them)
  int sym(const std::string& name);
  // The symbol id of `name`, -1 when the template never uses it (the
  // context's keys, on every render).
  int find_sym(std::string_view name) const;
  void finish();  // after the last sym(): the loop symbol and the global functions
};

// Builds the program from source; throws TemplateError.
std::shared_ptr<Program> compile_template(std::string_view source);

// Ids of builtin filters/tests (resolved at parse time; -1 = unknown).
int filter_id(std::string_view name);
int test_id(std::string_view name);

// Whether `obj.name` on a dict names a method rather than an item (dict
// methods and dunders shadow keys).
bool is_dict_method(std::string_view name);

// Resolves the global functions (range, namespace, ...) a program names.
void link_builtins(Program& prog);

[[noreturn]] void raise(const char* kind, std::string message, int line = 0, int col = 0);

}  // namespace qforge::chat
