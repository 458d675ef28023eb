// SwiGLU forward and backward on CUDA; swiglu.cpp's CPU twin defines the
// results (rules.hpp holds the shared arithmetic).
//
// Bytes: the forward reads gate and up and writes out (3 passes of n
// elements); the backward reads dout, gate and up and writes dgate and dup
// (5), in place over gate and up when the caller asks. One elementwise
// kernel serves both: each thread loads kUnroll 16-byte vectors of every
// input before it computes and stores (outputs may alias inputs, so the
// compiler could not hoist later loads over earlier stores itself);
// consecutive lanes take consecutive vectors.
#include "layer/rules.hpp"
#include "layer/vec.cuh"
#include "qforge/layer.hpp"

namespace qforge::layer {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 2;

template <typename T, int kIn, int kOut>
struct Buffers {
  const T* in[kIn];
  T* out[kOut];
};

struct SwigluForward {  // in: gate, up; out: out
  static constexpr int kIn = 2, kOut = 1;
  template <typename T>
  __device__ static void apply(const float (&in)[kIn], float (&out)[kOut]) {
    out[0] = round_to<T>(silu(in[0])) * in[1];
  }
};

struct SwigluBackward {  // in: dout, gate, up; out: dgate, dup
  static constexpr int kIn = 3, kOut = 2;
  template <typename T>
  __device__ static void apply(const float (&in)[kIn], float (&out)[kOut]) {
    swiglu_grads(in[1], in[2], in[0], out[0], out[1]);
  }
};

// N consecutive elements from element i of every input to every output.
template <typename T, int N, class Op>
__device__ __forceinline__ void compute_store(const Buffers<T, Op::kIn, Op::kOut>& b, int64_t i,
                                              const float (&in)[Op::kIn][N]) {
  float out[Op::kOut][N];
#pragma unroll
  for (int k = 0; k < N; ++k) {
    float x[Op::kIn], y[Op::kOut];
#pragma unroll
    for (int a = 0; a < Op::kIn; ++a) x[a] = in[a][k];
    Op::template apply<T>(x, y);
#pragma unroll
    for (int o = 0; o < Op::kOut; ++o) out[o][k] = y[o];
  }
#pragma unroll
  for (int o = 0; o < Op::kOut; ++o) store_floats<T, N>(b.out[o] + i, out[o]);
}

template <typename T, int kVec, class Op>
__global__ void __launch_bounds__(kThreads)
elementwise_kernel(Buffers<T, Op::kIn, Op::kOut> b, int64_t n) {
  const int64_t nvec = n / kVec;
  const int64_t step = int64_t(gridDim.x) * kThreads * kUnroll;
  for (int64_t base = int64_t(blockIdx.x) * kThreads * kUnroll + threadIdx.x; base < nvec;
       base += step) {
    float in[kUnroll][Op::kIn][kVec];
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) {
      const int64_t v = base + r * kThreads;
      if (v < nvec)
#pragma unroll
        for (int a = 0; a < Op::kIn; ++a) load_floats<T, kVec>(b.in[a] + v * kVec, in[r][a]);
    }
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) {
      const int64_t v = base + r * kThreads;
      if (v < nvec) compute_store<T, kVec, Op>(b, v * kVec, in[r]);
    }
  }
  // the last n % kVec elements, one per thread
  const int64_t threads = int64_t(gridDim.x) * kThreads;
  for (int64_t i = nvec * kVec + int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += threads) {
    float in[Op::kIn][1];
#pragma unroll
    for (int a = 0; a < Op::kIn; ++a) in[a][0] = to_float(b.in[a][i]);
    compute_store<T, 1, Op>(b, i, in);
  }
}

template <typename T, class Op>
void launch_elementwise(const Buffers<T, Op::kIn, Op::kOut>& b, int64_t n, cudaStream_t stream) {
  constexpr int kVec16 = 16 / int(sizeof(T));
  bool vec = true;
  for (const T* p : b.in) vec = vec && aligned16(p);
  for (T* p : b.out) vec = vec && aligned16(p);
  const int64_t per_block = int64_t(kThreads) * kUnroll * (vec ? kVec16 : 1);
  const int grid = grid_for((n + per_block - 1) / per_block);
  if (vec) elementwise_kernel<T, kVec16, Op><<<grid, kThreads, 0, stream>>>(b, n);
  else elementwise_kernel<T, 1, Op><<<grid, kThreads, 0, stream>>>(b, n);
  QF_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void swiglu_forward_cuda(const void* gate, const void* up, DType dtype, int64_t n, void* out, void* stream) {
  cuda::require_cuda("swiglu_forward on CUDA");
  with_float_type(dtype, [&](auto t) {
    using T = decltype(t);
    const Buffers<T, 2, 1> b{{static_cast<const T*>(gate), static_cast<const T*>(up)},
                             {static_cast<T*>(out)}};
    launch_elementwise<T, SwigluForward>(b, n, static_cast<cudaStream_t>(stream));
  });
}

void swiglu_backward_cuda(const void* dout, const void* gate, const void* up, DType dtype, int64_t n, void* dgate,
                          void* dup, void* stream) {
  cuda::require_cuda("swiglu_backward on CUDA");
  with_float_type(dtype, [&](auto t) {
    using T = decltype(t);
    const Buffers<T, 3, 2> b{
        {static_cast<const T*>(dout), static_cast<const T*>(gate), static_cast<const T*>(up)},
        {static_cast<T*>(dgate), static_cast<T*>(dup)}};
    launch_elementwise<T, SwigluBackward>(b, n, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace qforge::layer
