// Device helpers of the layer kernels: fp32 / fp16 / bf16 elements moved as
// floats, N at a time, in 16-byte accesses where N elements fill whole
// 16-byte words (the caller guarantees 16-byte alignment then).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "core/cuda_check.cuh"
#include "core/float_cuda.cuh"
#include "qforge/cuda_runtime.hpp"
#include "qforge/dtype.hpp"

namespace qforge::layer {

// v rounded to T and back.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* p, float (&f)[N]) {
  constexpr int kBytes = N * int(sizeof(T));
  if constexpr (kBytes % 16 == 0) {
    constexpr int kPerWord = 16 / int(sizeof(T));
#pragma unroll
    for (int c = 0; c < kBytes / 16; ++c) {
      const uint4 raw = reinterpret_cast<const uint4*>(p)[c];
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < kPerWord; ++k) f[c * kPerWord + k] = to_float(e[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) f[k] = to_float(p[k]);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_floats(T* p, const float (&f)[N]) {
  constexpr int kBytes = N * int(sizeof(T));
  if constexpr (kBytes % 16 == 0) {
    constexpr int kPerWord = 16 / int(sizeof(T));
#pragma unroll
    for (int c = 0; c < kBytes / 16; ++c) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int k = 0; k < kPerWord; ++k) e[k] = from_float<T>(f[c * kPerWord + k]);
      reinterpret_cast<uint4*>(p)[c] = raw;
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) p[k] = from_float<T>(f[k]);
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// A grid of at most `cap` blocks covering `work` blocks' worth of items (the
// kernels stride over the rest).
inline int grid_for(int64_t work, int64_t cap = int64_t{1} << 30) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(work, cap)));
}

// Calls f(T{}) with T the CUDA type of d.
template <class F>
void with_float_type(DType d, F&& f) {
  switch (d) {
    case DType::F16: return f(__half{});
    case DType::BF16: return f(__nv_bfloat16{});
    default: return f(float{});
  }
}

}  // namespace qforge::layer
