// CUDA path of the fused chunked linear + cross-entropy (see qforge/loss.hpp).
// Per chunk of tokens: cuBLASLt GEMM -> logits (input dtype, fp32 accumulate),
// one block per token computes LSE / loss / d loss / d logits in fp32 and
// overwrites the logits in place, then cuBLASLt GEMMs for grad_hidden
// (beta = 0, the chunk's rows) and grad_weight (beta = 1 after the first
// chunk; fp32 output for fp32 accumulation).
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <tuple>
#include <vector>

#include "core/cuda_check.cuh"
#include "loss/lce_common.hpp"
#include "qforge/cuda_runtime.hpp"
#include "qforge/error.hpp"
#include "qforge/loss.hpp"

namespace qforge::loss {
namespace {

constexpr int kThreads = 512;

struct Scalars {
  double denom;
  double wsum;
  unsigned long long first_bad;  // smallest index of an out-of-range label, or ~0
  int bad;
  int pad;
};

// ------------------------------------------------------------ element types
template <class T> struct Ty;
template <> struct Ty<float> {
  static __device__ __forceinline__ float f(float x) { return x; }
  static __device__ __forceinline__ float t(float x) { return x; }
  static constexpr cudaDataType_t cuda = CUDA_R_32F;
};
template <> struct Ty<__nv_bfloat16> {
  static __device__ __forceinline__ float f(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 t(float x) { return __float2bfloat16_rn(x); }
  static constexpr cudaDataType_t cuda = CUDA_R_16BF;
};
template <> struct Ty<__half> {
  static __device__ __forceinline__ float f(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half t(float x) { return __float2half_rn(x); }
  static constexpr cudaDataType_t cuda = CUDA_R_16F;
};

// 8 consecutive elements, 16-byte aligned for 2-byte types (32 for float)
template <class T>
__device__ __forceinline__ void load8(const T* p, float v[8]) {
  if constexpr (sizeof(T) == 2) {
    uint4 r = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&r);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = Ty<T>::f(e[j]);
  } else {
    float4 a = reinterpret_cast<const float4*>(p)[0];
    float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  }
}
template <class T>
__device__ __forceinline__ void store8(T* p, const float v[8]) {
  if constexpr (sizeof(T) == 2) {
    uint4 r;
    T* e = reinterpret_cast<T*>(&r);
#pragma unroll
    for (int j = 0; j < 8; ++j) e[j] = Ty<T>::t(v[j]);
    *reinterpret_cast<uint4*>(p) = r;
  } else {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
}

// ------------------------------------------------------------ prep kernel
__global__ void prep_kernel(const int64_t* labels, int64_t N, const float* cw, int64_t V,
                            int64_t ignore, Scalars* sc) {
  __shared__ double sd[32], sw[32];
  double d = 0.0, w = 0.0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const int64_t y = labels[i];
    if (y == ignore) continue;
    if (y < 0 || y >= V) {
      atomicMin(&sc->first_bad, (unsigned long long)i);
      atomicAdd(&sc->bad, 1);
      continue;
    }
    d += cw ? double(cw[y]) : 1.0;
  }
  if (cw)
    for (int64_t c = threadIdx.x; c < V; c += blockDim.x) w += double(cw[c]);
  for (int o = 16; o > 0; o >>= 1) {
    d += __shfl_xor_sync(0xffffffffu, d, o);
    w += __shfl_xor_sync(0xffffffffu, w, o);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) { sd[warp] = d; sw[warp] = w; }
  __syncthreads();
  if (threadIdx.x == 0) {
    double td = 0.0, tw = 0.0;
    for (int i = 0; i < int(blockDim.x >> 5); ++i) { td += sd[i]; tw += sw[i]; }
    sc->denom = td;
    sc->wsum = cw ? tw : double(V);
  }
}

__global__ void init_scalars(Scalars* sc) {
  sc->denom = 0.0;
  sc->wsum = 0.0;
  sc->first_bad = ~0ull;
  sc->bad = 0;
}

// ------------------------------------------------------------ the fused row pass
// The factor a row's logit gradient is scaled by: 1/denom (mean) or 1 (sum),
// times the per-token upstream gradient where given; 0 for an ignored row,
// NaN for a row with a bad label.
__device__ __forceinline__ float row_grad_scale(bool valid, bool bad, int reduction,
                                                const Scalars* __restrict__ sc,
                                                const float* __restrict__ grad_scale, int64_t row) {
  if (bad) return NAN;
  float scale = !valid ? 0.0f
                : reduction == int(Reduction::Mean) ? (sc->denom > 0.0 ? float(1.0 / sc->denom) : 0.0f)
                                                    : 1.0f;
  if (grad_scale) scale *= grad_scale[row];
  return scale;
}

// Merges every thread's online-softmax state (running max m, sum s of
// exp(z - m)) and plain sum swz across the block; the result is in thread 0.
template <int kBlockThreads>
__device__ __forceinline__ void block_merge(float& m, float& s, float& swz) {
  __shared__ float s_m[kBlockThreads / 32], s_s[kBlockThreads / 32], s_w[kBlockThreads / 32];
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
    online_merge(m, s, m2, s2);
    swz += __shfl_xor_sync(0xffffffffu, swz, o);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) { s_m[warp] = m; s_s[warp] = s; s_w[warp] = swz; }
  __syncthreads();
  if (threadIdx.x == 0) {
    m = s_m[0], s = s_s[0], swz = s_w[0];
    for (int i = 1; i < kBlockThreads / 32; ++i) { online_merge(m, s, s_m[i], s_s[i]); swz += s_w[i]; }
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) row_kernel(
    T* logits, int64_t ld, int64_t V, const T* __restrict__ bias,
    const int64_t* __restrict__ labels, const float* __restrict__ cw,
    const Scalars* __restrict__ sc, RowParams p, int64_t ignore, int reduction,
    float* __restrict__ tok_loss, float* __restrict__ lse_out,
    const float* __restrict__ grad_scale, int want_grad) {
  __shared__ float s_lse;
  const int64_t row = blockIdx.x;
  T* L = logits + row * ld;
  const int64_t y = labels[row];
  const bool valid = y != ignore;
  const bool bad = valid && (y < 0 || y >= V);
  const int64_t n8 = V / 8;
  const bool need_swz = p.eps != 0.0f;

  auto z_of = [&](float raw, int64_t c) {
    if (bias) raw += Ty<T>::f(bias[c]);
    return transform_logit(p, raw);
  };

  // pass 1: online max / sum exp (+ label-smoothing sum)
  float m = -INFINITY, s = 0.0f, swz = 0.0f;
  for (int64_t g = threadIdx.x; g < n8; g += kThreads) {
    float v[8];
    load8(L + g * 8, v);
    float gm = -INFINITY;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      v[j] = z_of(v[j], g * 8 + j);
      gm = fmaxf(gm, v[j]);
      if (need_swz) swz += (cw ? cw[g * 8 + j] : 1.0f) * v[j];
    }
    float gs = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) gs += qf_exp(v[j] - gm);
    online_merge(m, s, gm, gs);
  }
  for (int64_t c = n8 * 8 + threadIdx.x; c < V; c += kThreads) {
    const float z = z_of(Ty<T>::f(L[c]), c);
    online_update(m, s, z);
    if (need_swz) swz += (cw ? cw[c] : 1.0f) * z;
  }
  block_merge<kThreads>(m, s, swz);
  if (threadIdx.x == 0) {
    const float lse = m + logf(s);
    s_lse = lse;
    if (lse_out) lse_out[row] = lse;
    float loss = 0.0f;
    if (bad) {
      loss = NAN;
    } else if (valid) {
      const float wy = cw ? cw[y] : 1.0f;
      loss = row_loss(p, lse, z_of(Ty<T>::f(L[y]), y), wy, float(sc->wsum), swz);
    }
    tok_loss[row] = loss;
  }
  if (!want_grad) return;
  __syncthreads();
  const float lse = s_lse;
  const float wy = valid && !bad ? (cw ? cw[y] : 1.0f) : 0.0f;
  const float scale = row_grad_scale(valid, bad, reduction, sc, grad_scale, row);
  if (scale == 0.0f) {
    const float zero[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t g = threadIdx.x; g < n8; g += kThreads) store8(L + g * 8, zero);
    for (int64_t c = n8 * 8 + threadIdx.x; c < V; c += kThreads) L[c] = Ty<T>::t(0.0f);
    return;
  }
  const RowGrad rg = make_row_grad(p, lse, wy, float(sc->wsum), scale);
  for (int64_t g = threadIdx.x; g < n8; g += kThreads) {
    float v[8];
    load8(L + g * 8, v);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t c = g * 8 + j;
      v[j] = grad_logit(p, rg, z_of(v[j], c), cw ? cw[c] : 1.0f, c == y);
    }
    store8(L + g * 8, v);
  }
  for (int64_t c = n8 * 8 + threadIdx.x; c < V; c += kThreads) {
    const float z = z_of(Ty<T>::f(L[c]), c);
    L[c] = Ty<T>::t(grad_logit(p, rg, z, cw ? cw[c] : 1.0f, c == y));
  }
}


// column sums of the chunk's d loss / d logits into fp32 grad_bias
template <class T>
__global__ void bias_grad_kernel(const T* dl, int64_t ld, int64_t n, int64_t V, int rows_per,
                                 float* gb) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= V) return;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per;
  const int64_t r1 = min(n, r0 + rows_per);
  float acc = 0.0f;
  for (int64_t r = r0; r < r1; ++r) acc += Ty<T>::f(dl[r * ld + c]);
  atomicAdd(gb + c, acc);
}

template <class T>
__global__ void scale_kernel(T* x, int64_t n, const float* __restrict__ scale) {
  const float g = *scale;
  const int64_t n8 = n / 8;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n8; i += stride) {
    float v[8];
    load8(x + i * 8, v);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] *= g;
    store8(x + i * 8, v);
  }
  for (int64_t i = n8 * 8 + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    x[i] = Ty<T>::t(Ty<T>::f(x[i]) * g);
}

__global__ void reduce_loss_kernel(const float* tok, int64_t N, const Scalars* sc, int mean,
                                   float* out) {
  __shared__ double sh[32];
  double a = 0.0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) a += double(tok[i]);
  for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = a;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int i = 0; i < int(blockDim.x >> 5); ++i) t += sh[i];
    out[0] = float(mean ? t / sc->denom : t);
  }
}

// ------------------------------------------------------------ cuBLASLt
struct GemmKey {
  int dev, ta, tb;
  int64_t m, n, k, lda, ldb, ldc;
  int at, ct;
  uint32_t al_a, al_b, al_c;  // pointer alignments (bytes, <= 256): the algorithm depends on them
  bool operator<(const GemmKey& o) const {
    return std::tie(dev, ta, tb, m, n, k, lda, ldb, ldc, at, ct, al_a, al_b, al_c) <
           std::tie(o.dev, o.ta, o.tb, o.m, o.n, o.k, o.lda, o.ldb, o.ldc, o.at, o.ct, o.al_a,
                    o.al_b, o.al_c);
  }
};

uint32_t alignment(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && (a % al) != 0) al >>= 1;
  return al;
}
struct GemmPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool have_algo = false;
};

struct LtState {
  std::map<int, cublasLtHandle_t> handles;
  std::map<GemmKey, GemmPlan> plans;  // small: a few shapes per model
  ~LtState() {
    for (auto& kv : plans) {
      cublasLtMatrixLayoutDestroy(kv.second.a);
      cublasLtMatrixLayoutDestroy(kv.second.b);
      cublasLtMatrixLayoutDestroy(kv.second.c);
      cublasLtMatmulDescDestroy(kv.second.desc);
    }
    // handles are left to process teardown (the driver may be gone already)
  }
};
thread_local LtState lt_state;

cublasLtHandle_t lt_handle(int dev) {
  auto it = lt_state.handles.find(dev);
  if (it != lt_state.handles.end()) return it->second;
  cublasLtHandle_t h;
  QF_CUBLAS_CHECK(cublasLtCreate(&h));
  lt_state.handles[dev] = h;
  return h;
}

// column-major D[m,n] = op(A)[m,k] op(B)[k,n] (+ beta D); fp32 compute
void gemm(int dev, cudaStream_t stream, bool ta, bool tb, int64_t m, int64_t n, int64_t k,
          const void* A, int64_t lda, const void* B, int64_t ldb, void* C, int64_t ldc,
          float beta, cudaDataType_t ab_type, cudaDataType_t c_type, void* ws,
          size_t ws_bytes) {
  if (m == 0 || n == 0) return;
  cublasLtHandle_t h = lt_handle(dev);
  GemmKey key{dev, ta, tb, m, n, k, lda, ldb, ldc, int(ab_type), int(c_type),
              alignment(A), alignment(B), alignment(C)};
  auto it = lt_state.plans.find(key);
  if (it == lt_state.plans.end()) {
    GemmPlan plan;
    QF_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    QF_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof(opa)));
    QF_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof(opb)));
    QF_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.a, ab_type, ta ? k : m, ta ? m : k, lda));
    QF_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.b, ab_type, tb ? n : k, tb ? k : n, ldb));
    QF_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.c, c_type, m, n, ldc));
    cublasLtMatmulPreference_t pref;
    QF_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    uint64_t wsb = ws_bytes;
    QF_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof(wsb)));
    QF_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &key.al_a, sizeof(uint32_t)));
    QF_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &key.al_b, sizeof(uint32_t)));
    QF_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &key.al_c, sizeof(uint32_t)));
    QF_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &key.al_c, sizeof(uint32_t)));
    constexpr int kMaxAlgos = 8;
    cublasLtMatmulHeuristicResult_t res[kMaxAlgos];
    int found = 0;
    cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(h, plan.desc, plan.a, plan.b, plan.c, plan.c,
                                                      pref, kMaxAlgos, res, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    if (st != CUBLAS_STATUS_SUCCESS || found == 0) {
      cublasLtMatrixLayoutDestroy(plan.a);
      cublasLtMatrixLayoutDestroy(plan.b);
      cublasLtMatrixLayoutDestroy(plan.c);
      cublasLtMatmulDescDestroy(plan.desc);
      throw RuntimeFailure(detail::concat("linear_cross_entropy: cuBLASLt has no algorithm for a ", m, "x", n,
                                          "x", k, " GEMM (status ", int(st), ")"));
    }
    plan.algo = res[0].algo;
    plan.have_algo = true;
    // Autotune once per shape among cuBLASLt's candidates, only where running a
    // candidate is harmless: beta = 0 (the output is fully rewritten by the final
    // call below) and not while a CUDA graph is being captured.
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    QF_CUDA_CHECK(cudaStreamIsCapturing(stream, &cap));
    const char* env = std::getenv("QFORGE_LCE_AUTOTUNE");
    if (found > 1 && beta == 0.0f && cap == cudaStreamCaptureStatusNone && !(env && env[0] == '0')) {
      cudaEvent_t e0, e1;
      QF_CUDA_CHECK(cudaEventCreate(&e0));
      QF_CUDA_CHECK(cudaEventCreate(&e1));
      const float one = 1.0f, zero = 0.0f;
      float best = 1e30f;
      for (int i = 0; i < found; ++i) {
        float ms = 0.0f;
        bool ok = true;
        for (int rep = 0; rep < 2 && ok; ++rep) {  // the first run warms up
          QF_CUDA_CHECK(cudaEventRecord(e0, stream));
          ok = cublasLtMatmul(h, plan.desc, &one, A, plan.a, B, plan.b, &zero, C, plan.c, C, plan.c,
                              &res[i].algo, ws, ws_bytes, stream) == CUBLAS_STATUS_SUCCESS;
          QF_CUDA_CHECK(cudaEventRecord(e1, stream));
        }
        QF_CUDA_CHECK(cudaEventSynchronize(e1));
        if (!ok) continue;
        QF_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
        if (ms < best) {
          best = ms;
          plan.algo = res[i].algo;
        }
      }
      cudaEventDestroy(e0);
      cudaEventDestroy(e1);
    }
    it = lt_state.plans.emplace(key, plan).first;
  }
  const GemmPlan& plan = it->second;
  const float alpha = 1.0f;
  QF_CUBLAS_CHECK(cublasLtMatmul(h, plan.desc, &alpha, A, plan.a, B, plan.b, &beta, C, plan.c, C,
                             plan.c, plan.have_algo ? &plan.algo : nullptr, ws, ws_bytes, stream));
}

template <class T>
void forward_cuda(const LceInputs& in, const LceOptions& opt, const LceOutputs& out, char* ws,
                  cudaStream_t stream) {
  const int64_t N = in.N, D = in.D, V = in.V;
  const int64_t chunk = effective_chunk(N, opt.chunk);
  const CudaWorkspaceLayout lay = cuda_workspace_layout(N, V, in.dtype, chunk);
  const int64_t ld = cuda_logits_ld(V);
  T* logits = reinterpret_cast<T*>(ws + lay.logits);
  float* tok_loss = opt.reduction == Reduction::None ? out.loss : reinterpret_cast<float*>(ws + lay.token_loss);
  Scalars* sc = reinterpret_cast<Scalars*>(ws + lay.scalars);
  void* lt_ws = ws + lay.cublas;
  int dev = 0;
  QF_CUDA_CHECK(cudaGetDevice(&dev));

  init_scalars<<<1, 1, 0, stream>>>(sc);
  prep_kernel<<<1, 1024, 0, stream>>>(in.labels, N, in.class_weight, V, opt.ignore_index, sc);
  QF_CUDA_CHECK(cudaGetLastError());
  if (opt.validate && N > 0) {
    Scalars host;
    QF_CUDA_CHECK(cudaMemcpyAsync(&host, sc, sizeof(Scalars), cudaMemcpyDeviceToHost, stream));
    QF_CUDA_CHECK(cudaStreamSynchronize(stream));
    if (host.bad) {
      int64_t value = 0;
      QF_CUDA_CHECK(cudaMemcpy(&value, in.labels + host.first_bad, sizeof(value), cudaMemcpyDeviceToHost));
      QF_CHECK(false, "linear_cross_entropy: labels[", host.first_bad, "] = ", value,
               " is out of range [0, ", V, ") and is not ignore_index (", opt.ignore_index, ")",
               host.bad > 1 ? detail::concat(" (", host.bad, " such labels)") : std::string());
    }
  }
  const bool want_grad = out.grad_hidden || out.grad_weight || out.grad_bias;
  const cudaDataType_t ty = Ty<T>::cuda;
  const cudaDataType_t gw_ty = out.grad_weight_dtype == DType::F32 ? CUDA_R_32F : ty;
  if (out.grad_bias) QF_CUDA_CHECK(cudaMemsetAsync(out.grad_bias, 0, V * sizeof(float), stream));
  if (out.grad_weight && N == 0)
    QF_CUDA_CHECK(cudaMemsetAsync(out.grad_weight, 0,
                                  V * D * (gw_ty == CUDA_R_32F ? 4 : 2), stream));
  const RowParams p = make_row_params(opt, V);
  const T* H = static_cast<const T*>(in.hidden);
  const T* W = static_cast<const T*>(in.weight);

  for (int64_t s = 0; s < N; s += chunk) {
    const int64_t n = std::min(chunk, N - s);
    // logits^T [V, n] (col-major, ld) = W^T(col-major D x V)^T . H_c (D x n)
    gemm(dev, stream, true, false, V, n, D, W, D, H + s * D, D, logits, ld, 0.0f, ty, ty, lt_ws,
         lay.cublas_bytes);
    row_kernel<T><<<unsigned(n), kThreads, 0, stream>>>(
        logits, ld, V, static_cast<const T*>(in.bias), in.labels + s, in.class_weight, sc, p,
        opt.ignore_index, int(opt.reduction), tok_loss + s, out.lse ? out.lse + s : nullptr,
        out.grad_scale ? out.grad_scale + s : nullptr, want_grad ? 1 : 0);
    QF_CUDA_CHECK(cudaGetLastError());
    if (!want_grad) continue;
    if (out.grad_bias) {
      const int rows_per = 64;
      dim3 grid(unsigned((V + 255) / 256), unsigned((n + rows_per - 1) / rows_per));
      bias_grad_kernel<T><<<grid, 256, 0, stream>>>(logits, ld, n, V, rows_per, out.grad_bias);
      QF_CUDA_CHECK(cudaGetLastError());
    }
    if (out.grad_hidden)  // grad_H^T [D, n] = W^T (D x V) . dL^T (V x n)
      gemm(dev, stream, false, false, D, n, V, W, D, logits, ld,
           static_cast<T*>(out.grad_hidden) + s * D, D, 0.0f, ty, ty, lt_ws, lay.cublas_bytes);
    if (out.grad_weight)  // grad_W^T [D, V] (+)= H_c (D x n) . dL (n x V)
      gemm(dev, stream, false, true, D, V, n, H + s * D, D, logits, ld, out.grad_weight, D,
           s == 0 ? 0.0f : 1.0f, ty, gw_ty, lt_ws, lay.cublas_bytes);
  }
  if (opt.reduction != Reduction::None) {
    reduce_loss_kernel<<<1, 1024, 0, stream>>>(tok_loss, N, sc, opt.reduction == Reduction::Mean,
                                               out.loss);
    QF_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace

void scale_inplace_cuda(void* x, DType dtype, int64_t n, const float* scale, void* stream) {
  cuda::require_cuda("scale_inplace");
  QF_CHECK(n >= 0, "scale_inplace: n must be >= 0");
  if (n == 0) return;
  QF_CHECK(x != nullptr && scale != nullptr, "scale_inplace: null pointer");
  const size_t esize = dtype == DType::F32 ? 4 : 2;
  QF_CHECK(reinterpret_cast<uintptr_t>(x) % (8 * esize) == 0 || n < 8,
           "scale_inplace: x must be ", 8 * esize, "-byte aligned");
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  int dev = 0;
  QF_CUDA_CHECK(cudaGetDevice(&dev));
  const int blocks = std::max(1, cuda::multiprocessor_count(dev) * 4);
  switch (dtype) {
    case DType::F32: scale_kernel<float><<<blocks, 512, 0, st>>>(static_cast<float*>(x), n, scale); break;
    case DType::BF16: scale_kernel<__nv_bfloat16><<<blocks, 512, 0, st>>>(static_cast<__nv_bfloat16*>(x), n, scale); break;
    case DType::F16: scale_kernel<__half><<<blocks, 512, 0, st>>>(static_cast<__half*>(x), n, scale); break;
  }
  QF_CUDA_CHECK(cudaGetLastError());
}

void lce_forward_cuda(const LceInputs& in, const LceOptions& opt, const LceOutputs& out,
                      void* workspace, int64_t workspace_bytes, void* stream) {
  cuda::require_cuda("linear_cross_entropy");
  lce_check(in, opt, out, workspace_bytes, Device::CUDA);
  QF_CHECK(workspace != nullptr, "linear_cross_entropy: workspace is null");
  QF_CHECK(reinterpret_cast<uintptr_t>(workspace) % 256 == 0,
           "linear_cross_entropy: workspace must be 256-byte aligned");
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  char* ws = static_cast<char*>(workspace);
  switch (in.dtype) {
    case DType::F32: forward_cuda<float>(in, opt, out, ws, st); break;
    case DType::BF16: forward_cuda<__nv_bfloat16>(in, opt, out, ws, st); break;
    case DType::F16: forward_cuda<__half>(in, opt, out, ws, st); break;
  }
}

}  // namespace qforge::loss
