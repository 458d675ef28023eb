// gpt-oss harmony: messages [<|start|>assistant][ to=RECIPIENT]<|channel|>CHANNEL[ json]<|message|>BODY
// ended by <|end|>, <|call|> or <|return|>. A message to functions.NAME is a
// call (BODY: JSON arguments); the analysis channel is reasoning; final and
// commentary text is content.
#include "tool_calls_internal.hpp"

namespace qforge::chat::tool_calls_detail {

void parse_harmony(std::string_view text, ParsedToolCalls& r) {
  const std::string_view msg = "<|message|>", start = "<|start|>assistant", channel_tag = "<|channel|>";
  if (text.find(msg) == std::string_view::npos) return set_content(r, text);
  std::string content, reasoning;
  const std::string_view ends[] = {"<|end|>", "<|call|>", "<|return|>"};
  size_t next_end[] = {0, 0, 0};  // where each end token next occurs (searched again only once passed)
  bool searched[] = {false, false, false};
  size_t pos = 0;
  while (pos < text.size()) {
    size_t m = text.find(msg, pos);
    if (m == std::string_view::npos) {
      content.append(text.substr(pos));  // text after the last message
      break;
    }
    std::string_view header = text.substr(pos, m - pos);
    size_t s = header.find(start);
    if (s != std::string_view::npos) header = header.substr(s + start.size());
    size_t body_start = m + msg.size(), body_end = text.size(), next = text.size();
    for (int k = 0; k < 3; ++k) {
      if (!searched[k] || (next_end[k] != std::string_view::npos && next_end[k] < body_start)) {
        next_end[k] = text.find(ends[k], body_start);
        searched[k] = true;
      }
      if (next_end[k] < body_end) {
        body_end = next_end[k];
        next = next_end[k] + ends[k].size();
      }
    }
    std::string_view body = text.substr(body_start, body_end - body_start);
    std::string recipient, channel;
    if (size_t to = header.find("to="); to != std::string_view::npos) {
      size_t e = to + 3;
      while (e < header.size() && !is_ws(header[e]) && header[e] != '<') ++e;
      recipient = std::string(header.substr(to + 3, e - to - 3));
    }
    if (size_t c = header.find(channel_tag); c != std::string_view::npos) {
      size_t e = c + channel_tag.size();
      while (e < header.size() && !is_ws(header[e]) && header[e] != '<') ++e;
      channel = std::string(header.substr(c + channel_tag.size(), e - c - channel_tag.size()));
    }
    if (starts_with(recipient, "functions.")) {
      Value args;
      std::string error;
      if (!load_json(trim(body), args, error)) return fail(r, "malformed JSON arguments of '" + recipient + "': " + error);
      if (!args.is_dict()) return fail(r, "the arguments of '" + recipient + "' are not a JSON object");
      r.tool_calls.push_back(make_call(Value(recipient.substr(10)), std::move(args)));
    } else if (channel == "analysis") {
      reasoning.append(body);
    } else {
      content.append(body);
    }
    pos = next;
  }
  set_content(r, content);
  std::string_view t = trim(reasoning);
  if (!t.empty()) r.reasoning_content = Value(t);
}

}  // namespace qforge::chat::tool_calls_detail
