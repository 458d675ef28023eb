// Uses the installed library through both of its APIs: the C++ chat engine
// (qforge::chat) and the C ABI (qforge.h). Prints what they returned; exits
// nonzero when either disagrees with what it must return.
#include <cstdio>
#include <string>

#include "qforge/chat/apply.hpp"
#include "qforge/chat/template.hpp"
#include "qforge/qforge.h"

int main() {
  using namespace qforge::chat;
  Template tmpl("{% for m in messages %}<{{ m.role }}>{{ m.content | upper }}{% endfor %}");
  ChatRequest req;
  req.messages = json_loads(R"([{"role": "user", "content": "hi"}])");
  const std::string text = apply_chat_template(tmpl, req).text;
  std::printf("chat: %s\n", text.c_str());

  const int64_t packed = qf_nf4_packed_bytes(7);
  std::printf("qf_nf4_packed_bytes(7): %lld\n", static_cast<long long>(packed));
  std::printf("qf_version: %s\n", qf_version());

  bool caught = false;
  try {
    Template broken("{% if %}");
  } catch (const TemplateError& e) {  // the exception's type crosses the library boundary
    caught = e.kind == "TemplateSyntaxError";
  }
  std::printf("TemplateError caught: %d\n", caught ? 1 : 0);
  return text == "<user>HI" && packed == 4 && caught ? 0 : 1;
}
