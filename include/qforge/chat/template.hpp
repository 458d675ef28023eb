// A Jinja engine that renders Hugging Face chat templates exactly as
// transformers does: jinja2's ImmutableSandboxedEnvironment with trim_blocks,
// lstrip_blocks and loop controls, transformers' tojson / raise_exception /
// strftime_now / dict / namespace globals and the {% generation %} block.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "qforge/chat/value.hpp"
#include "qforge/error.hpp"

namespace qforge::chat {

// A template that failed to compile or render. `kind` is the jinja2/Python
// exception class it corresponds to (TemplateSyntaxError, TemplateError for
// raise_exception, UndefinedError, SecurityError, TypeError, ...), `message`
// its text as Python would print it, and line/column where it happened
// (1-based; 0 when unknown). what() = "Kind: message (line L:C)".
struct TemplateError : InvalidArgument {
  TemplateError(std::string kind, std::string message, int line, int column);
  std::string kind, message;
  int line, column;
};

struct RenderLimits {
  size_t max_output_bytes = size_t(64) << 20;
  int max_call_depth = 200;          // macro calls + nested blocks
  int64_t max_loop_iterations = 10'000'000;  // summed over the whole render
};

struct RenderCache;  // memoised tojson of shared values across renders (private)

struct RenderOptions {
  // Seconds since the epoch (UTC) that strftime_now() formats; < 0: now,
  // local time, as Python's datetime.now().
  int64_t now = -1;
  RenderLimits limits;
  // Set by the batch renderers (apply_chat_template_batch*): tojson of the
  // values the batch shares, kept across its renders on one thread.
  RenderCache* cache = nullptr;
  size_t reserve = 0;  // expected output size (bytes), to size the buffer once
};

struct RenderResult {
  std::string text;
  // [start, end) byte offsets of each {% generation %} block's output.
  std::vector<std::pair<size_t, size_t>> generation;
};

struct Program;  // the compiled template (private)

class Template {
 public:
  // Compiles; throws TemplateError (kind TemplateSyntaxError) with line:column.
  explicit Template(std::string_view source);
  // `context` is a dict of the variables the template sees.
  std::string render(const Value& context, const RenderOptions& opt = {}) const;
  RenderResult render_tracked(const Value& context, const RenderOptions& opt = {}) const;
  const std::string& source() const { return source_; }

 private:
  std::shared_ptr<const Program> program_;
  std::string source_;
};

}  // namespace qforge::chat
