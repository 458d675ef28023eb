// A Jinja engine that renders Hugging Face chat templates exactly as
// transformers does: jinja2's ImmutableSandboxedEnvironment with trim_blocks,
// lstrip_blocks and loop controls, transformers' tojson / raise_exception /
// strftime_now / dict / namespace globals and the {% generation %} block.
#pragma once
#include "qforge/export.hpp"
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
struct QFORGE_API TemplateError : InvalidArgument {
  TemplateError(std::string kind, std::string message, int line, int column);
  std::string kind, message;
  int line, column;
};

// What one render may use; reaching a limit raises TemplateError whose kind
// and message name it (docs/chat.md, "Limits"). The defaults render every
// real chat template with room to spare.
struct QFORGE_API RenderLimits {
  // Time: loop iterations, calls (macros, filters, methods, functions), the
  // items a filter or method walks (sort, unique, join, ...), a step per 64
  // bytes of string read or built by filters, methods, `in`, `~`, `+` and
  // indexing, a step per 64 keys a big dict lookup scans; summed over the
  // render. Kind "StepLimit".
  int64_t max_steps = 10'000'000;
  // Memory: the rendered text, and any one string or list (16 bytes an item)
  // the template builds, including widths and precisions asked of
  // center/indent/%-formatting/... Kind "OutputLimit".
  size_t max_output_bytes = size_t(64) << 20;
  // Nested macro calls and blocks (for, set blocks). Kind "RecursionError".
  int max_call_depth = 200;
  // Native stack the nested macro calls of one render may use (each call
  // checks it), so deep recursion stops cleanly on any thread whose stack is
  // larger. Kind "RecursionError".
  size_t max_stack_bytes = size_t(2) << 20;
};

struct RenderCache;  // memoised tojson of shared values across renders (private)

struct QFORGE_API RenderOptions {
  // Seconds since the epoch (UTC) that strftime_now() formats; < 0: now,
  // local time, as Python's datetime.now().
  int64_t now = -1;
  RenderLimits limits;
  // Set by the batch renderers (apply_chat_template_batch*): tojson of the
  // values the batch shares, kept across its renders on one thread.
  RenderCache* cache = nullptr;
  size_t reserve = 0;  // expected output size (bytes), to size the buffer once
};

struct QFORGE_API RenderResult {
  std::string text;
  // [start, end) byte offsets of each {% generation %} block's output.
  std::vector<std::pair<size_t, size_t>> generation;
};

struct Program;  // the compiled template (private)

class QFORGE_API Template {
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
