// Errors inside the C++ core. Every public C++ function reports bad input by
// throwing qforge::InvalidArgument; the C ABI (src/capi) catches everything
// and turns it into a status code plus qf_last_error(), so no exception ever
// crosses the ABI.
#pragma once
#include <stdexcept>
#include <string>
#include <sstream>

namespace qforge {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// The caller passed something wrong: a size, dtype, blocksize, a malformed file.
struct InvalidArgument : Error {
  using Error::Error;
};
// Something outside the caller's control failed: CUDA, cuBLAS, the OS.
struct RuntimeFailure : Error {
  using Error::Error;
};

namespace detail {
template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream s;
  (s << ... << args);
  return s.str();
}
}  // namespace detail

// QF_CHECK(cond, "message", values...) throws InvalidArgument naming the problem.
#define QF_CHECK(cond, ...)                                                  \
  do {                                                                       \
    if (!(cond)) throw ::qforge::InvalidArgument(::qforge::detail::concat(__VA_ARGS__)); \
  } while (0)

}  // namespace qforge
