// Fused chunked linear + cross-entropy: argument checks, workspace sizing and
// the CPU twin of the CUDA path (src/loss/lce_cuda.cu), same algorithm, same
// rounding points (logits and d loss / d logits stored in the input dtype).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "core/half.hpp"
#include "loss/lce_common.hpp"
#include "qforge/error.hpp"
#include "qforge/loss.hpp"

namespace qforge::loss {

Reduction reduction_from_name(std::string_view name) {
  if (name == "none") return Reduction::None;
  if (name == "mean") return Reduction::Mean;
  if (name == "sum") return Reduction::Sum;
  QF_CHECK(false, "linear_cross_entropy: reduction must be 'mean', 'sum' or 'none', got '", name, "'");
  return Reduction::Mean;
}

int64_t effective_chunk(int64_t N, int64_t chunk) {
  if (N <= 0) return 1;
  if (chunk <= 0 || chunk > N) return N;
  return chunk;
}

static int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

// cuBLASLt workspace inside ours: 8 MiB (env QFORGE_LCE_CUBLAS_WS_MB overrides)
int64_t cublas_workspace_bytes() {
  int64_t mb = 8;
  if (const char* e = std::getenv("QFORGE_LCE_CUBLAS_WS_MB")) {
    const long v = std::strtol(e, nullptr, 10);
    if (v >= 0 && v <= 1024) mb = v;
  }
  return mb << 20;
}

int64_t cuda_logits_ld(int64_t V) { return align_up(V, 8); }

CudaWorkspaceLayout cuda_workspace_layout(int64_t N, int64_t V, DType dtype, int64_t chunk) {
  CudaWorkspaceLayout l;
  const int64_t c = effective_chunk(N, chunk);
  l.logits = 0;
  l.token_loss = align_up(c * cuda_logits_ld(V) * dtype_size(dtype), 256);
  l.scalars = l.token_loss + align_up(std::max<int64_t>(N, 1) * 4, 256);
  l.cublas = l.scalars + 256;
  l.cublas_bytes = cublas_workspace_bytes();
  l.total = l.cublas + l.cublas_bytes;
  return l;
}

int64_t lce_workspace_bytes(Device device, int64_t N, int64_t D, int64_t V, DType dtype,
                            int64_t chunk) {
  QF_CHECK(N >= 0 && D >= 1 && V >= 1, "linear_cross_entropy: bad sizes N=", N, " D=", D,
           " V=", V);
  QF_CHECK(chunk >= 0, "linear_cross_entropy: chunk_size must be >= 0, got ", chunk);
  if (device == Device::CUDA) return cuda_workspace_layout(N, V, dtype, chunk).total;
  const int64_t c = effective_chunk(N, chunk);
  return (c * V + 2 * c * D) * 4;
}

int64_t lce_chunk_size(Device device, int64_t N, int64_t D, int64_t V, DType dtype,
                       int64_t budget_bytes) {
  if (N <= 0) return 1;
  auto fits = [&](int64_t chunk) { return lce_workspace_bytes(device, N, D, V, dtype, chunk) <= budget_bytes; };
  if (fits(N)) return N;
  // the workspace grows with the chunk: bisect for the largest that fits
  int64_t lo = 1, hi = N;  // fits(hi) is false
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    (fits(mid) ? lo : hi) = mid;
  }
  if (lo < 128) return lo;
  int64_t chunk = 128;
  while (chunk * 2 <= lo) chunk *= 2;
  return chunk;
}

void lce_check(const LceInputs& in, const LceOptions& opt, const LceOutputs& out,
               int64_t workspace_bytes, Device device) {
  const char* f = "linear_cross_entropy";
  QF_CHECK(in.N >= 0, f, ": N (tokens) must be >= 0, got ", in.N);
  QF_CHECK(in.D >= 1, f, ": D (hidden size) must be >= 1, got ", in.D);
  QF_CHECK(in.V >= 1, f, ": V (vocabulary size) must be >= 1, got ", in.V);
  QF_CHECK(in.dtype == DType::F32 || in.dtype == DType::F16 || in.dtype == DType::BF16, f,
           ": dtype must be float32, float16 or bfloat16");
  QF_CHECK(in.V <= (int64_t(1) << 31) && in.D <= (int64_t(1) << 31), f, ": V and D must be < 2^31");
  if (in.N > 0) {
    QF_CHECK(in.hidden != nullptr, f, ": hidden is null");
    QF_CHECK(in.labels != nullptr, f, ": labels is null");
  }
  QF_CHECK(in.weight != nullptr, f, ": weight is null");
  QF_CHECK(out.loss != nullptr || (opt.reduction == Reduction::None && in.N == 0), f,
           ": the loss output is null");
  QF_CHECK(opt.label_smoothing >= 0.0f && opt.label_smoothing <= 1.0f, f,
           ": label_smoothing must be in [0, 1], got ", opt.label_smoothing);
  QF_CHECK(std::isfinite(opt.logit_scale) && opt.logit_scale != 0.0f, f,
           ": logit_scale must be finite and non-zero, got ", opt.logit_scale);
  QF_CHECK(std::isfinite(opt.softcap) && opt.softcap >= 0.0f, f,
           ": softcap must be a finite number > 0 (0: no soft-capping), got ", opt.softcap);
  QF_CHECK(std::isfinite(opt.z_loss) && opt.z_loss >= 0.0f, f,
           ": z_loss must be finite and >= 0, got ", opt.z_loss);
  QF_CHECK(opt.reduction == Reduction::None || opt.reduction == Reduction::Mean ||
               opt.reduction == Reduction::Sum,
           f, ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", static_cast<int>(opt.reduction));
  QF_CHECK(opt.chunk >= 0, f, ": chunk size must be >= 0 (0 = all tokens), got ", opt.chunk);
  QF_CHECK(out.grad_weight_dtype == in.dtype || out.grad_weight_dtype == DType::F32, f,
           ": grad_weight must be ", dtype_name(in.dtype), " or float32, got ",
           dtype_name(out.grad_weight_dtype));
  const int64_t need = lce_workspace_bytes(device, in.N, in.D, in.V, in.dtype, opt.chunk);
  QF_CHECK(workspace_bytes >= need, f, ": workspace of ", workspace_bytes,
           " bytes is too small, need ", need, " (ask qf_lce_workspace_bytes)");
  if (device == Device::CPU) {
    for (int64_t i = 0; i < in.N; ++i) {
      const int64_t y = in.labels[i];
      QF_CHECK(y == opt.ignore_index || (y >= 0 && y < in.V), f, ": labels[", i, "] = ", y,
               " is out of range [0, ", in.V, ") and is not ignore_index (", opt.ignore_index,
               ")");
    }
  }
}

// ------------------------------------------------------------------ CPU twin
namespace {

constexpr int kVB = 32;  // vocabulary rows per CPU tile

struct F32T {
  using S = float;
  static float load(const float* p, int64_t i) { return p[i]; }
  static float round(float x) { return x; }
  static void store(float* p, int64_t i, float x) { p[i] = x; }
};
struct BF16T {
  using S = uint16_t;
  static float load(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
  static float round(float x) { return bf16_to_float(float_to_bf16(x)); }
  static void store(uint16_t* p, int64_t i, float x) { p[i] = float_to_bf16(x); }
};
struct F16T {
  using S = uint16_t;
  static float load(const uint16_t* p, int64_t i) { return half_to_float(p[i]); }
  static float round(float x) { return half_to_float(float_to_half(x)); }
  static void store(uint16_t* p, int64_t i, float x) { p[i] = float_to_half(x); }
};

template <class T>
void forward_cpu(const LceInputs& in, const LceOptions& opt, const LceOutputs& out, void* ws) {
  using S = typename T::S;
  const int64_t N = in.N, D = in.D, V = in.V;
  const S* H = static_cast<const S*>(in.hidden);
  const S* W = static_cast<const S*>(in.weight);
  const S* B = static_cast<const S*>(in.bias);
  const int64_t chunk = effective_chunk(N, opt.chunk);
  float* logits = static_cast<float*>(ws);  // [chunk, V]
  float* hc = logits + chunk * V;           // [chunk, D]
  float* gh = hc + chunk * D;               // [chunk, D]
  const bool want_grad = out.grad_hidden || out.grad_weight || out.grad_bias;

  const RowParams p = make_row_params(opt, V);
  // denominator of the mean and sum of the class weights
  double denom = 0.0;
  for (int64_t i = 0; i < N; ++i)
    if (in.labels[i] != opt.ignore_index)
      denom += in.class_weight ? double(in.class_weight[in.labels[i]]) : 1.0;
  double wsum = double(V);
  if (in.class_weight) {
    wsum = 0.0;
    for (int64_t c = 0; c < V; ++c) wsum += in.class_weight[c];
  }
  const float inv_denom = denom > 0.0 ? float(1.0 / denom) : 0.0f;

  if (out.grad_bias) std::fill(out.grad_bias, out.grad_bias + V, 0.0f);
  if (out.grad_weight && N == 0) {
    if (out.grad_weight_dtype == DType::F32)
      std::fill(static_cast<float*>(out.grad_weight), static_cast<float*>(out.grad_weight) + V * D, 0.0f);
    else
      std::fill(static_cast<S*>(out.grad_weight), static_cast<S*>(out.grad_weight) + V * D, S(0));
  }
  double loss_sum = 0.0;

  for (int64_t s = 0; s < N; s += chunk) {
    const int64_t n = std::min(chunk, N - s);
    for (int64_t i = 0; i < n * D; ++i) hc[i] = T::load(H, s * D + i);
    // GEMM 1: logits = Hc W^T (+ stored in the input dtype, as the GPU GEMM does)
    // blocks of kVB vocabulary rows (converted to fp32 once) share each hidden row load
#pragma omp parallel
    {
      std::vector<float> wrow(kVB * D);
#pragma omp for schedule(static)
      for (int64_t cb = 0; cb < V; cb += kVB) {
        const int nb = int(std::min<int64_t>(kVB, V - cb));
        for (int j = 0; j < nb; ++j)
          for (int64_t k = 0; k < D; ++k) wrow[j * D + k] = T::load(W, (cb + j) * D + k);
        for (int64_t i = 0; i < n; ++i) {
          const float* h = hc + i * D;
          for (int j = 0; j < nb; ++j) {
            const float* w = wrow.data() + j * D;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t k = 0; k < D; ++k) acc += h[k] * w[k];
            logits[i * V + cb + j] = T::round(acc);
          }
        }
      }
    }
    // fused pass: lse, loss, d loss / d logits in place
    double chunk_loss = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : chunk_loss)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t row = s + i;
      const int64_t y = in.labels[row];
      const bool valid = y != opt.ignore_index;
      float* L = logits + i * V;
      auto z_of = [&](int64_t c) {
        float u = L[c];
        if (B) u += T::load(B, c);
        return transform_logit(p, u);
      };
      // pass 1: online max / sum of exp, and the label-smoothing sum
      float m = -std::numeric_limits<float>::infinity(), se = 0.0f, swz = 0.0f;
      for (int64_t c = 0; c < V; ++c) {
        const float z = z_of(c);
        online_update(m, se, z);
        if (p.eps != 0.0f) swz += (in.class_weight ? in.class_weight[c] : 1.0f) * z;
      }
      const float lse = m + std::log(se);
      if (out.lse) out.lse[row] = lse;
      float loss = 0.0f, wy = 0.0f;
      if (valid) {
        wy = in.class_weight ? in.class_weight[y] : 1.0f;
        loss = row_loss(p, lse, z_of(y), wy, float(wsum), swz);
      }
      if (opt.reduction == Reduction::None) out.loss[row] = loss;
      chunk_loss += double(loss);
      if (!want_grad) continue;
      // pass 2: gradient, scaled by the per-token factor
      float scale = valid ? (opt.reduction == Reduction::Mean ? inv_denom : 1.0f) : 0.0f;
      if (out.grad_scale) scale *= out.grad_scale[row];
      const RowGrad g = make_row_grad(p, lse, wy, float(wsum), scale);
      for (int64_t c = 0; c < V; ++c) {
        const float z = z_of(c);
        const float cwc = in.class_weight ? in.class_weight[c] : 1.0f;
        L[c] = T::round(scale == 0.0f ? 0.0f : grad_logit(p, g, z, cwc, c == y));
      }
    }
    loss_sum += chunk_loss;
    if (!want_grad) continue;
    if (out.grad_bias) {
      for (int64_t i = 0; i < n; ++i)
        for (int64_t c = 0; c < V; ++c) out.grad_bias[c] += logits[i * V + c];
    }
    // GEMM 2: grad_hidden rows = dL W
    if (out.grad_hidden) {
      S* GH = static_cast<S*>(out.grad_hidden);
      std::fill(gh, gh + n * D, 0.0f);
#pragma omp parallel
      {
        // each thread owns a range of rows; vocabulary tiles converted to fp32 once per thread
        int nt = 1, t = 0;
#ifdef _OPENMP
        nt = omp_get_num_threads();
        t = omp_get_thread_num();
#endif
        const int64_t i0 = n * t / nt, i1 = n * (t + 1) / nt;
        std::vector<float> tile(kVB * D);
        for (int64_t cb = 0; cb < V && i0 < i1; cb += kVB) {
          const int nb = int(std::min<int64_t>(kVB, V - cb));
          for (int j = 0; j < nb; ++j)
            for (int64_t k = 0; k < D; ++k) tile[j * D + k] = T::load(W, (cb + j) * D + k);
          for (int64_t i = i0; i < i1; ++i) {
            float* acc = gh + i * D;
            const float* dl = logits + i * V + cb;
            for (int j = 0; j < nb; ++j) {
              const float d = dl[j];
              if (d == 0.0f) continue;
              const float* w = tile.data() + j * D;
#pragma omp simd
              for (int64_t k = 0; k < D; ++k) acc[k] += d * w[k];
            }
          }
        }
      }
      for (int64_t i = 0; i < n; ++i)
        for (int64_t k = 0; k < D; ++k) T::store(GH, (s + i) * D + k, gh[i * D + k]);
    }
    // GEMM 3: grad_weight (+)= dL^T Hc, rounded to its dtype once per chunk
    if (out.grad_weight) {
      const bool first = s == 0;
#pragma omp parallel
      {
        std::vector<float> acc(kVB * D);
#pragma omp for schedule(static)
        for (int64_t cb = 0; cb < V; cb += kVB) {
          const int nb = int(std::min<int64_t>(kVB, V - cb));
          std::fill(acc.begin(), acc.end(), 0.0f);
          for (int64_t i = 0; i < n; ++i) {
            const float* h = hc + i * D;
            for (int j = 0; j < nb; ++j) {
              const float d = logits[i * V + cb + j];
              if (d == 0.0f) continue;
              float* a = acc.data() + j * D;
#pragma omp simd
              for (int64_t k = 0; k < D; ++k) a[k] += d * h[k];
            }
          }
          for (int j = 0; j < nb; ++j) {
            const int64_t c = cb + j;
            const float* a = acc.data() + j * D;
            if (out.grad_weight_dtype == DType::F32) {
              float* GW = static_cast<float*>(out.grad_weight) + c * D;
              for (int64_t k = 0; k < D; ++k) GW[k] = first ? a[k] : GW[k] + a[k];
            } else {
              S* GW = static_cast<S*>(out.grad_weight);
              for (int64_t k = 0; k < D; ++k)
                T::store(GW, c * D + k, first ? a[k] : T::load(GW, c * D + k) + a[k]);
            }
          }
        }
      }
    }
  }
  if (opt.reduction == Reduction::Mean)
    out.loss[0] = float(loss_sum / denom);  // 0/0 = NaN with no valid token, as PyTorch
  else if (opt.reduction == Reduction::Sum)
    out.loss[0] = float(loss_sum);
}

}  // namespace

void lce_forward_cpu(const LceInputs& in, const LceOptions& opt, const LceOutputs& out,
                     void* workspace, int64_t workspace_bytes) {
  lce_check(in, opt, out, workspace_bytes, Device::CPU);
  QF_CHECK(workspace != nullptr || lce_workspace_bytes(Device::CPU, in.N, in.D, in.V, in.dtype, opt.chunk) == 0,
           "linear_cross_entropy: workspace is null");
  switch (in.dtype) {
    case DType::F32: forward_cpu<F32T>(in, opt, out, workspace); break;
    case DType::BF16: forward_cpu<BF16T>(in, opt, out, workspace); break;
    case DType::F16: forward_cpu<F16T>(in, opt, out, workspace); break;
  }
}

void scale_inplace_cpu(void* x, DType dtype, int64_t n, const float* scale) {
  QF_CHECK(n >= 0, "scale_inplace: n must be >= 0");
  if (n == 0) return;
  QF_CHECK(x != nullptr && scale != nullptr, "scale_inplace: null pointer");
  const float g = scale[0];
  switch (dtype) {
    case DType::F32: {
      float* p = static_cast<float*>(x);
      for (int64_t i = 0; i < n; ++i) p[i] *= g;
      break;
    }
    case DType::BF16: {
      uint16_t* p = static_cast<uint16_t*>(x);
      for (int64_t i = 0; i < n; ++i) p[i] = float_to_bf16(bf16_to_float(p[i]) * g);
      break;
    }
    case DType::F16: {
      uint16_t* p = static_cast<uint16_t*>(x);
      for (int64_t i = 0; i < n; ++i) p[i] = float_to_half(half_to_float(p[i]) * g);
      break;
    }
  }
}

// ------------------------------------------------------------------ dispatch
void lce_forward(Device device, const LceInputs& in, const LceOptions& opt, const LceOutputs& out,
                 void* workspace, int64_t workspace_bytes, void* stream) {
  if (device == Device::CUDA)
    lce_forward_cuda(in, opt, out, workspace, workspace_bytes, stream);
  else
    lce_forward_cpu(in, opt, out, workspace, workspace_bytes);
}

void lce_run(const LceTensors& t, const LceOptions& opt, void* stream) {
  const LceCall call = lce_bind(t, opt);
  lce_forward(call.device, call.in, opt, call.out, call.workspace, call.workspace_bytes, stream);
}

void scale_inplace(Device device, void* x, DType dtype, int64_t n, const float* scale, void* stream) {
  if (device == Device::CUDA)
    scale_inplace_cuda(x, dtype, n, scale, stream);
  else
    scale_inplace_cpu(x, dtype, n, scale);
}

#ifndef QFORGE_WITH_CUDA
void scale_inplace_cuda(void*, DType, int64_t, const float*, void*) {
  QF_CHECK(false, "scale_inplace: this libqforge was built without CUDA (no nvcc at build time)");
}
void lce_forward_cuda(const LceInputs&, const LceOptions&, const LceOutputs&, void*, int64_t,
                      void*) {
  QF_CHECK(false, "linear_cross_entropy: this libqforge was built without CUDA (no nvcc at build time)");
}
#endif

}  // namespace qforge::loss
