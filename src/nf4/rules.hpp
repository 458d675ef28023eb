// The per-element rules of bitsandbytes' 4-bit and 8-bit blockwise formats,
// written once and compiled for both the CPU twin (nf4.cpp) and the CUDA
// kernels (nf4.cu), so the two cannot drift apart.
#pragma once
#include <cstdint>

#include "core/host_device.hpp"

namespace qforge::nf4 {

// The decision thresholds of bitsandbytes' dQuantizeNF4: the midpoints between
// adjacent NF4 levels, computed in double precision and written as float
// literals (so not always the fp32 midpoint of the fp32 levels).
QF_HOST_DEVICE float nf4_midpoint(int i) {
  constexpr float kMidpoints[15] = {
      -0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f,
      -0.33967943489551544f, -0.23460740596055984f, -0.13791173323988914f,
      -0.045525018125772476f, 0.03979014977812767f, 0.1202552504837513f,
      0.2035212516784668f, 0.2920137718319893f, 0.3893125355243683f,
      0.5016634166240692f, 0.6427869200706482f, 0.8614784181118011f};
  return kMidpoints[i];
}

// Index of the NF4 level nearest to x in [-1, 1]: the number of thresholds
// that x lies strictly above (ties go to the lower level; NaN, which compares
// false, gives level 0), as bitsandbytes' dQuantizeNF4 decision tree does.
QF_HOST_DEVICE uint8_t nf4_level(float x) {
  uint8_t level = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int i = 0; i < 15; ++i) level += (x > nf4_midpoint(i)) ? 1 : 0;
  return level;
}

// bitsandbytes' dQuantize<0>: binary search of x in a sorted 256-entry code,
// then round to the nearer neighbour by the midpoint (strict comparisons).
QF_HOST_DEVICE uint8_t code8_index(const float* code, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = code[pivot];
  for (int step = 64; step > 0; step >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += step;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= step;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > val) {
    const float midpoint = (upper + val) * 0.5f;
    return static_cast<uint8_t>(x > midpoint ? upper_pivot : pivot);
  }
  const float midpoint = (lower + val) * 0.5f;
  return static_cast<uint8_t>(x < midpoint ? lower_pivot : pivot);
}

// The absmax of a double-quantized block: the multiply and the add round
// separately (bitsandbytes runs them as two kernels); the build forbids FMA
// contraction (-ffp-contract=off, --fmad=false) to keep it so.
QF_HOST_DEVICE float nested_absmax_value(const float* nested_code, uint8_t q, float nested_absmax,
                                         float offset) {
  const float scaled = nested_code[q] * nested_absmax;
  return scaled + offset;
}

}  // namespace qforge::nf4
