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
  Text, Emit, If, For, Set, SetBlock, Macro, CallBlock, FilterBlock, Break, Continue,
  Generation, Body,
};

enum class Op : uint8_t { Add, Sub, Mul, Div, FloorDiv, Mod, Pow, Eq, Ne, Lt, Le, Gt, Ge, In, NotIn };

struct Node;
using NodePtr = std::unique_ptr<Node>;

struct Node {
  NK kind;
  int line = 0, col = 0;
  Op op = Op::Add;
  bool flag = false;   // Test: negated; For: has filter; Slice parts present...
  int sym = -1;        // Name: symbol id; Filter/Test: builtin id
  std::string name;    // identifier / attribute / filter / test / text
  Value value;         // Const
  std::vector<NodePtr> args;                          // children
  std::vector<std::pair<std::string, NodePtr>> kwargs;
  std::vector<Op> ops;                                // Compare chain
  std::vector<NodePtr> body, orelse;
  Node(NK k, int l, int c) : kind(k), line(l), col(c) {}
};

struct Program {
  NodePtr root;
  std::vector<std::string> symbols;            // id -> name
  std::unordered_map<std::string, int> sym_ids;
  int sym(const std::string& name);
};

// Builds the program from source; throws TemplateError.
std::shared_ptr<Program> compile_template(std::string_view source);

// Ids of builtin filters/tests (resolved at parse time; -1 = unknown).
int filter_id(std::string_view name);
int test_id(std::string_view name);

[[noreturn]] void raise(const char* kind, std::string message, int line = 0, int col = 0);

}  // namespace qforge::chat
