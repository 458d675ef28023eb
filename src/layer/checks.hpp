// Argument checks shared by the layer kernels' entry points (qforge/layer.hpp).
#pragma once
#include <cstdint>
#include <initializer_list>

#include "qforge/error.hpp"

namespace qforge::layer {

// The product of sizes (each >= 0), refused when it would overflow int64.
inline int64_t checked_numel(const char* op, std::initializer_list<int64_t> sizes) {
  int64_t n = 1;
  for (int64_t s : sizes) {
    QF_CHECK(s >= 0, op, ": sizes must be >= 0, got ", s);
    QF_CHECK(!__builtin_mul_overflow(n, s, &n), op, ": the tensor's element count overflows int64");
  }
  return n;
}

// An output may be exactly an input's buffer (in place) or apart from it;
// a partial overlap would let one thread read what another already wrote.
inline void check_alias(const char* op, const char* out_name, const void* out, const char* in_name,
                        const void* in, int64_t bytes) {
  if (out == in || bytes == 0) return;
  const auto o = reinterpret_cast<uintptr_t>(out), i = reinterpret_cast<uintptr_t>(in);
  const auto b = static_cast<uintptr_t>(bytes);
  QF_CHECK(o + b <= i || i + b <= o, op, ": ", out_name, " partially overlaps ", in_name,
           " (an output must be the very same buffer as an input, or apart from it)");
}

}  // namespace qforge::layer
