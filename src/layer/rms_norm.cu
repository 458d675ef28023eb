// RMSNorm forward and backward on CUDA; rms_norm.cpp's CPU twin defines the
// results (rules.hpp holds the shared arithmetic).
//
// Bytes: the forward reads x once and writes y once (+ the weight, from
// cache, and 4 bytes of rstd per row); the backward reads x and dy once and
// writes dx once. A row is handled by one warp (rows up to 32 * kCache
// accesses) or one block: each thread keeps its kCache accesses of 16 bytes
// in registers between the reduction and the write, so the row is read from
// memory once; longer rows read the rest a second time (from cache).
#include "layer/rules.hpp"
#include "layer/vec.cuh"
#include "qforge/layer.hpp"

namespace qforge::layer {
namespace {

constexpr int kCache = 4;            // accesses per thread kept in registers
constexpr int kWarpBlockThreads = 256;  // 8 rows per block in warp-per-row mode

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the row's group: its warp, or the whole block (scratch: 32 floats).
template <bool kWarpPerRow>
__device__ __forceinline__ float group_sum(float v, float* scratch) {
  v = warp_sum(v);
  if constexpr (kWarpPerRow) {
    return v;
  } else {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // scratch is free (the previous row's readers are done)
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < int(blockDim.x / 32) ? scratch[lane] : 0.0f;
    return warp_sum(v);
  }
}

struct RowGroup {
  int64_t first, step;  // rows first, first + step, ...
  int lane, size;       // this thread's index in the row's group, and the group size
};

template <bool kWarpPerRow>
__device__ __forceinline__ RowGroup row_group() {
  if constexpr (kWarpPerRow) {
    const int warps = blockDim.x / 32;
    return {int64_t(blockIdx.x) * warps + threadIdx.x / 32, int64_t(gridDim.x) * warps,
            int(threadIdx.x % 32), 32};
  } else {
    return {int64_t(blockIdx.x), int64_t(gridDim.x), int(threadIdx.x), int(blockDim.x)};
  }
}

// One pass over this thread's accesses of a row of nvec: use(v, vals) with
// access v's values. The first kCache accesses keep theirs in cache[c]
// between passes (kFill: load them there); the rest are loaded anew.
template <bool kFill, class Vals, class Load, class Use>
__device__ __forceinline__ void row_pass(const RowGroup& g, int64_t nvec, Vals (&cache)[kCache], Load load,
                                         Use use) {
#pragma unroll
  for (int c = 0; c < kCache; ++c) {
    const int64_t v = g.lane + int64_t(c) * g.size;
    if (v < nvec) {
      if constexpr (kFill) load(v, cache[c]);
      use(v, cache[c]);
    }
  }
  for (int64_t v = g.lane + int64_t(kCache) * g.size; v < nvec; v += g.size) {
    Vals vals;
    load(v, vals);
    use(v, vals);
  }
}

template <typename T, typename W, int kVec, bool kWarpPerRow>
__global__ void rms_norm_forward_kernel(const T* x, const W* __restrict__ weight, T* y,
                                        float* __restrict__ rstd, int64_t rows, int64_t dim,
                                        float eps) {
  __shared__ float scratch[32];
  const RowGroup g = row_group<kWarpPerRow>();
  const int64_t nvec = dim / kVec;
  for (int64_t row = g.first; row < rows; row += g.step) {
    const T* xr = x + row * dim;
    T* yr = y + row * dim;
    auto load = [&](int64_t v, float (&f)[kVec]) { load_floats<T, kVec>(xr + v * kVec, f); };
    float cached[kCache][kVec];
    float sum_squares = 0.0f;
    row_pass<true>(g, nvec, cached, load, [&](int64_t, const float (&f)[kVec]) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) sum_squares += f[k] * f[k];
    });
    const float inv = rms_inverse(group_sum<kWarpPerRow>(sum_squares, scratch), dim, eps);
    if (g.lane == 0) rstd[row] = inv;
    row_pass<false>(g, nvec, cached, load, [&](int64_t v, const float (&f)[kVec]) {
      float w[kVec], out[kVec];
      load_floats<W, kVec>(weight + v * kVec, w);
#pragma unroll
      for (int k = 0; k < kVec; ++k) out[k] = w[k] * round_to<T>(f[k] * inv);
      store_floats<T, kVec>(yr + v * kVec, out);
    });
  }
}

template <typename T, typename W, int kVec, bool kWarpPerRow>
__global__ void rms_norm_backward_kernel(const T* dy, const T* x, const W* __restrict__ weight,
                                         const float* __restrict__ rstd, T* dx, int64_t rows,
                                         int64_t dim) {
  __shared__ float scratch[32];
  const RowGroup g = row_group<kWarpPerRow>();
  const int64_t nvec = dim / kVec;
  struct Vals {  // g = dy * weight and xhat = x * rstd of an access
    float gw[kVec], xhat[kVec];
  };
  for (int64_t row = g.first; row < rows; row += g.step) {
    const T* xr = x + row * dim;
    const T* dyr = dy + row * dim;
    T* dxr = dx + row * dim;
    const float inv = rstd[row];
    auto load = [&](int64_t v, Vals& a) {
      float w[kVec];
      load_floats<T, kVec>(dyr + v * kVec, a.gw);
      load_floats<T, kVec>(xr + v * kVec, a.xhat);
      load_floats<W, kVec>(weight + v * kVec, w);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        a.gw[k] *= w[k];
        a.xhat[k] *= inv;
      }
    };
    Vals cached[kCache];
    float sum_g_xhat = 0.0f;
    row_pass<true>(g, nvec, cached, load, [&](int64_t, const Vals& a) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) sum_g_xhat += a.gw[k] * a.xhat[k];
    });
    const float mean = group_sum<kWarpPerRow>(sum_g_xhat, scratch) / static_cast<float>(dim);
    row_pass<false>(g, nvec, cached, load, [&](int64_t v, const Vals& a) {
      float out[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) out[k] = rms_norm_dx(a.gw[k], a.xhat[k], inv, mean);
      store_floats<T, kVec>(dxr + v * kVec, out);
    });
  }
}

// The launch shape of a row kernel: warp per row for short rows, else a
// block per row with enough threads that kCache accesses each cover it, at
// most as many as the kernel's registers allow in one block
// (max_block_threads: cudaFuncAttributes::maxThreadsPerBlock).
struct RowLaunch {
  bool warp_per_row;
  int threads;
  int grid;
};

RowLaunch row_launch(int64_t rows, int64_t nvec, int max_block_threads) {
  if (nvec <= 32 * kCache) {
    const int64_t per_block = kWarpBlockThreads / 32;
    return {true, kWarpBlockThreads, grid_for((rows + per_block - 1) / per_block)};
  }
  const int64_t wanted = (nvec + kCache - 1) / kCache;
  const int64_t cap = std::max(32, max_block_threads / 32 * 32);
  const int threads = static_cast<int>(std::min<int64_t>(cap, (wanted + 31) / 32 * 32));
  return {false, threads, grid_for(rows)};
}

template <class Kernel>
int max_block_threads(Kernel kernel) {
  cudaFuncAttributes attr{};
  QF_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  return attr.maxThreadsPerBlock;
}

// Launches warp_kernel or block_kernel, as row_launch chooses, through launch(kernel, shape).
template <class Kernel, class Launch>
void launch_rows(int64_t rows, int64_t nvec, Kernel warp_kernel, Kernel block_kernel, Launch launch) {
  const bool warp_per_row = nvec <= 32 * kCache;
  const int max_threads = warp_per_row ? kWarpBlockThreads : max_block_threads(block_kernel);
  launch(warp_per_row ? warp_kernel : block_kernel, row_launch(rows, nvec, max_threads));
}

// Calls f(T{}, W{}, kVec constant): x's CUDA type, the weight's, and the
// vector width (16 bytes of T when the dim and every buffer allow, else 1).
template <class F>
void dispatch_row(const RmsNormArgs& a, std::initializer_list<const void*> buffers, F&& f) {
  with_float_type(a.x_dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int kVec16 = 16 / int(sizeof(T));
    bool vec = a.dim % kVec16 == 0 && aligned16(a.weight);
    for (const void* p : buffers) vec = vec && aligned16(p);
    auto with_weight = [&](auto vec_width) {
      if (a.weight_dtype == DType::F32) f(t, float{}, vec_width);
      else f(t, T{}, vec_width);
    };
    if (vec) with_weight(std::integral_constant<int, kVec16>{});
    else with_weight(std::integral_constant<int, 1>{});
  });
}

}  // namespace

void rms_norm_forward_cuda(const RmsNormArgs& a, float eps, void* y, float* rstd, void* stream) {
  cuda::require_cuda("rms_norm_forward on CUDA");
  dispatch_row(a, {a.x, y}, [&](auto t, auto w, auto vec_width) {
    using T = decltype(t);
    using W = decltype(w);
    constexpr int kVec = decltype(vec_width)::value;
    launch_rows(a.rows, a.dim / kVec, rms_norm_forward_kernel<T, W, kVec, true>,
                rms_norm_forward_kernel<T, W, kVec, false>, [&](auto kernel, const RowLaunch& l) {
                  kernel<<<l.grid, l.threads, 0, static_cast<cudaStream_t>(stream)>>>(
                      static_cast<const T*>(a.x), static_cast<const W*>(a.weight), static_cast<T*>(y), rstd,
                      a.rows, a.dim, eps);
                });
  });
  QF_CUDA_CHECK(cudaGetLastError());
}

void rms_norm_backward_cuda(const RmsNormArgs& a, const void* dy, const float* rstd, void* dx,
                            void* stream) {
  cuda::require_cuda("rms_norm_backward on CUDA");
  dispatch_row(a, {a.x, dy, dx}, [&](auto t, auto w, auto vec_width) {
    using T = decltype(t);
    using W = decltype(w);
    constexpr int kVec = decltype(vec_width)::value;
    launch_rows(a.rows, a.dim / kVec, rms_norm_backward_kernel<T, W, kVec, true>,
                rms_norm_backward_kernel<T, W, kVec, false>, [&](auto kernel, const RowLaunch& l) {
                  kernel<<<l.grid, l.threads, 0, static_cast<cudaStream_t>(stream)>>>(
                      static_cast<const T*>(dy), static_cast<const T*>(a.x), static_cast<const W*>(a.weight),
                      rstd, static_cast<T*>(dx), a.rows, a.dim);
                });
  });
  QF_CUDA_CHECK(cudaGetLastError());
}

}  // namespace qforge::layer
