// SwiGLU: argument checks, the CPU twin of swiglu.cu, and dispatch.
#include "core/float_io.hpp"
#include "layer/checks.hpp"
#include "layer/rules.hpp"
#include "qforge/cuda_runtime.hpp"
#include "qforge/layer.hpp"

namespace qforge::layer {

void swiglu_forward(Device device, const void* gate, const void* up, DType dtype, int64_t n, void* out,
                    void* stream) {
  const char* op = "swiglu_forward";
  checked_numel(op, {n, dtype_size(dtype)});
  if (n == 0) return;
  QF_CHECK(gate && up && out, op, ": null gate, up or out");
  check_alias(op, "out", out, "gate", gate, n * dtype_size(dtype));
  check_alias(op, "out", out, "up", up, n * dtype_size(dtype));
  if (device == Device::CUDA) return swiglu_forward_cuda(gate, up, dtype, n, out, stream);
  swiglu_forward_cpu(gate, up, dtype, n, out);
}

void swiglu_backward(Device device, const void* dout, const void* gate, const void* up, DType dtype, int64_t n,
                     void* dgate, void* dup, void* stream) {
  const char* op = "swiglu_backward";
  checked_numel(op, {n, dtype_size(dtype)});
  if (n == 0) return;
  QF_CHECK(dout && gate && up && dgate && dup, op, ": null dout, gate, up, dgate or dup");
  const int64_t bytes = n * dtype_size(dtype);
  QF_CHECK(dgate != dup, op, ": dgate and dup must be different buffers");
  check_alias(op, "dgate", dgate, "dup", dup, bytes);
  for (void* o : {dgate, dup}) {
    const char* name = o == dgate ? "dgate" : "dup";
    check_alias(op, name, o, "dout", dout, bytes);
    check_alias(op, name, o, "gate", gate, bytes);
    check_alias(op, name, o, "up", up, bytes);
  }
  if (device == Device::CUDA) return swiglu_backward_cuda(dout, gate, up, dtype, n, dgate, dup, stream);
  swiglu_backward_cpu(dout, gate, up, dtype, n, dgate, dup);
}

void swiglu_forward_cpu(const void* gate, const void* up, DType dtype, int64_t n, void* out) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float s = round_to(dtype, silu(load_float(gate, dtype, i)));
    store_float(out, dtype, i, s * load_float(up, dtype, i));
  }
}

void swiglu_backward_cpu(const void* dout, const void* gate, const void* up, DType dtype, int64_t n, void* dgate,
                         void* dup) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    float dg, du;
    swiglu_grads(load_float(gate, dtype, i), load_float(up, dtype, i), load_float(dout, dtype, i),
                 dg, du);
    store_float(dgate, dtype, i, dg);
    store_float(dup, dtype, i, du);
  }
}

#ifndef QFORGE_WITH_CUDA
void swiglu_forward_cuda(const void*, const void*, DType, int64_t, void*, void*) {
  cuda::require_cuda("swiglu_forward on CUDA");
}
void swiglu_backward_cuda(const void*, const void*, const void*, DType, int64_t, void*, void*, void*) {
  cuda::require_cuda("swiglu_backward on CUDA");
}
#endif

}  // namespace qforge::layer
