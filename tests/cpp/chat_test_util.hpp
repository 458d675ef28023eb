// Helpers shared by the chat GoogleTest files.
#pragma once
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace chat_test {

// tests/chat/: templates, conversations.json, goldens/
inline std::filesystem::path chat_dir() { return std::filesystem::path(__FILE__).parent_path().parent_path() / "chat"; }

inline std::string slurp(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

}  // namespace chat_test
