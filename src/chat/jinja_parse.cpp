// Jinja lexer and parser, following jinja2 3.1's grammar and its whitespace
// rules with trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False.
#include <algorithm>
#include <cstring>

#include "jinja.hpp"

namespace qforge::chat {

TemplateError::TemplateError(std::string k, std::string m, int l, int c)
    : InvalidArgument(detail::concat(k, ": ", m, l ? detail::concat(" (line ", l, ":", c, ")") : std::string())),
      kind(std::move(k)),
      message(std::move(m)),
      line(l),
      column(c) {}

void raise(const char* kind, std::string message, int line, int col) {
  throw TemplateError(kind, std::move(message), line, col);
}

int Program::sym(const std::string& name) {
  auto it = sym_ids.find(name);
  if (it != sym_ids.end()) return it->second;
  int id = static_cast<int>(symbols.size());
  symbols.push_back(name);
  sym_ids.emplace(name, id);
  return id;
}

void Program::finish() {
  if (auto it = sym_ids.find("loop"); it != sym_ids.end()) loop_sym = it->second;
  link_builtins(*this);
}

int Program::find_sym(std::string_view name) const {
  auto it = sym_ids.find(name);
  return it == sym_ids.end() ? -1 : it->second;
}

namespace {

enum class TT : uint8_t { Data, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, String, Int, Float, Operator, Eof };

struct Token {
  TT type;
  std::string text;  // data, name, operator, decoded string
  Value value;       // numbers
  int line, col;
};

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }
bool is_name_start(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (c & 0x80); }
bool is_name_char(char c) { return is_name_start(c) || (c >= '0' && c <= '9'); }
bool is_digit(char c) { return c >= '0' && c <= '9'; }

class Lexer {
 public:
  explicit Lexer(std::string_view src) {
    // newline normalisation and dropping one trailing newline, as jinja2 does
    src_.reserve(src.size());
    for (size_t i = 0; i < src.size(); ++i) {
      if (src[i] == '\r') {
        src_ += '\n';
        if (i + 1 < src.size() && src[i + 1] == '\n') ++i;
      } else {
        src_ += src[i];
      }
    }
    if (!src_.empty() && src_.back() == '\n') src_.pop_back();
    line_starts_.push_back(0);
    for (size_t i = 0; i < src_.size(); ++i)
      if (src_[i] == '\n') line_starts_.push_back(i + 1);
  }

  std::vector<Token> run() {
    std::vector<Token> out;
    size_t pos = 0;
    bool line_starting = true;
    const size_t n = src_.size();
    while (pos < n) {
      // earliest tag start
      size_t tag = src_.find('{', pos);
      while (tag != std::string::npos && tag + 1 < n && src_[tag + 1] != '{' && src_[tag + 1] != '%' && src_[tag + 1] != '#')
        tag = src_.find('{', tag + 1);
      if (tag == std::string::npos || tag + 1 >= n) {
        push_data(out, pos, src_.substr(pos));
        break;
      }
      char kind = src_[tag + 1];
      char sign = tag + 2 < n && (src_[tag + 2] == '-' || src_[tag + 2] == '+') ? src_[tag + 2] : 0;
      std::string text = src_.substr(pos, tag - pos);
      size_t text_pos = pos;
      if (sign == '-') {
        size_t e = text.size();
        while (e > 0 && is_space(text[e - 1])) --e;
        text.resize(e);
      } else if (sign != '+' && kind != '{') {
        lstrip(text, line_starting);
      }
      size_t after = tag + 2 + (sign ? 1 : 0);
      if (kind == '%') {
        // {% raw %} ... {% endraw %}
        size_t p = after;
        while (p < n && is_space(src_[p])) ++p;
        if (src_.compare(p, 3, "raw") == 0 && (p + 3 >= n || !is_name_char(src_[p + 3]))) {
          size_t q = p + 3;
          while (q < n && is_space(src_[q])) ++q;
          bool strip_after = false;
          if (q < n && src_[q] == '-' && src_.compare(q + 1, 2, "%}") == 0) {
            strip_after = true;
            q += 3;
          } else if (src_.compare(q, 2, "%}") == 0) {
            q += 2;
          } else {
            q = std::string::npos;
          }
          if (q != std::string::npos) {
            push_data(out, text_pos, text);
            if (strip_after)
              while (q < n && is_space(src_[q])) ++q;
            pos = lex_raw(out, q, line_starting);
            continue;
          }
        }
      }
      push_data(out, text_pos, text);
      if (kind == '#') {
        size_t e = src_.find("#}", after);
        if (e == std::string::npos) fail("Missing end of comment tag", tag);
        pos = e + 2;
        char before = e > after ? src_[e - 1] : 0;
        if (before == '-') {
          while (pos < n && is_space(src_[pos])) ++pos;
        } else if (before != '+' && pos < n && src_[pos] == '\n') {
          ++pos;
        }
        line_starting = src_[pos - 1] == '\n';
        continue;
      }
      out.push_back(Token{kind == '{' ? TT::VarBegin : TT::BlockBegin, {}, {}, line_of(tag), col_of(tag)});
      pos = lex_tag(out, after, kind == '{', line_starting);
    }
    out.push_back(Token{TT::Eof, {}, {}, line_of(n), col_of(n)});
    return out;
  }

  int line_of(size_t off) const {
    size_t lo = 0, hi = line_starts_.size();
    while (hi - lo > 1) {
      size_t mid = (lo + hi) / 2;
      if (line_starts_[mid] <= off) lo = mid;
      else hi = mid;
    }
    return static_cast<int>(lo) + 1;
  }
  int col_of(size_t off) const { return static_cast<int>(off - line_starts_[line_of(off) - 1]) + 1; }

 private:
  std::string src_;
  std::vector<size_t> line_starts_;

  [[noreturn]] void fail(const std::string& msg, size_t off) { raise("TemplateSyntaxError", msg, line_of(off), col_of(off)); }

  void push_data(std::vector<Token>& out, size_t off, const std::string& text) {
    if (!text.empty()) out.push_back(Token{TT::Data, text, {}, line_of(off), col_of(off)});
  }

  static void lstrip(std::string& text, bool line_starting) {
    size_t nl = text.rfind('\n');
    size_t l_pos = nl == std::string::npos ? 0 : nl + 1;
    if (l_pos > 0 || line_starting) {
      if (l_pos == text.size()) return;
      for (size_t i = l_pos; i < text.size(); ++i)
        if (!is_space(text[i])) return;
      text.resize(l_pos);
    }
  }

  size_t lex_raw(std::vector<Token>& out, size_t pos, bool& line_starting) {
    const size_t n = src_.size();
    size_t search = pos;
    while (true) {
      size_t b = src_.find("{%", search);
      if (b == std::string::npos) fail("Missing end of raw directive", pos);
      size_t p = b + 2;
      char sign = p < n && (src_[p] == '-' || src_[p] == '+') ? src_[p] : 0;
      if (sign) ++p;
      while (p < n && is_space(src_[p])) ++p;
      if (src_.compare(p, 6, "endraw") != 0) {
        search = b + 2;
        continue;
      }
      p += 6;
      while (p < n && is_space(src_[p])) ++p;
      char esign = 0;
      if (p < n && (src_[p] == '-' || src_[p] == '+')) esign = src_[p++];
      if (src_.compare(p, 2, "%}") != 0) {
        search = b + 2;
        continue;
      }
      p += 2;
      std::string text = src_.substr(pos, b - pos);
      if (sign == '-') {
        size_t e = text.size();
        while (e > 0 && is_space(text[e - 1])) --e;
        text.resize(e);
      } else if (sign != '+') {
        lstrip(text, line_starting);
      }
      push_data(out, pos, text);
      if (esign == '-') {
        while (p < n && is_space(src_[p])) ++p;
      } else if (esign != '+' && p < n && src_[p] == '\n') {
        ++p;
      }
      line_starting = src_[p - 1] == '\n';
      return p;
    }
  }

  // Tokens of one {{ }} or {% %}; returns the offset after its end.
  size_t lex_tag(std::vector<Token>& out, size_t pos, bool is_var, bool& line_starting) {
    const size_t n = src_.size();
    std::vector<char> balance;
    while (true) {
      while (pos < n && is_space(src_[pos])) ++pos;
      if (pos >= n) fail(is_var ? "unexpected end of template, expected 'end of print statement'."
                                : "unexpected end of template, expected 'end of statement block'.", pos);
      if (balance.empty()) {
        const char* end = is_var ? "}}" : "%}";
        size_t e = std::string::npos;
        char sign = 0;
        if (src_.compare(pos, 2, end) == 0) e = pos + 2;
        else if ((src_[pos] == '-' || (!is_var && src_[pos] == '+')) && src_.compare(pos + 1, 2, end) == 0) {
          sign = src_[pos];
          e = pos + 3;
        }
        if (e != std::string::npos) {
          out.push_back(Token{is_var ? TT::VarEnd : TT::BlockEnd, {}, {}, line_of(pos), col_of(pos)});
          if (sign == '-') {
            while (e < n && is_space(src_[e])) ++e;
          } else if (!is_var && sign != '+' && e < n && src_[e] == '\n') {
            ++e;
          }
          line_starting = src_[e - 1] == '\n';
          return e;
        }
      }
      int line = line_of(pos), col = col_of(pos);
      char c = src_[pos];
      if (is_name_start(c)) {
        size_t s = pos;
        while (pos < n && is_name_char(src_[pos])) ++pos;
        out.push_back(Token{TT::Name, src_.substr(s, pos - s), {}, line, col});
      } else if (is_digit(c)) {
        pos = lex_number(out, pos, line, col);
      } else if (c == '\'' || c == '"') {
        pos = lex_string(out, pos, line, col);
      } else {
        static const char* ops3[] = {"//", "**", "==", "!=", "<=", ">="};
        std::string op;
        for (auto* o : ops3)
          if (src_.compare(pos, 2, o) == 0) op = o;
        if (op.empty()) {
          if (!std::strchr("+-/*%~[](){}<>=.:|,;", c)) fail(detail::concat("unexpected char '", c, "' at ", pos), pos);
          op = std::string(1, c);
        }
        if (op == "(" || op == "[" || op == "{") balance.push_back(op == "(" ? ')' : op == "[" ? ']' : '}');
        if (op == ")" || op == "]" || op == "}") {
          if (balance.empty()) fail("unexpected '" + op + "'", pos);
          if (balance.back() != op[0]) fail(detail::concat("unexpected '", op, "', expected '", balance.back(), "'"), pos);
          balance.pop_back();
        }
        pos += op.size();
        out.push_back(Token{TT::Operator, op, {}, line, col});
      }
    }
  }

  // 0x1F, 0o17, 0b101 (underscores between digits, as jinja2's lexer)
  size_t lex_prefixed_int(std::vector<Token>& out, size_t pos, int line, int col) {
    const size_t n = src_.size();
    char kind = static_cast<char>(src_[pos + 1] | 0x20);
    int base = kind == 'x' ? 16 : kind == 'o' ? 8 : 2;
    auto digit = [&](char c) {
      int d = c >= '0' && c <= '9' ? c - '0' : (c | 0x20) >= 'a' && (c | 0x20) <= 'f' ? (c | 0x20) - 'a' + 10 : 99;
      return d < base ? d : -1;
    };
    size_t p = pos + 2;
    uint64_t v = 0;
    size_t digits = 0;
    while (p < n && (digit(src_[p]) >= 0 || (src_[p] == '_' && p + 1 < n && digit(src_[p + 1]) >= 0))) {
      if (src_[p] != '_') {
        if (v > (uint64_t{1} << 63) / static_cast<uint64_t>(base)) fail("integer literal too large", pos);
        v = v * static_cast<uint64_t>(base) + static_cast<uint64_t>(digit(src_[p]));
        ++digits;
      }
      ++p;
    }
    if (digits == 0 || v > static_cast<uint64_t>(INT64_MAX)) fail(digits ? "integer literal too large" : "invalid integer literal", pos);
    Token t{TT::Int, std::string(src_.substr(pos, p - pos)), {}, line, col};
    t.value = Value(static_cast<int64_t>(v));
    out.push_back(std::move(t));
    return p;
  }

  size_t lex_number(std::vector<Token>& out, size_t pos, int line, int col) {
    const size_t n = src_.size();
    if (src_[pos] == '0' && pos + 2 < n && std::strchr("xXoObB", src_[pos + 1]) && src_[pos + 1] != 0)
      return lex_prefixed_int(out, pos, line, col);
    auto digits = [&](size_t p) {
      size_t s = p;
      while (p < n && (is_digit(src_[p]) || (src_[p] == '_' && p + 1 < n && is_digit(src_[p + 1]) && p > s))) ++p;
      return p;
    };
    size_t p = digits(pos);
    bool is_float = false;
    // jinja2's float pattern does not start right after a dot: x.0.1 is x[0][1]
    bool after_dot = pos > 0 && src_[pos - 1] == '.';
    if (!after_dot && p + 1 < n && src_[p] == '.' && is_digit(src_[p + 1])) {
      is_float = true;
      p = digits(p + 1);
    }
    if (!after_dot && p < n && (src_[p] == 'e' || src_[p] == 'E')) {
      size_t q = p + 1;
      if (q < n && (src_[q] == '+' || src_[q] == '-')) ++q;
      if (q < n && is_digit(src_[q])) {
        is_float = true;
        p = digits(q);
      }
    }
    std::string txt;
    for (size_t i = pos; i < p; ++i)
      if (src_[i] != '_') txt += src_[i];
    Token t{is_float ? TT::Float : TT::Int, txt, {}, line, col};
    if (is_float) t.value = Value(std::strtod(txt.c_str(), nullptr));
    else {
      errno = 0;
      long long v = std::strtoll(txt.c_str(), nullptr, 10);
      if (errno) fail("integer literal too large", pos);
      t.value = Value(static_cast<int64_t>(v));
    }
    out.push_back(std::move(t));
    return p;
  }

  size_t lex_string(std::vector<Token>& out, size_t pos, int line, int col) {
    const size_t n = src_.size();
    char q = src_[pos];
    std::string s;
    size_t p = pos + 1;
    auto hexval = [&](size_t at, int len) -> int64_t {
      if (at + len > n) return -1;
      int64_t v = 0;
      for (int k = 0; k < len; ++k) {
        char c = src_[at + k];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= c - '0';
        else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
        else return -1;
      }
      return v;
    };
    while (true) {
      if (p >= n) fail("unexpected end of string", pos);
      char c = src_[p];
      if (c == q) break;
      if (c != '\\') {
        s += c;
        ++p;
        continue;
      }
      if (p + 1 >= n) fail("unexpected end of string", pos);
      char e = src_[p + 1];
      p += 2;
      switch (e) {
        case 'n': s += '\n'; break;
        case 't': s += '\t'; break;
        case 'r': s += '\r'; break;
        case '\\': s += '\\'; break;
        case '\'': s += '\''; break;
        case '"': s += '"'; break;
        case 'a': s += '\a'; break;
        case 'b': s += '\b'; break;
        case 'f': s += '\f'; break;
        case 'v': s += '\v'; break;
        case '\n': break;
        case 'x':
        case 'u':
        case 'U': {
          int len = e == 'x' ? 2 : e == 'u' ? 4 : 8;
          int64_t v = hexval(p, len);
          if (v < 0) fail("invalid \\" + std::string(1, e) + " escape in string literal", p);
          utf8_append(s, static_cast<uint32_t>(v));
          p += len;
          break;
        }
        default:
          if (e >= '0' && e <= '7') {
            int v = e - '0';
            for (int k = 0; k < 2 && p < n && src_[p] >= '0' && src_[p] <= '7'; ++k) v = v * 8 + (src_[p++] - '0');
            utf8_append(s, static_cast<uint32_t>(v));
          } else {
            s += '\\';
            s += e;
          }
      }
    }
    out.push_back(Token{TT::String, std::move(s), {}, line, col});
    return p + 1;
  }
};

std::string nesting_message() {
  return detail::concat("template nested deeper than ", kMaxTemplateNesting,
                        " levels (kMaxTemplateNesting: brackets, blocks and each link of a chain of operators, "
                        "filters, attributes, calls or elifs count one)");
}

// ------------------------------------------------------------------ parser
class Parser {
 public:
  Parser(std::vector<Token> toks, Program& prog) : t_(std::move(toks)), prog_(prog) {}

  NodePtr parse_template() {
    auto root = std::make_unique<Node>(NK::Body, 1, 1);
    std::string end;
    root->body = subparse({}, end);
    fail_unknown();  // after every syntax error, as jinja2 checks names when it compiles the parsed tree
    return root;
  }

 private:
  std::vector<Token> t_;
  size_t i_ = 0;
  Program& prog_;
  int soft_ = 0;  // inside an {% if %} (unknown filters become runtime errors)
  // Unknown filters / tests outside any {% if %}: errors unless the expression
  // turns out to be a conditional one (parse_condexpr); see fail_unknown().
  struct Unknown {
    std::string message;
    const Token* at;
  };
  std::vector<Unknown> unknown_;
  void fail_unknown() {
    if (!unknown_.empty()) fail_assertion(unknown_.front().message, *unknown_.front().at);
  }
  // The parser's own recursion (a bracket level is about three Nests); the
  // tree it builds is checked against kMaxTemplateNesting afterwards.
  int depth_ = 0;
  struct Nest {
    Parser& p;
    explicit Nest(Parser& parser) : p(parser) {
      if (++p.depth_ > 3 * kMaxTemplateNesting) p.fail(nesting_message());
    }
    ~Nest() { --p.depth_; }
  };
  std::vector<std::string> open_blocks_;

  const Token& cur() const { return t_[i_]; }
  const Token& peek(size_t k = 1) const { return t_[std::min(i_ + k, t_.size() - 1)]; }
  bool is_op(const char* op) const { return cur().type == TT::Operator && cur().text == op; }
  bool is_name(const char* nm) const { return cur().type == TT::Name && cur().text == nm; }
  bool skip_op(const char* op) {
    if (is_op(op)) { ++i_; return true; }
    return false;
  }
  bool skip_name(const char* nm) {
    if (is_name(nm)) { ++i_; return true; }
    return false;
  }
  static std::string describe(const Token& t) {
    switch (t.type) {
      case TT::Eof: return "end of template";
      case TT::VarEnd: return "end of print statement";
      case TT::BlockEnd: return "end of statement block";
      case TT::VarBegin: return "begin of print statement";
      case TT::BlockBegin: return "begin of statement block";
      case TT::Data: return "template data / text";
      case TT::String: return "string";
      case TT::Int: return "integer";
      case TT::Float: return "float";
      default: return t.text;
    }
  }
  [[noreturn]] void fail(const std::string& msg, const Token& t) { raise("TemplateSyntaxError", msg, t.line, t.col); }
  [[noreturn]] void fail(const std::string& msg) { fail(msg, cur()); }
  // What jinja2's compiler (not its parser) refuses: TemplateAssertionError, a TemplateSyntaxError.
  [[noreturn]] void fail_assertion(const std::string& msg, const Token& t) {
    raise("TemplateAssertionError", msg, t.line, t.col);
  }
  void expect_op(const char* op) {
    if (!skip_op(op)) fail(detail::concat("expected token '", op, "', got '", describe(cur()), "'"));
  }
  std::string expect_name() {
    if (cur().type != TT::Name) fail(detail::concat("expected token 'name', got '", describe(cur()), "'"));
    return t_[i_++].text;
  }
  void expect_block_end() {
    if (cur().type != TT::BlockEnd) fail(detail::concat("expected token 'end of statement block', got '", describe(cur()), "'"));
    ++i_;
  }
  NodePtr node(NK k, const Token& t) { return std::make_unique<Node>(k, t.line, t.col); }

  // Parses until {% <one of ends> %}; `found` receives the end tag name
  // (its token consumed, the rest of that tag not).
  std::vector<NodePtr> subparse(std::vector<const char*> ends, std::string& found) {
    std::vector<NodePtr> body;
    while (true) {
      const Token& t = cur();
      if (t.type == TT::Eof) {
        if (!ends.empty()) {
          std::string msg = "Unexpected end of template. Jinja was looking for the following tags: ";
          for (size_t k = 0; k < ends.size(); ++k) msg += (k ? " or '" : "'") + std::string(ends[k]) + "'";
          msg += ". The innermost block that needs to be closed is '" + open_blocks_.back() + "'.";
          fail(msg);
        }
        return body;
      }
      if (t.type == TT::Data) {
        auto n = node(NK::Text, t);
        n->name = t.text;
        body.push_back(std::move(n));
        ++i_;
      } else if (t.type == TT::VarBegin) {
        ++i_;
        auto n = node(NK::Emit, t);
        n->args.push_back(parse_tuple(false, true, {}, false));
        if (cur().type != TT::VarEnd) fail(detail::concat("expected token 'end of print statement', got '", describe(cur()), "'"));
        ++i_;
        body.push_back(std::move(n));
      } else if (t.type == TT::BlockBegin) {
        ++i_;
        if (cur().type != TT::Name) fail("tag name expected");
        for (auto* e : ends)
          if (cur().text == e) {
            found = e;
            ++i_;
            return body;
          }
        body.push_back(parse_statement());
      } else {
        fail("unexpected token " + describe(t));
      }
    }
  }

  NodePtr parse_statement() {
    Nest nest(*this);
    const Token& t = cur();
    const std::string& kw = t.text;
    if (kw == "if") return parse_if();
    if (kw == "for") return parse_for();
    if (kw == "set") return parse_set();
    if (kw == "macro") return parse_macro();
    if (kw == "call") return parse_call_block();
    if (kw == "filter") return parse_filter_block();
    if (kw == "with") return parse_with();
    if (kw == "generation") {
      ++i_;
      auto n = node(NK::Generation, t);
      expect_block_end();
      open_blocks_.push_back("generation");
      std::string end;
      n->body = subparse({"endgeneration"}, end);
      open_blocks_.pop_back();
      expect_block_end();
      return n;
    }
    if (kw == "break" || kw == "continue") {
      bool in_loop = false;
      for (auto& b : open_blocks_) {
        if (b == "for") in_loop = true;
        if (b == "macro") in_loop = false;
      }
      // jinja2 compiles this to Python code that Python rejects
      if (!in_loop) raise("SyntaxError", detail::concat("'", kw, "' ", kw == "break" ? "outside loop" : "not properly in loop"), t.line, t.col);
      ++i_;
      auto n = node(kw == "break" ? NK::Break : NK::Continue, t);
      expect_block_end();
      return n;
    }
    std::string msg = detail::concat("Encountered unknown tag '", kw, "'.");
    if (!open_blocks_.empty())
      msg += detail::concat(" The innermost block that needs to be closed is '", open_blocks_.back(), "'.");
    fail(msg, t);
  }

  NodePtr parse_if() {
    auto n = node(NK::If, cur());
    ++i_;
    ++soft_;
    n->args.push_back(parse_tuple(false, false, {}, false));
    expect_block_end();
    open_blocks_.push_back("if");
    std::string end;
    n->body = subparse({"elif", "else", "endif"}, end);
    if (end == "elif") {
      --i_;  // re-parse "elif" as a nested if (one level deeper, like jinja2's compiler)
      Nest nest(*this);
      n->orelse.push_back(parse_if());
      open_blocks_.pop_back();
      --soft_;
      return n;
    }
    if (end == "else") {
      expect_block_end();
      n->orelse = subparse({"endif"}, end);
    }
    expect_block_end();
    open_blocks_.pop_back();
    --soft_;
    return n;
  }

  NodePtr parse_for() {
    auto n = node(NK::For, cur());
    ++i_;
    int saved_soft = soft_;
    soft_ = 0;
    n->args.push_back(parse_assign_target(true, {"in"}));
    if (!skip_name("in")) fail(detail::concat("expected token 'in', got '", describe(cur()), "'"));
    n->args.push_back(parse_tuple(false, false, {"recursive"}, false));
    if (skip_name("if")) {
      n->loop_filter = true;
      n->args.push_back(parse_expression(true));
    }
    if (is_name("recursive")) fail("recursive loops are not supported");
    expect_block_end();
    open_blocks_.push_back("for");
    std::string end;
    n->body = subparse({"endfor", "else"}, end);
    if (end == "else") {
      expect_block_end();
      open_blocks_.back() = "for-else";
      n->orelse = subparse({"endfor"}, end);
    }
    expect_block_end();
    open_blocks_.pop_back();
    soft_ = saved_soft;
    return n;
  }

  NodePtr parse_set() {
    const Token& t = cur();
    ++i_;
    NodePtr target;
    auto at_ns_ref = [&] {
      return cur().type == TT::Name && peek().type == TT::Operator && peek().text == "." && peek(2).type == TT::Name;
    };
    auto ns_ref = [&] {  // ns.attr
      auto ns = node(NK::Getattr, cur());
      auto nm = node(NK::Name, cur());
      nm->name = cur().text;
      nm->sym = prog_.sym(nm->name);
      i_ += 2;
      ns->name = expect_name();
      ns->args.push_back(std::move(nm));
      return ns;
    };
    if (is_op("(")) {
      target = parse_assign_target(true, {});
    } else {  // names and namespace attributes (ns.a), a tuple when comma-separated (jinja2 >= 3.1.5)
      auto tuple = node(NK::TupleLit, t);
      do {
        if (cur().type == TT::BlockEnd) break;  // {% set a, %}: a tuple target
        if (is_op("=")) fail("unexpected '='");
        tuple->args.push_back(at_ns_ref() ? ns_ref() : parse_primary());
      } while (skip_op(","));
      bool single = tuple->args.size() == 1 && !(t_[i_ - 1].type == TT::Operator && t_[i_ - 1].text == ",");
      for (auto& item : tuple->args) {
        bool assignable = item->kind == NK::Getattr || (item->kind == NK::Name && !is_special_constant(item->name));
        if (assignable) continue;
        if (!single) fail("can't assign to 'tuple'");
        if (item->kind == NK::Name) fail("Can't assign to special constant");
        fail("can't assign to '" + std::string(item->kind == NK::Const ? "const" : "expression") + "'");
      }
      target = single ? std::move(tuple->args[0]) : std::move(tuple);
    }
    if (skip_op("=")) {
      auto n = node(NK::Set, t);
      n->args.push_back(std::move(target));
      n->args.push_back(parse_tuple(false, true, {}, false));
      expect_block_end();
      return n;
    }
    auto n = node(NK::SetBlock, t);
    n->args.push_back(std::move(target));
    if (is_op("|")) n->args.push_back(parse_filter(nullptr, false));
    expect_block_end();
    open_blocks_.push_back("set");
    std::string end;
    int saved_soft = soft_;
    soft_ = 0;
    n->body = subparse({"endset"}, end);
    soft_ = saved_soft;
    open_blocks_.pop_back();
    expect_block_end();
    return n;
  }

  NodePtr parse_macro() {
    auto n = node(NK::Macro, cur());
    ++i_;
    n->name = expect_name();
    n->sym = prog_.sym(n->name);
    parse_signature(*n);
    expect_block_end();
    open_blocks_.push_back("macro");
    int saved_soft = soft_;
    soft_ = 0;
    std::string end;
    n->body = subparse({"endmacro"}, end);
    soft_ = saved_soft;
    check_caller_parameter(*n);
    open_blocks_.pop_back();
    if (cur().type == TT::Name && cur().text == n->name) ++i_;
    expect_block_end();
    return n;
  }

  // jinja2 gives a macro whose body reads `caller` that parameter: one the
  // signature names must have a default.
  void check_caller_parameter(const Node& def) {
    auto param = std::find_if(def.kwargs.begin(), def.kwargs.end(), [](auto& kv) { return kv.first == "caller"; });
    if (param == def.kwargs.end() || param->second) return;
    std::vector<const Node*> todo;
    for (auto& c : def.body) todo.push_back(c.get());
    while (!todo.empty()) {
      const Node* n = todo.back();
      todo.pop_back();
      if (!n) continue;
      if (n->kind == NK::Name && n->name == "caller") {
        Token at{TT::Name, {}, {}, def.line, def.col};
        fail_assertion("When defining macros or call blocks the special \"caller\" argument must be omitted or be "
                       "given a default.", at);
      }
      for (auto* v : {&n->args, &n->body, &n->orelse})
        for (auto& c : *v) todo.push_back(c.get());
      for (auto& kv : n->kwargs) todo.push_back(kv.second.get());
    }
  }

  // (a, b=default, ...) into n.kwargs: name -> default (nullptr when none)
  void parse_signature(Node& n) {
    expect_op("(");
    while (!is_op(")")) {
      if (!n.kwargs.empty()) expect_op(",");
      if (is_op(")")) break;
      std::string arg = expect_name();
      prog_.sym(arg);
      NodePtr def;
      if (skip_op("=")) def = parse_expression(true);
      else
        for (auto& kv : n.kwargs)
          if (kv.second) fail("non-default argument follows default argument");
      n.kwargs.emplace_back(arg, std::move(def));
    }
    expect_op(")");
  }

  NodePtr parse_call_block() {
    auto n = node(NK::CallBlock, cur());
    ++i_;
    if (is_op("(")) parse_signature(*n);
    n->args.push_back(parse_expression(true));
    if (n->args[0]->kind != NK::Call) fail("expected call");
    expect_block_end();
    open_blocks_.push_back("call");
    std::string end;
    n->body = subparse({"endcall"}, end);
    check_caller_parameter(*n);
    open_blocks_.pop_back();
    expect_block_end();
    prog_.sym("caller");
    return n;
  }

  NodePtr parse_filter_block() {
    auto n = node(NK::FilterBlock, cur());
    ++i_;
    n->args.push_back(parse_filter(nullptr, true));
    expect_block_end();
    open_blocks_.push_back("filter");
    std::string end;
    n->body = subparse({"endfilter"}, end);
    open_blocks_.pop_back();
    expect_block_end();
    return n;
  }

  // {% with a = x, b = y %}body{% endwith %}: args = target, value, target, value, ...
  NodePtr parse_with() {
    auto n = node(NK::With, cur());
    ++i_;
    while (cur().type != TT::BlockEnd) {
      if (!n->args.empty()) expect_op(",");
      n->args.push_back(parse_assign_target(true, {}));
      expect_op("=");
      n->args.push_back(parse_expression(true));
    }
    expect_block_end();
    open_blocks_.push_back("with");
    std::string end;
    n->body = subparse({"endwith"}, end);
    open_blocks_.pop_back();
    expect_block_end();
    return n;
  }

  // Names jinja2 reads as constants: not assignable.
  static bool is_special_constant(std::string_view name) {
    return name == "true" || name == "false" || name == "none" || name == "True" || name == "False" || name == "None";
  }

  NodePtr parse_assign_target(bool with_tuple, std::vector<const char*> extra_end) {
    NodePtr target = with_tuple ? parse_tuple(true, true, extra_end, false) : parse_primary();
    auto check = [&](const Node& x) {
      if (x.kind != NK::Name) fail("can't assign to '" + std::string(x.kind == NK::Const ? "const" : "expression") + "'", t_[i_ - 1]);
      if (is_special_constant(x.name)) fail("Can't assign to special constant");
    };
    if (target->kind == NK::TupleLit)
      for (auto& a : target->args) check(*a);
    else
      check(*target);
    return target;
  }

  bool is_tuple_end(const std::vector<const char*>& extra) const {
    const Token& t = cur();
    if (t.type == TT::VarEnd || t.type == TT::BlockEnd || t.type == TT::Eof) return true;
    if (t.type == TT::Operator && t.text == ")") return true;
    if (t.type == TT::Name)
      for (auto* e : extra)
        if (t.text == e) return true;
    return false;
  }

  NodePtr parse_tuple(bool simplified, bool with_condexpr, std::vector<const char*> extra_end, bool explicit_parens) {
    const Token& start = cur();
    std::vector<NodePtr> args;
    bool is_tuple = false;
    while (true) {
      if (!args.empty()) expect_op(",");
      if (is_tuple_end(extra_end)) break;
      if (simplified) args.push_back(parse_primary());
      else args.push_back(parse_expression(with_condexpr));
      if (is_op(",")) is_tuple = true;
      else break;
    }
    if (!is_tuple) {
      if (!args.empty()) return std::move(args[0]);
      if (!explicit_parens) fail(detail::concat("Expected an expression, got '", describe(cur()), "'"));
    }
    auto n = node(NK::TupleLit, start);
    n->args = std::move(args);
    return n;
  }

  NodePtr parse_expression(bool with_condexpr) { return with_condexpr ? parse_condexpr() : parse_or(); }

  // `a if b else c`: as in jinja2, an unknown filter or test anywhere in it
  // (a included, which is parsed before the `if` shows) fails only when reached.
  NodePtr parse_condexpr() {
    Nest nest(*this);
    size_t unknown_before = unknown_.size();
    NodePtr expr1 = parse_or();
    if (is_name("if")) unknown_.resize(unknown_before);
    while (is_name("if")) {
      const Token& t = cur();
      ++i_;
      ++soft_;
      NodePtr expr2 = parse_or();
      NodePtr expr3;
      if (skip_name("else")) expr3 = parse_condexpr();
      --soft_;
      auto n = node(NK::CondExpr, t);
      n->args.push_back(std::move(expr2));
      n->args.push_back(std::move(expr1));
      n->args.push_back(std::move(expr3));
      expr1 = std::move(n);
    }
    return expr1;
  }

  NodePtr binary(NK k, const Token& t, NodePtr a, NodePtr b) {
    auto n = node(k, t);
    n->args.push_back(std::move(a));
    n->args.push_back(std::move(b));
    return n;
  }

  NodePtr parse_or() {
    NodePtr left = parse_and();
    while (is_name("or")) {
      const Token& t = cur();
      ++i_;
      left = binary(NK::Or, t, std::move(left), parse_and());
    }
    return left;
  }
  NodePtr parse_and() {
    NodePtr left = parse_not();
    while (is_name("and")) {
      const Token& t = cur();
      ++i_;
      left = binary(NK::And, t, std::move(left), parse_not());
    }
    return left;
  }
  NodePtr parse_not() {
    Nest nest(*this);
    if (is_name("not")) {
      auto n = node(NK::Not, cur());
      ++i_;
      n->args.push_back(parse_not());
      return n;
    }
    return parse_compare();
  }
  NodePtr parse_compare() {
    const Token& t = cur();
    NodePtr expr = parse_math1();
    NodePtr cmp;
    while (true) {
      Op op;
      if (cur().type == TT::Operator && (cur().text == "==" || cur().text == "!=" || cur().text == "<" ||
                                         cur().text == ">" || cur().text == "<=" || cur().text == ">=")) {
        const std::string& s = cur().text;
        op = s == "==" ? Op::Eq : s == "!=" ? Op::Ne : s == "<" ? Op::Lt : s == ">" ? Op::Gt : s == "<=" ? Op::Le : Op::Ge;
        ++i_;
      } else if (is_name("in")) {
        op = Op::In;
        ++i_;
      } else if (is_name("not") && peek().type == TT::Name && peek().text == "in") {
        op = Op::NotIn;
        i_ += 2;
      } else {
        break;
      }
      if (!cmp) {
        cmp = node(NK::Compare, t);
        cmp->args.push_back(std::move(expr));
      }
      cmp->ops.push_back(op);
      cmp->args.push_back(parse_math1());
    }
    return cmp ? std::move(cmp) : std::move(expr);
  }
  NodePtr binop(Op op, const Token& t, NodePtr a, NodePtr b) {
    auto n = binary(NK::BinOp, t, std::move(a), std::move(b));
    n->op = op;
    return n;
  }
  NodePtr parse_math1() {
    NodePtr left = parse_concat();
    while (is_op("+") || is_op("-")) {
      const Token& t = cur();
      Op op = t.text == "+" ? Op::Add : Op::Sub;
      ++i_;
      left = binop(op, t, std::move(left), parse_concat());
    }
    return left;
  }
  NodePtr parse_concat() {
    const Token& t = cur();
    NodePtr first = parse_math2();
    if (!is_op("~")) return first;
    auto n = node(NK::Concat, t);
    n->args.push_back(std::move(first));
    while (skip_op("~")) n->args.push_back(parse_math2());
    return n;
  }
  NodePtr parse_math2() {
    NodePtr left = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const Token& t = cur();
      Op op = t.text == "*" ? Op::Mul : t.text == "/" ? Op::Div : t.text == "//" ? Op::FloorDiv : Op::Mod;
      ++i_;
      left = binop(op, t, std::move(left), parse_pow());
    }
    return left;
  }
  NodePtr parse_pow() {
    NodePtr left = parse_unary(true);
    while (is_op("**")) {
      const Token& t = cur();
      ++i_;
      left = binop(Op::Pow, t, std::move(left), parse_unary(true));
    }
    return left;
  }
  NodePtr parse_unary(bool with_filter) {
    Nest nest(*this);
    NodePtr n;
    if (is_op("-") || is_op("+")) {
      n = node(is_op("-") ? NK::Neg : NK::Pos, cur());
      ++i_;
      n->args.push_back(parse_unary(false));
    } else {
      n = parse_primary();
    }
    n = parse_postfix(std::move(n));
    if (with_filter) n = parse_filter_expr(std::move(n));
    return n;
  }
  NodePtr parse_primary() {
    const Token& t = cur();
    if (t.type == TT::Name) {
      ++i_;
      auto n = node(NK::Const, t);
      if (t.text == "true" || t.text == "True") n->value = Value(true);
      else if (t.text == "false" || t.text == "False") n->value = Value(false);
      else if (t.text == "none" || t.text == "None") n->value = Value();
      else {
        n->kind = NK::Name;
        n->name = t.text;
        n->sym = prog_.sym(t.text);
        n->value = Value::undefined("'" + t.text + "' is undefined");  // what a missing name evaluates to
      }
      return n;
    }
    if (t.type == TT::String) {
      std::string s;
      while (cur().type == TT::String) s += t_[i_++].text;
      auto n = node(NK::Const, t);
      n->value = Value(std::move(s));
      return n;
    }
    if (t.type == TT::Int || t.type == TT::Float) {
      ++i_;
      auto n = node(NK::Const, t);
      n->value = t.value;
      return n;
    }
    if (t.type == TT::Operator && t.text == "(") {
      ++i_;
      NodePtr n = parse_tuple(false, true, {}, true);
      expect_op(")");
      return n;
    }
    if (t.type == TT::Operator && t.text == "[") {
      ++i_;
      auto n = node(NK::ListLit, t);
      while (!is_op("]")) {
        if (!n->args.empty()) expect_op(",");
        if (is_op("]")) break;
        n->args.push_back(parse_expression(true));
      }
      expect_op("]");
      return n;
    }
    if (t.type == TT::Operator && t.text == "{") {
      ++i_;
      auto n = node(NK::DictLit, t);
      while (!is_op("}")) {
        if (!n->args.empty()) expect_op(",");
        if (is_op("}")) break;
        n->args.push_back(parse_expression(true));
        expect_op(":");
        n->args.push_back(parse_expression(true));
      }
      expect_op("}");
      return n;
    }
    fail(detail::concat("unexpected '", describe(t), "'"));
  }
  NodePtr parse_postfix(NodePtr n) {
    while (true) {
      if (is_op(".") || is_op("[")) n = parse_subscript(std::move(n));
      else if (is_op("(")) n = parse_call(std::move(n));
      else break;
    }
    return n;
  }
  NodePtr parse_filter_expr(NodePtr n) {
    while (true) {
      if (is_op("|")) n = parse_filter(std::move(n), false);
      else if (is_name("is")) n = parse_test(std::move(n));
      else if (is_op("(")) n = parse_call(std::move(n));
      else break;
    }
    return n;
  }
  NodePtr parse_subscript(NodePtr n) {
    const Token& t = cur();
    if (skip_op(".")) {
      if (cur().type == TT::Name) {
        auto g = node(NK::Getattr, t);
        g->name = t_[i_++].text;
        g->dict_method = is_dict_method(g->name);
        g->args.push_back(std::move(n));
        return g;
      }
      if (cur().type == TT::Int) {
        auto g = node(NK::Getitem, t);
        auto c = node(NK::Const, cur());
        c->value = cur().value;
        ++i_;
        g->args.push_back(std::move(n));
        g->args.push_back(std::move(c));
        return g;
      }
      fail("expected name or number");
    }
    expect_op("[");
    std::vector<NodePtr> args;
    while (!is_op("]")) {
      if (!args.empty()) expect_op(",");
      args.push_back(parse_subscribed());
    }
    expect_op("]");
    auto g = node(NK::Getitem, t);
    g->args.push_back(std::move(n));
    if (args.size() == 1) g->args.push_back(std::move(args[0]));
    else {
      auto tup = node(NK::TupleLit, t);
      tup->args = std::move(args);
      g->args.push_back(std::move(tup));
    }
    return g;
  }
  NodePtr parse_subscribed() {
    const Token& t = cur();
    std::vector<NodePtr> parts;
    if (skip_op(":")) {
      parts.push_back(nullptr);
    } else {
      NodePtr e = parse_expression(true);
      if (!skip_op(":")) return e;
      parts.push_back(std::move(e));
    }
    if (is_op(":")) parts.push_back(nullptr);
    else if (!is_op("]") && !is_op(",")) parts.push_back(parse_expression(true));
    else parts.push_back(nullptr);
    if (skip_op(":")) {
      if (!is_op("]") && !is_op(",")) parts.push_back(parse_expression(true));
      else parts.push_back(nullptr);
    } else {
      parts.push_back(nullptr);
    }
    auto s = node(NK::Slice, t);
    s->args = std::move(parts);
    return s;
  }
  // Call arguments into n->args (positional) and n->kwargs, where `*x` and
  // `**x` are the entries named "*" and "**" (no keyword can be): as jinja2,
  // positional arguments, then at most one *x among keywords, **x last.
  void parse_call_args(Node& n) {
    expect_op("(");
    bool need_comma = false, star = false, star_star = false;
    while (!is_op(")")) {
      if (need_comma) {
        expect_op(",");
        if (is_op(")")) break;
      }
      if (is_op("*") || is_op("**")) {
        bool dict = is_op("**");
        if (star_star || (!dict && star)) fail("invalid syntax for function call expression");
        ++i_;
        n.kwargs.emplace_back(dict ? "**" : "*", parse_expression(true));
        (dict ? star_star : star) = true;
      } else if (cur().type == TT::Name && peek().type == TT::Operator && peek().text == "=") {
        if (star_star) fail("invalid syntax for function call expression");
        std::string key = cur().text;
        i_ += 2;
        n.kwargs.emplace_back(key, parse_expression(true));
      } else {
        if (!n.kwargs.empty()) fail("invalid syntax for function call expression");
        n.args.push_back(parse_expression(true));
      }
      need_comma = true;
    }
    expect_op(")");
  }
  NodePtr parse_call(NodePtr callee) {
    auto n = std::make_unique<Node>(NK::Call, callee->line, callee->col);
    n->args.push_back(std::move(callee));
    parse_call_args(*n);
    return n;
  }
  NodePtr parse_filter(NodePtr n, bool start_inline) {
    while (is_op("|") || start_inline) {
      if (!start_inline) ++i_;
      start_inline = false;
      const Token& t = cur();
      std::string name = expect_name();
      while (is_op(".")) {
        ++i_;
        name += '.';
        name += expect_name();
      }
      auto f = node(NK::Filter, t);
      f->name = name;
      f->sym = filter_id(name);
      if (f->sym < 0 && soft_ == 0) unknown_.push_back({detail::concat("No filter named '", name, "'."), &t});
      f->args.push_back(std::move(n));  // may be nullptr inside filter blocks
      if (is_op("(")) parse_call_args(*f);
      n = std::move(f);
    }
    return n;
  }
  NodePtr parse_test(NodePtr n) {
    const Token& t = cur();
    ++i_;  // is
    bool negated = skip_name("not");
    std::string name = expect_name();
    while (is_op(".")) {
      ++i_;
      name += '.';
      name += expect_name();
    }
    auto test = node(NK::Test, t);
    test->name = name;
    test->sym = test_id(name);
    if (test->sym < 0 && soft_ == 0) unknown_.push_back({detail::concat("No test named '", name, "'."), &t});
    test->args.push_back(std::move(n));
    if (is_op("(")) {
      parse_call_args(*test);
    } else if ((cur().type == TT::Name || cur().type == TT::String || cur().type == TT::Int || cur().type == TT::Float ||
                is_op("(") || is_op("[") || is_op("{")) &&
               !(is_name("else") || is_name("or") || is_name("and"))) {
      if (is_name("is")) fail("You cannot chain multiple tests with is");
      NodePtr arg = parse_postfix(parse_primary());
      test->args.push_back(std::move(arg));
    }
    test->negated = negated;
    return test;
  }
};

}  // namespace

// The children of n (nullptr entries included), in order.
template <class Visit>
static void for_each_child(Node& n, Visit&& visit) {
  for (auto* v : {&n.args, &n.body, &n.orelse})
    for (auto& c : *v) visit(c);
  for (auto& kv : n.kwargs) visit(kv.second);
}

Node::~Node() {
  std::vector<NodePtr> doomed;  // the subtree, detached level by level
  for_each_child(*this, [&](NodePtr& c) {
    if (c) doomed.push_back(std::move(c));
  });
  while (!doomed.empty()) {
    NodePtr n = std::move(doomed.back());
    doomed.pop_back();
    for_each_child(*n, [&](NodePtr& c) {
      if (c) doomed.push_back(std::move(c));
    });
  }  // each node dies childless: no recursion
}

// Rejects a tree deeper than kMaxTemplateNesting (without recursing into it).
static void check_nesting(Node& root) {
  std::vector<std::pair<Node*, int>> todo{{&root, 1}};
  while (!todo.empty()) {
    Node* n = todo.back().first;
    int depth = todo.back().second;
    todo.pop_back();
    if (depth > kMaxTemplateNesting) raise("TemplateSyntaxError", nesting_message(), n->line, n->col);
    for_each_child(*n, [&](NodePtr& c) {
      if (c) todo.emplace_back(c.get(), depth + 1);
    });
  }
}

// Calls visit(node) for `n` and every node below it (at most kMaxTemplateNesting deep).
template <class Visit>
static void for_each_node(const Node& n, Visit&& visit) {
  visit(n);
  for (auto* v : {&n.args, &n.body, &n.orelse})
    for (auto& c : *v)
      if (c) for_each_node(*c, visit);
  for (auto& kv : n.kwargs)
    if (kv.second) for_each_node(*kv.second, visit);
}

Program::~Program() {
  if (!root) return;
  std::vector<const Value*> values;
  for_each_node(*root, [&](const Node& n) { values.push_back(&n.value); });
  make_mortal(values);  // the nodes' destruction then frees them
}

// Constants are read by every thread that renders the template: never
// counted (until ~Program). Notes whether closures exist.
static void seal(Program& prog) {
  for_each_node(*prog.root, [&](const Node& n) {
    n.value.make_immortal();
    if (n.kind == NK::Macro || n.kind == NK::CallBlock) prog.has_macros = true;
  });
}

std::shared_ptr<Program> compile_template(std::string_view source) {
  auto prog = std::make_shared<Program>();
  prog->sym("caller");  // renders never add symbols: a compiled template is shared by threads
  Lexer lex(source);
  Parser parser(lex.run(), *prog);
  prog->root = parser.parse_template();
  check_nesting(*prog->root);
  seal(*prog);
  prog->finish();
  return prog;
}

}  // namespace qforge::chat
