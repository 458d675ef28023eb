// Element i of an fp32 / fp16 / bf16 buffer read as, or written from, a float
// on the CPU (round to nearest even, as the CUDA conversions do).
#pragma once
#include <cstdint>

#include "core/half.hpp"
#include "qforge/dtype.hpp"
#include "qforge/qforge.h"

namespace qforge {

inline float load_float(const void* x, qf_dtype dtype, int64_t i) {
  switch (dtype) {
    case QF_FLOAT16: return half_to_float(static_cast<const uint16_t*>(x)[i]);
    case QF_BFLOAT16: return bf16_to_float(static_cast<const uint16_t*>(x)[i]);
    default: return static_cast<const float*>(x)[i];
  }
}

inline void store_float(void* x, qf_dtype dtype, int64_t i, float v) {
  switch (dtype) {
    case QF_FLOAT16: static_cast<uint16_t*>(x)[i] = float_to_half(v); break;
    case QF_BFLOAT16: static_cast<uint16_t*>(x)[i] = float_to_bf16(v); break;
    default: static_cast<float*>(x)[i] = v;
  }
}

// v rounded to dtype and back: the value a store then a load would give.
inline float round_to(qf_dtype dtype, float v) {
  switch (dtype) {
    case QF_FLOAT16: return half_to_float(float_to_half(v));
    case QF_BFLOAT16: return bf16_to_float(float_to_bf16(v));
    default: return v;
  }
}

// The same for the core's DType (whose values are qf_dtype's).
inline float load_float(const void* x, DType dtype, int64_t i) {
  return load_float(x, static_cast<qf_dtype>(dtype), i);
}
inline void store_float(void* x, DType dtype, int64_t i, float v) {
  store_float(x, static_cast<qf_dtype>(dtype), i, v);
}

}  // namespace qforge
