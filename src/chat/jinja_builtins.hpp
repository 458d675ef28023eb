// Private: what the builtins (filters, tests, methods, globals: one file
// each) share: Python's text operations, argument readers and formatting.
#pragma once
#include <string>
#include <string_view>
#include <vector>

#include "jinja_rt.hpp"

namespace qforge::chat::builtins {

uint32_t cp_upper(uint32_t c);
uint32_t cp_lower(uint32_t c);
bool cp_isupper(uint32_t c);
bool cp_islower(uint32_t c);
bool cp_isalpha(uint32_t c);
bool cp_isdigit(uint32_t c);
std::string map_cps(const std::string& s, uint32_t (*fn)(uint32_t));
std::string upper(const std::string& s);
std::string lower(const std::string& s);
std::string encode(const std::vector<uint32_t>& cps, size_t a, size_t b);
std::string_view strip(std::string_view s, const Value* chars, bool left, bool right);
Value strip_value(const Value& v, std::string_view s, const Value* chars, bool left, bool right);
List split_ws(const std::string& s, int64_t maxsplit, bool from_right);
List split_sep(const std::string& s, const std::string& sep, int64_t maxsplit, bool from_right);
std::string replace(const std::string& s, const std::string& old, const std::string& rep, int64_t count);
bool hashable(const Value& v);
uint64_t py_hash(const Value& v);
List splitlines(const std::string& s, bool keepends);
int64_t cp_index(const std::string& s, size_t byte_off);
std::string as_text(const Value& v);
const Value* arg(Args& a, size_t i, const char* name);
bool arg_bool(Args& a, size_t i, const char* name, bool dflt);
int64_t arg_int(Interp& in, Args& a, size_t i, const char* name, int64_t dflt, const Node& at);
const std::string& arg_str(Interp& in, Args& a, size_t i, const char* name, const Node& at);
Value attr_path(Interp& in, const Value& item, const std::string& path, const Node& at);
bool py_int_from_string(Interp& in, std::string_view s, int64_t base, int64_t& out, const Node& at);
Value attr_value(Interp& in, const Value& item, const Value& attribute, const Node& at);
Value sort_key(const Value& v, bool case_sensitive);
void sort_values(Interp& in, List& l, const Node& at, bool reverse, bool case_sensitive, const std::string* attribute);
int64_t float_to_int(Interp& in, double d, const Node& at);
std::string percent_format(Interp& in, const std::string& fmt, const Value& rhs, const Node& at);
std::string str_format(Interp& in, const std::string& fmt, Args& args, const Node& at, bool escape = false);
void check_replace(Interp& in, const std::string& s, const std::string& old, const std::string& rep, int64_t count,
                   const Node& at);

}  // namespace qforge::chat::builtins
