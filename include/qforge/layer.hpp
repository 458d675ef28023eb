// Fused kernels of a transformer decoder layer: RMSNorm, SwiGLU and rotary
// position embeddings (RoPE), forward and backward: the C++ API (the C ABI's
// qf_rms_norm_*, qf_swiglu_* and qf_rope translate to it). Each is
// memory-bound and makes one pass over its tensors where eager PyTorch makes
// several; all arithmetic is fp32, inputs and outputs are fp32, fp16 or bf16.
//
// Every function checks its arguments first and throws InvalidArgument
// naming the problem; then it runs the CPU twin (which defines the result)
// or the CUDA kernel on `stream`. Outputs may be the very buffer of an input
// of the same size (in place), never a partial overlap. docs/layer_kernels.md
// gives the formulas and the rounding points.
#pragma once
#include <cstdint>

#include "qforge/dtype.hpp"
#include "qforge/export.hpp"

namespace qforge::layer {

using qforge::Device;
using qforge::DType;

// ------------------------------------------------------------------ RMSNorm
// x, y: [rows, dim] of x_dtype; weight: [dim] of x_dtype or fp32; rstd: [rows] fp32.
//   rstd[r] = 1 / sqrt(mean_j(x[r,j]^2) + eps)
//   y[r,j]  = round(weight[j] * round(x[r,j] * rstd[r]))
// round() is to x_dtype: Hugging Face's LlamaRMSNorm casts the normalized row
// back to the input dtype before multiplying by the weight.
struct QFORGE_API RmsNormArgs {
  const void* x = nullptr;
  DType x_dtype = DType::F32;
  const void* weight = nullptr;
  DType weight_dtype = DType::F32;
  int64_t rows = 0;
  int64_t dim = 0;
};

QFORGE_API void rms_norm_forward(Device device, const RmsNormArgs& a, float eps, void* y, float* rstd,
                                 void* stream);

// dx = d y / d x given dy (like x) and the forward's rstd, weight frozen:
//   g = dy * weight, xhat = x * rstd
//   dx = rstd * (g - xhat * mean_j(g * xhat))      (fp32, rounded once)
QFORGE_API void rms_norm_backward(Device device, const RmsNormArgs& a, const void* dy, const float* rstd,
                                  void* dx, void* stream);

// ------------------------------------------------------------------- SwiGLU
// gate, up, out: n elements of dtype.
//   out = round(round(silu(gate)) * up),  silu(g) = g / (1 + exp(-g))
// (the two roundings of eager `F.silu(gate) * up` in fp16/bf16).
QFORGE_API void swiglu_forward(Device device, const void* gate, const void* up, DType dtype, int64_t n,
                               void* out, void* stream);

// dgate = dout * up * silu'(gate), dup = dout * silu(gate) (fp32, rounded once).
// dgate may be gate's (or dout's) buffer and dup up's: the in-place backward.
QFORGE_API void swiglu_backward(Device device, const void* dout, const void* gate, const void* up,
                                DType dtype, int64_t n, void* dgate, void* dup, void* stream);

// --------------------------------------------------------------------- RoPE
// x, out: [batch, seq, heads, head_dim] of dtype (out may be x: in place);
// cos, sin: [cos_batch, seq, head_dim] of dtype or fp32, cos_batch 1 (shared
// by every batch row) or batch. With h = head_dim / 2 and i < h, Hugging
// Face's x * cos + rotate_half(x) * sin:
//   out[i]     = x[i] * cos[i]     - x[i + h] * sin[i]
//   out[i + h] = x[i + h] * cos[i + h] + x[i] * sin[i + h]
// backward = true applies the transpose (the gradient of the above):
//   dx[i]     = dy[i] * cos[i]     + dy[i + h] * sin[i + h]
//   dx[i + h] = dy[i + h] * cos[i + h] - dy[i] * sin[i]
struct QFORGE_API RopeArgs {
  const void* x = nullptr;
  void* out = nullptr;
  DType dtype = DType::F32;
  int64_t batch = 0, seq = 0, heads = 0, head_dim = 0;
  const void* cos = nullptr;
  const void* sin = nullptr;
  DType cos_dtype = DType::F32;
  int64_t cos_batch = 1;
};

QFORGE_API void rope(Device device, const RopeArgs& a, bool backward, void* stream);

// CPU twins (the definition of each result) and CUDA kernels, arguments
// already checked; the CUDA ones throw when the build has no CUDA.
QFORGE_API void rms_norm_forward_cpu(const RmsNormArgs& a, float eps, void* y, float* rstd);
QFORGE_API void rms_norm_backward_cpu(const RmsNormArgs& a, const void* dy, const float* rstd, void* dx);
QFORGE_API void swiglu_forward_cpu(const void* gate, const void* up, DType dtype, int64_t n, void* out);
QFORGE_API void swiglu_backward_cpu(const void* dout, const void* gate, const void* up, DType dtype, int64_t n,
                                    void* dgate, void* dup);
QFORGE_API void rope_cpu(const RopeArgs& a, bool backward);

QFORGE_API void rms_norm_forward_cuda(const RmsNormArgs& a, float eps, void* y, float* rstd, void* stream);
QFORGE_API void rms_norm_backward_cuda(const RmsNormArgs& a, const void* dy, const float* rstd, void* dx,
                                       void* stream);
QFORGE_API void swiglu_forward_cuda(const void* gate, const void* up, DType dtype, int64_t n, void* out,
                                    void* stream);
QFORGE_API void swiglu_backward_cuda(const void* dout, const void* gate, const void* up, DType dtype, int64_t n,
                                     void* dgate, void* dup, void* stream);
QFORGE_API void rope_cuda(const RopeArgs& a, bool backward, void* stream);

}  // namespace qforge::layer
