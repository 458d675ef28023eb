// C ABI of the layer kernels (qforge/layer.hpp): argument translation only.
#include "guard.hpp"
#include "qforge/layer.hpp"
#include "translate.hpp"

using qforge::capi::guard;
using qforge::capi::to_device;
using qforge::capi::to_float_dtype;
namespace layer = qforge::layer;

namespace {

// The RMSNorm arguments of both directions, each dtype checked under the call's name `op`.
layer::RmsNormArgs rms_args(const char* op, const void* x, qf_dtype x_dtype, const void* weight,
                            qf_dtype weight_dtype, int64_t rows, int64_t dim) {
  return {x, to_float_dtype(x_dtype, "x", op), weight, to_float_dtype(weight_dtype, "weight", op), rows, dim};
}

}  // namespace

extern "C" {

int qf_rms_norm_forward(qf_device device, const void* x, qf_dtype x_dtype, const void* weight,
                        qf_dtype weight_dtype, int64_t rows, int64_t dim, float eps, void* y,
                        float* rstd, void* stream) {
  return guard([&] {
    const auto dev = to_device(device, "rms_norm_forward");
    layer::rms_norm_forward(dev, rms_args("rms_norm_forward", x, x_dtype, weight, weight_dtype, rows, dim), eps, y, rstd, stream);
  });
}

int qf_rms_norm_backward(qf_device device, const void* dy, const void* x, qf_dtype x_dtype,
                         const void* weight, qf_dtype weight_dtype, const float* rstd, int64_t rows,
                         int64_t dim, void* dx, void* stream) {
  return guard([&] {
    const auto dev = to_device(device, "rms_norm_backward");
    layer::rms_norm_backward(dev, rms_args("rms_norm_backward", x, x_dtype, weight, weight_dtype, rows, dim), dy, rstd, dx, stream);
  });
}

int qf_swiglu_forward(qf_device device, const void* gate, const void* up, qf_dtype dtype, int64_t n,
                      void* out, void* stream) {
  return guard([&] {
    const auto dev = to_device(device, "swiglu_forward");
    layer::swiglu_forward(dev, gate, up, to_float_dtype(dtype, "gate and up", "swiglu_forward"), n, out, stream);
  });
}

int qf_swiglu_backward(qf_device device, const void* dout, const void* gate, const void* up,
                       qf_dtype dtype, int64_t n, void* dgate, void* dup, void* stream) {
  return guard([&] {
    const auto dev = to_device(device, "swiglu_backward");
    layer::swiglu_backward(dev, dout, gate, up, to_float_dtype(dtype, "dout, gate and up", "swiglu_backward"), n,
                           dgate, dup, stream);
  });
}

int qf_rope(qf_device device, const void* x, void* out, qf_dtype dtype, int64_t batch, int64_t seq,
            int64_t heads, int64_t head_dim, const void* cos, const void* sin, qf_dtype cos_dtype,
            int64_t cos_batch, int backward, void* stream) {
  return guard([&] {
    const char* op = backward ? "rope_backward" : "rope_forward";
    layer::RopeArgs a;
    const auto dev = to_device(device, op);
    a.x = x;
    a.out = out;
    a.dtype = to_float_dtype(dtype, "x", op);
    a.batch = batch;
    a.seq = seq;
    a.heads = heads;
    a.head_dim = head_dim;
    a.cos = cos;
    a.sin = sin;
    a.cos_dtype = to_float_dtype(cos_dtype, "cos and sin", op);
    a.cos_batch = cos_batch;
    layer::rope(dev, a, backward != 0, stream);
  });
}

}  // extern "C"
