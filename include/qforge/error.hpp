// Errors inside the C++ core. Every public C++ function reports bad input by
// throwing qforge::InvalidArgument; the C ABI (src/capi) catches everything
// and turns it into a status code plus qf_last_error(), so no exception ever
// crosses the ABI.
#pragma once
#include "qforge/export.hpp"
#include <cstdio>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

namespace qforge {

struct QFORGE_API Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// The caller passed something wrong: a size, dtype, blocksize, a malformed file.
struct QFORGE_API InvalidArgument : Error {
  using Error::Error;
};
// Something outside the caller's control failed: CUDA, cuBLAS, the OS.
struct QFORGE_API RuntimeFailure : Error {
  using Error::Error;
};

namespace detail {
// Messages are built without iostreams: a std::ostringstream formats numbers
// through the global locale's facets, and in a process where another C++
// runtime set that locale up (PyTorch's, on the GPU machines) inserting an
// integer crashed inside libstdc++ (SIGSEGV in num_put), turning every
// "got 20" error into a crash.
template <class T>
void append(std::string& s, const T& v) {
  if constexpr (std::is_convertible_v<const T&, const char*>) {
    const char* p = v;
    s += p ? p : "(null)";
  } else if constexpr (std::is_convertible_v<const T&, std::string_view>) {
    s += std::string_view(v);
  } else if constexpr (std::is_same_v<T, char>) {
    s += v;
  } else if constexpr (std::is_same_v<T, bool>) {
    s += v ? "1" : "0";
  } else if constexpr (std::is_integral_v<T>) {
    s += std::to_string(v);
  } else if constexpr (std::is_enum_v<T>) {
    s += std::to_string(static_cast<std::underlying_type_t<T>>(v));
  } else if constexpr (std::is_floating_point_v<T>) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g", static_cast<double>(v));  // what operator<< prints
    s += buf;
  } else {
    static_assert(std::is_arithmetic_v<T>, "QF_CHECK / concat: no text form for this type");
  }
}

template <class... Args>
std::string concat(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}
}  // namespace detail

// QF_CHECK(cond, "message", values...) throws InvalidArgument naming the problem.
#define QF_CHECK(cond, ...)                                                  \
  do {                                                                       \
    if (!(cond)) throw ::qforge::InvalidArgument(::qforge::detail::concat(__VA_ARGS__)); \
  } while (0)

}  // namespace qforge
