// Argument checks shared by the layer kernels' entry points (layer.hpp).
#pragma once
#include <cstdint>
#include <initializer_list>

#include "core/dtype_name.hpp"
#include "qforge/error.hpp"
#include "qforge/qforge.h"

namespace qforge::layer {

inline int64_t dtype_bytes(qf_dtype d) { return d == QF_FLOAT32 ? 4 : 2; }

inline void check_float_dtype(const char* op, const char* what, qf_dtype d) {
  QF_CHECK(d == QF_FLOAT32 || d == QF_FLOAT16 || d == QF_BFLOAT16, op, ": ", what,
           " must be float32, float16 or bfloat16, got ", dtype_name(d));
}

inline void check_device(const char* op, qf_device device) {
  QF_CHECK(device == QF_CPU || device == QF_CUDA, op, ": unknown device ", static_cast<int>(device));
}

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
