// RMSNorm: argument checks, the CPU twin of rms_norm.cu, and dispatch.
#include "core/float_io.hpp"
#include "layer/checks.hpp"
#include "layer/rules.hpp"
#include "qforge/cuda_runtime.hpp"
#include "qforge/layer.hpp"

namespace qforge::layer {
namespace {

void check_rms_args(const char* op, const RmsNormArgs& a) {
  QF_CHECK(a.weight_dtype == a.x_dtype || a.weight_dtype == DType::F32, op, ": weight must be ",
           dtype_name(a.x_dtype), " (as x) or float32, got ", dtype_name(a.weight_dtype));
  QF_CHECK(a.dim > 0, op, ": the normalized dimension must be > 0, got ", a.dim);
  checked_numel(op, {a.rows, a.dim});
  QF_CHECK(a.rows == 0 || (a.x && a.weight), op, ": null x or weight");
}

}  // namespace

void rms_norm_forward(Device device, const RmsNormArgs& a, float eps, void* y, float* rstd, void* stream) {
  const char* op = "rms_norm_forward";
  check_rms_args(op, a);
  QF_CHECK(eps >= 0.0f, op, ": eps must be >= 0, got ", eps);
  if (a.rows == 0) return;
  QF_CHECK(y && rstd, op, ": null y or rstd");
  check_alias(op, "y", y, "x", a.x, a.rows * a.dim * dtype_size(a.x_dtype));
  if (device == Device::CUDA) return rms_norm_forward_cuda(a, eps, y, rstd, stream);
  rms_norm_forward_cpu(a, eps, y, rstd);
}

void rms_norm_backward(Device device, const RmsNormArgs& a, const void* dy, const float* rstd, void* dx,
                       void* stream) {
  const char* op = "rms_norm_backward";
  check_rms_args(op, a);
  if (a.rows == 0) return;
  QF_CHECK(dy && rstd && dx, op, ": null dy, rstd or dx");
  const int64_t bytes = a.rows * a.dim * dtype_size(a.x_dtype);
  check_alias(op, "dx", dx, "dy", dy, bytes);
  check_alias(op, "dx", dx, "x", a.x, bytes);
  if (device == Device::CUDA) return rms_norm_backward_cuda(a, dy, rstd, dx, stream);
  rms_norm_backward_cpu(a, dy, rstd, dx);
}

void rms_norm_forward_cpu(const RmsNormArgs& a, float eps, void* y, float* rstd) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < a.rows; ++r) {
    const int64_t base = r * a.dim;
    double sum_squares = 0.0;  // row sums in double: the twin is the accurate reference
    for (int64_t j = 0; j < a.dim; ++j) {
      const float v = load_float(a.x, a.x_dtype, base + j);
      sum_squares += v * v;
    }
    const float inv = rms_inverse(static_cast<float>(sum_squares), a.dim, eps);
    rstd[r] = inv;
    for (int64_t j = 0; j < a.dim; ++j) {
      const float normed = round_to(a.x_dtype, load_float(a.x, a.x_dtype, base + j) * inv);
      store_float(y, a.x_dtype, base + j, load_float(a.weight, a.weight_dtype, j) * normed);
    }
  }
}

void rms_norm_backward_cpu(const RmsNormArgs& a, const void* dy, const float* rstd, void* dx) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < a.rows; ++r) {
    const int64_t base = r * a.dim;
    const float inv = rstd[r];
    double sum_g_xhat = 0.0;
    for (int64_t j = 0; j < a.dim; ++j) {
      const float g = load_float(dy, a.x_dtype, base + j) * load_float(a.weight, a.weight_dtype, j);
      sum_g_xhat += g * (load_float(a.x, a.x_dtype, base + j) * inv);
    }
    const float mean_g_xhat = static_cast<float>(sum_g_xhat) / static_cast<float>(a.dim);
    for (int64_t j = 0; j < a.dim; ++j) {
      const float g = load_float(dy, a.x_dtype, base + j) * load_float(a.weight, a.weight_dtype, j);
      const float xhat = load_float(a.x, a.x_dtype, base + j) * inv;
      store_float(dx, a.x_dtype, base + j, rms_norm_dx(g, xhat, inv, mean_g_xhat));
    }
  }
}

#ifndef QFORGE_WITH_CUDA
void rms_norm_forward_cuda(const RmsNormArgs&, float, void*, float*, void*) {
  cuda::require_cuda("rms_norm_forward on CUDA");
}
void rms_norm_backward_cuda(const RmsNormArgs&, const void*, const float*, void*, void*) {
  cuda::require_cuda("rms_norm_backward on CUDA");
}
#endif

}  // namespace qforge::layer
