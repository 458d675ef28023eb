// The per-element arithmetic of the layer kernels, written once for the CPU
// twins (*.cpp) and the CUDA kernels (*.cu). All of it is fp32; the callers
// load inputs as floats and round outputs to their storage dtype. The build
// forbids FMA contraction, so both sides round every product alike; sqrtf and
// the division are correctly rounded on both. expf is not (glibc's and CUDA's
// may differ by an ulp), so SwiGLU's twin and kernel agree to rounding.
#pragma once
#include <math.h>

#include <cstdint>

#include "core/host_device.hpp"

namespace qforge::layer {

// 1 / sqrt(mean of squares + eps) of a row of `dim` values.
QF_HOST_DEVICE float rms_inverse(float sum_squares, int64_t dim, float eps) {
  return 1.0f / sqrtf(sum_squares / static_cast<float>(dim) + eps);
}

// d x of RMSNorm for one element: g = dy * weight, xhat = x * rstd and
// mean_g_xhat = mean over the row of g * xhat.
QF_HOST_DEVICE float rms_norm_dx(float g, float xhat, float rstd, float mean_g_xhat) {
  return rstd * (g - xhat * mean_g_xhat);
}

// silu(g) = g / (1 + exp(-g)), PyTorch's formula.
QF_HOST_DEVICE float silu(float g) { return g / (1.0f + expf(-g)); }

// The gradients of out = silu(gate) * up given d out.
QF_HOST_DEVICE void swiglu_grads(float gate, float up, float dout, float& dgate, float& dup) {
  const float one_plus_e = 1.0f + expf(-gate);
  const float sig = 1.0f / one_plus_e;
  dup = dout * (gate / one_plus_e);
  dgate = dout * up * (sig * (1.0f + gate * (1.0f - sig)));
}

// One rotated pair (x1 = x[i], x2 = x[i + h]) with c1, s1 = cos, sin[i] and
// c2, s2 = cos, sin[i + h]; the backward applies the transpose rotation.
QF_HOST_DEVICE void rope_pair(float x1, float x2, float c1, float s1, float c2, float s2,
                              bool backward, float& o1, float& o2) {
  if (backward) {
    o1 = x1 * c1 + x2 * s2;
    o2 = x2 * c2 - x1 * s1;
  } else {
    o1 = x1 * c1 - x2 * s1;
    o2 = x2 * c2 + x1 * s2;
  }
}

}  // namespace qforge::layer
