// Element i of an fp32 / fp16 / bf16 buffer read as, or written from, a float
// on the CPU (round to nearest even, as the CUDA conversions do).
#pragma once
#include <cstdint>

#include "core/half.hpp"
#include "qforge/dtype.hpp"

namespace qforge {

inline float load_float(const void* x, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::F16: return half_to_float(static_cast<const uint16_t*>(x)[i]);
    case DType::BF16: return bf16_to_float(static_cast<const uint16_t*>(x)[i]);
    default: return static_cast<const float*>(x)[i];
  }
}

inline void store_float(void* x, DType dtype, int64_t i, float v) {
  switch (dtype) {
    case DType::F16: static_cast<uint16_t*>(x)[i] = float_to_half(v); break;
    case DType::BF16: static_cast<uint16_t*>(x)[i] = float_to_bf16(v); break;
    default: static_cast<float*>(x)[i] = v;
  }
}

// v rounded to dtype and back: the value a store then a load would give.
inline float round_to(DType dtype, float v) {
  switch (dtype) {
    case DType::F16: return half_to_float(float_to_half(v));
    case DType::BF16: return bf16_to_float(float_to_bf16(v));
    default: return v;
  }
}

}  // namespace qforge
