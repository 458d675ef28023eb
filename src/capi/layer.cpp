// C ABI of the layer kernels (src/layer): argument translation only.
#include "guard.hpp"
#include "layer/layer.hpp"

using qforge::capi::guard;
namespace layer = qforge::layer;

extern "C" {

int qf_rms_norm_forward(qf_device device, const void* x, qf_dtype x_dtype, const void* weight,
                        qf_dtype weight_dtype, int64_t rows, int64_t dim, float eps, void* y,
                        float* rstd, void* stream) {
  return guard([&] {
    layer::rms_norm_forward(device, {x, x_dtype, weight, weight_dtype, rows, dim}, eps, y, rstd,
                            stream);
  });
}

int qf_rms_norm_backward(qf_device device, const void* dy, const void* x, qf_dtype x_dtype,
                         const void* weight, qf_dtype weight_dtype, const float* rstd, int64_t rows,
                         int64_t dim, void* dx, void* stream) {
  return guard([&] {
    layer::rms_norm_backward(device, {x, x_dtype, weight, weight_dtype, rows, dim}, dy, rstd, dx,
                             stream);
  });
}

int qf_swiglu_forward(qf_device device, const void* gate, const void* up, qf_dtype dtype, int64_t n,
                      void* out, void* stream) {
  return guard([&] { layer::swiglu_forward(device, gate, up, dtype, n, out, stream); });
}

int qf_swiglu_backward(qf_device device, const void* dout, const void* gate, const void* up,
                       qf_dtype dtype, int64_t n, void* dgate, void* dup, void* stream) {
  return guard([&] { layer::swiglu_backward(device, dout, gate, up, dtype, n, dgate, dup, stream); });
}

int qf_rope(qf_device device, const void* x, void* out, qf_dtype dtype, int64_t batch, int64_t seq,
            int64_t heads, int64_t head_dim, const void* cos, const void* sin, qf_dtype cos_dtype,
            int64_t cos_batch, int backward, void* stream) {
  return guard([&] {
    layer::RopeArgs a;
    a.x = x;
    a.out = out;
    a.dtype = dtype;
    a.batch = batch;
    a.seq = seq;
    a.heads = heads;
    a.head_dim = head_dim;
    a.cos = cos;
    a.sin = sin;
    a.cos_dtype = cos_dtype;
    a.cos_batch = cos_batch;
    layer::rope(device, a, backward != 0, stream);
  });
}

}
