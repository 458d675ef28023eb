// Rotary position embeddings: argument checks, the CPU twin of rope.cu, and
// dispatch.
#include "core/float_io.hpp"
#include "layer/checks.hpp"
#include "layer/rules.hpp"
#include "qforge/cuda_runtime.hpp"
#include "qforge/layer.hpp"

namespace qforge::layer {

void rope(Device device, const RopeArgs& a, bool backward, void* stream) {
  const char* op = backward ? "rope_backward" : "rope_forward";
  QF_CHECK(a.cos_dtype == a.dtype || a.cos_dtype == DType::F32, op, ": cos and sin must be ",
           dtype_name(a.dtype), " (as x) or float32, got ", dtype_name(a.cos_dtype));
  QF_CHECK(a.head_dim > 0 && a.head_dim % 2 == 0, op,
           ": head_dim must be even and > 0 (rotate_half splits it in two), got ", a.head_dim);
  QF_CHECK(a.cos_batch == 1 || a.cos_batch == a.batch, op, ": cos/sin have batch ", a.cos_batch,
           " but x has batch ", a.batch, " (expected 1 or ", a.batch, ")");
  const int64_t n = checked_numel(op, {a.batch, a.seq, a.heads, a.head_dim, dtype_size(a.dtype)}) /
                    dtype_size(a.dtype);
  if (n == 0) return;
  QF_CHECK(a.x && a.out && a.cos && a.sin, op, ": null x, out, cos or sin");
  check_alias(op, "out", a.out, "x", a.x, n * dtype_size(a.dtype));
  if (device == Device::CUDA) return rope_cuda(a, backward, stream);
  rope_cpu(a, backward);
}

void rope_cpu(const RopeArgs& a, bool backward) {
  const int64_t half = a.head_dim / 2;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < a.batch; ++b) {
    for (int64_t t = 0; t < a.seq; ++t) {
      const int64_t cs = ((a.cos_batch == 1 ? 0 : b) * a.seq + t) * a.head_dim;
      for (int64_t h = 0; h < a.heads; ++h) {
        const int64_t base = ((b * a.seq + t) * a.heads + h) * a.head_dim;
        for (int64_t i = 0; i < half; ++i) {
          float o1, o2;
          rope_pair(load_float(a.x, a.dtype, base + i), load_float(a.x, a.dtype, base + i + half),
                    load_float(a.cos, a.cos_dtype, cs + i), load_float(a.sin, a.cos_dtype, cs + i),
                    load_float(a.cos, a.cos_dtype, cs + i + half),
                    load_float(a.sin, a.cos_dtype, cs + i + half), backward, o1, o2);
          store_float(a.out, a.dtype, base + i, o1);
          store_float(a.out, a.dtype, base + i + half, o2);
        }
      }
    }
  }
}

#ifndef QFORGE_WITH_CUDA
void rope_cuda(const RopeArgs&, bool, void*) { cuda::require_cuda("rope on CUDA"); }
#endif

}  // namespace qforge::layer
