// Per-token arithmetic of the fused linear + cross-entropy, shared verbatim by
// the CPU twin (lce.cpp) and the CUDA kernel (lce_cuda.cu). See loss.hpp for
// the formulas.
#pragma once
#include <cmath>
#include <cstdint>

#include "qforge/loss.hpp"

#if defined(__CUDACC__)
#define QF_HD __host__ __device__ __forceinline__
#else
#define QF_HD inline
#endif

namespace qforge::loss {

struct RowParams {
  float eps;        // label smoothing
  float eps_over_v; // eps / V
  float cap;        // softcap (<= 0: none)
  float inv_cap;    // 1 / softcap
  float scale;      // logit_scale
  float zl;         // z_loss
};

inline RowParams make_row_params(const LceOptions& o, int64_t V) {
  RowParams p;
  p.eps = o.label_smoothing;
  p.eps_over_v = float(double(o.label_smoothing) / double(V));
  p.cap = o.softcap > 0.0f ? o.softcap : 0.0f;
  p.inv_cap = p.cap > 0.0f ? 1.0f / p.cap : 0.0f;
  p.scale = o.logit_scale;
  p.zl = o.z_loss;
  return p;
}

QF_HD float qf_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return std::exp(x);
#endif
}

// u = raw logit (+ bias); returns z
QF_HD float transform_logit(const RowParams& p, float u) {
  u *= p.scale;
  if (p.cap > 0.0f) u = p.cap * tanhf(u * p.inv_cap);
  return u;
}

// online log-sum-exp: (m, s) with s = sum exp(z - m)
QF_HD void online_update(float& m, float& s, float z) {
  if (z > m) {
    s = s * qf_exp(m - z) + 1.0f;
    m = z;
  } else {
    s += qf_exp(z - m);
  }
}
QF_HD void online_merge(float& m, float& s, float m2, float s2) {
  if (m2 > m) {
    s = s * qf_exp(m - m2) + s2;
    m = m2;
  } else if (m2 == m) {
    s += s2;  // also covers both -inf
  } else {
    s += s2 * qf_exp(m2 - m);
  }
}

QF_HD float row_loss(const RowParams& p, float lse, float zy, float wy, float wsum, float swz) {
  float l = (1.0f - p.eps) * wy * (lse - zy);
  if (p.eps != 0.0f) l += p.eps_over_v * (wsum * lse - swz);
  if (p.zl != 0.0f) l += p.zl * lse * lse;
  return l;
}

struct RowGrad {
  float lse;
  float a;   // coefficient of softmax p_c
  float b;   // coefficient of class weight cw_c (label smoothing)
  float dy;  // subtracted at the label
};

QF_HD RowGrad make_row_grad(const RowParams& p, float lse, float wy, float wsum, float scale) {
  RowGrad g;
  g.lse = lse;
  g.a = scale * ((1.0f - p.eps) * wy + p.eps_over_v * wsum + 2.0f * p.zl * lse);
  g.b = scale * p.eps_over_v;
  g.dy = scale * (1.0f - p.eps) * wy;
  return g;
}

// d loss / d (raw logit + bias) for class c with transformed logit z
QF_HD float grad_logit(const RowParams& p, const RowGrad& g, float z, float cwc, bool is_label) {
  float d = g.a * qf_exp(z - g.lse) - g.b * cwc;
  if (is_label) d -= g.dy;
  float chain = p.scale;
  if (p.cap > 0.0f) {
    const float t = z * p.inv_cap;
    chain *= 1.0f - t * t;
  }
  return d * chain;
}

// Internal helpers shared by lce.cpp and lce_cuda.cu.
int64_t effective_chunk(int64_t N, int64_t chunk);
int64_t cuda_logits_ld(int64_t V);
int64_t cublas_workspace_bytes();
struct CudaWorkspaceLayout {
  int64_t logits, token_loss, scalars, cublas, cublas_bytes, total;
};
CudaWorkspaceLayout cuda_workspace_layout(int64_t N, int64_t V, DType dtype, int64_t chunk);

}  // namespace qforge::loss
