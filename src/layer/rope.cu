// Rotary position embeddings on CUDA, forward and backward, in place or out
// of place; rope.cpp's CPU twin defines the results (rules.hpp holds the
// shared arithmetic).
//
// Bytes: x is read once and written once; cos and sin ([seq, head_dim] per
// batch row or shared) are read once per kHeads heads, mostly from cache.
// A thread takes one 16-byte vector of the first half of a head and the
// matching vector of the second half, for kHeads consecutive heads of one
// token, so it loads its cos/sin vectors once for all of them; consecutive
// lanes take consecutive vectors of a head.
#include "layer/rules.hpp"
#include "layer/vec.cuh"
#include "qforge/layer.hpp"

namespace qforge::layer {
namespace {

constexpr int kThreads = 256;
constexpr int kHeads = 4;

struct RopeShape {
  int64_t tokens, seq, heads, head_dim;  // tokens = batch * seq
  bool cos_per_batch;                    // cos/sin have the batch dimension (else shared)
};

template <typename T, typename C, int kVec>
__global__ void __launch_bounds__(kThreads)
rope_kernel(const T* x, T* out, const C* __restrict__ cos, const C* __restrict__ sin, RopeShape s,
            bool backward) {
  const int64_t half = s.head_dim / 2;
  const int64_t chunks = half / kVec;
  const int64_t groups = (s.heads + kHeads - 1) / kHeads;
  const int64_t total = s.tokens * groups * chunks;
  for (int64_t id = int64_t(blockIdx.x) * kThreads + threadIdx.x; id < total;
       id += int64_t(gridDim.x) * kThreads) {
    const int64_t j = id % chunks, rest = id / chunks;
    const int64_t group = rest % groups, token = rest / groups;
    const int64_t cs = ((s.cos_per_batch ? token : token % s.seq) * s.head_dim) + j * kVec;
    float c1[kVec], s1[kVec], c2[kVec], s2[kVec];
    load_floats<C, kVec>(cos + cs, c1);
    load_floats<C, kVec>(sin + cs, s1);
    load_floats<C, kVec>(cos + cs + half, c2);
    load_floats<C, kVec>(sin + cs + half, s2);
    float x1[kHeads][kVec], x2[kHeads][kVec];
#pragma unroll
    for (int u = 0; u < kHeads; ++u) {
      const int64_t h = group * kHeads + u;
      if (h < s.heads) {
        const int64_t base = (token * s.heads + h) * s.head_dim + j * kVec;
        load_floats<T, kVec>(x + base, x1[u]);
        load_floats<T, kVec>(x + base + half, x2[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kHeads; ++u) {
      const int64_t h = group * kHeads + u;
      if (h < s.heads) {
        float o1[kVec], o2[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k)
          rope_pair(x1[u][k], x2[u][k], c1[k], s1[k], c2[k], s2[k], backward, o1[k], o2[k]);
        const int64_t base = (token * s.heads + h) * s.head_dim + j * kVec;
        store_floats<T, kVec>(out + base, o1);
        store_floats<T, kVec>(out + base + half, o2);
      }
    }
  }
}

}  // namespace

void rope_cuda(const RopeArgs& a, bool backward, void* stream) {
  cuda::require_cuda("rope on CUDA");
  auto st = static_cast<cudaStream_t>(stream);
  const RopeShape shape{a.batch * a.seq, a.seq, a.heads, a.head_dim, a.cos_batch != 1};
  with_float_type(a.dtype, [&](auto t) {
    using T = decltype(t);
    auto launch = [&](auto c) {
      using C = decltype(c);
      constexpr int kVec16 = 16 / int(sizeof(T));
      const bool vec = (a.head_dim / 2) % kVec16 == 0 && aligned16(a.x) && aligned16(a.out) &&
                       aligned16(a.cos) && aligned16(a.sin);
      const int64_t chunks = a.head_dim / 2 / (vec ? kVec16 : 1);
      const int64_t work = shape.tokens * ((a.heads + kHeads - 1) / kHeads) * chunks;
      const int grid = grid_for((work + kThreads - 1) / kThreads);
      auto kernel = vec ? rope_kernel<T, C, kVec16> : rope_kernel<T, C, 1>;
      kernel<<<grid, kThreads, 0, st>>>(static_cast<const T*>(a.x), static_cast<T*>(a.out),
                                        static_cast<const C*>(a.cos), static_cast<const C*>(a.sin),
                                        shape, backward);
    };
    if (a.cos_dtype == DType::F32) launch(float{});
    else launch(T{});
  });
  QF_CUDA_CHECK(cudaGetLastError());
}

}  // namespace qforge::layer
