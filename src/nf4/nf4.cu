// CUDA kernels for NF4. Their meaning is defined by the CPU twins in
// nf4.cpp; both use the per-element rules of rules.hpp.
//
// dequantize: memory-bound. Per weight element it reads 0.5 byte of codes
// (+ 1/blocksize of a byte or float of absmax) and writes sizeof(T) bytes, so
// the floor is (numel/2 + numel*sizeof(T)) bytes at copy bandwidth. One
// kernel does the whole double dequant: per 32-bit word of codes (8
// elements, always inside one quant block since blocksize >= 32) a thread
// decodes its absmax from the 8-bit code, nested absmax and offset, then
// the 8 levels, scales in fp32, rounds to T and writes one 16-byte store;
// consecutive lanes take consecutive words, so loads and stores coalesce.
// fp32 words are 32 bytes of output: the warp trades halves of words by
// shuffles so that each store instruction still covers 512 dense bytes.
//
// quantize: bitsandbytes builds its kernels with --use_fast_math, so its
// 1/absmax is the approximate reciprocal (rcp.approx.ftz). The CUDA quantizer
// uses the same instruction, to write the same bytes as bitsandbytes on a GPU;
// the CPU twin divides exactly, as bitsandbytes' CPU backend does. The two
// reciprocals differ by at most one ulp, which moves an element to the
// neighbouring level only when its scaled value sits on a level midpoint.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "core/cuda_check.cuh"
#include "core/float_cuda.cuh"
#include "nf4/rules.hpp"
#include "qforge/cuda_runtime.hpp"
#include "qforge/nf4.hpp"

namespace qforge::nf4 {
namespace {

// Measured on an H100 (bench/results/nf4_dequant.json and the sweep in the
// commit that set them): 4 words in flight per thread at full occupancy (8
// blocks of 256 threads per SM, so at most 32 registers) beat 8 or 16 words
// at 4-6 blocks per SM: 0.90 of copy bandwidth on large weights against 0.83-0.88.
constexpr int kThreads = 256;
// Full occupancy: as many 256-thread blocks as the SM holds threads
// (2048 on sm_80/sm_90, 1536 on sm_86/sm_89, 1024 on sm_75).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 750
constexpr int kMinBlocksPerSM = 4;
#elif defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 860 || __CUDA_ARCH__ == 870 || __CUDA_ARCH__ == 890)
constexpr int kMinBlocksPerSM = 6;
#else
constexpr int kMinBlocksPerSM = 8;
#endif
constexpr int kElemsPerWord = 8;   // 4 bytes of codes

// 32-bit words of codes in flight per thread: 4 at full occupancy for
// fp16/bf16 outputs (above). fp32 outputs write twice the bytes per word;
// measured on an H200 (13824x5120, the commit that set it): 8 words at half
// occupancy (up to 64 registers) with streaming stores took 92.7 us against 100.1
// us for 4 at full occupancy, 96.0 for 8 without streaming stores and 96.3 for
// 4 with them (bitsandbytes: 96.4 us).
template <typename T>
constexpr int kWordsPerThread = sizeof(T) == 4 ? 8 : 4;

struct DequantParams {
  const uint8_t* packed;
  int64_t numel;
  int log2_blocksize;
  const float* code;
  const float* absmax_f32;  // plain absmax, or
  const uint8_t* absmax_u8; // double-quantized absmax ...
  const float* nested_absmax;
  const float* nested_code;
  const float* nested_offset;
  int log2_nested_blocksize;
};

int log2_exact(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

// Codes are read once: stream them past L1 and ask L2 for 256-byte sectors.
__device__ __forceinline__ uint32_t load_codes(const uint32_t* p) {
  uint32_t v;
#if __CUDA_ARCH__ >= 800
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.u32 %0, [%1];" : "=r"(v) : "l"(p));
#else
  v = __ldcs(p);
#endif
  return v;
}

template <bool kNested>
__device__ __forceinline__ float block_scale(const DequantParams& p, int64_t block,
                                             const float* s_nested_code, float offset) {
  if constexpr (kNested) {
    const uint8_t q = __ldg(p.absmax_u8 + block);
    const float nested = __ldg(p.nested_absmax + (block >> p.log2_nested_blocksize));
    return nested_absmax_value(s_nested_code, q, nested, offset);
  } else {
    return __ldg(p.absmax_f32 + block);
  }
}

template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

// 8 consecutive elements (one 32-bit word of codes) -> out[0..7] as one
// 16-byte store (fp16/bf16), 16B-aligned.
template <typename T>
__device__ __forceinline__ void decode_word(uint32_t word, float scale, const float* s_code,
                                            T* out) {
  float v[8];
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    const uint32_t byte = (word >> (8 * b)) & 0xffu;
    v[2 * b] = s_code[byte >> 4] * scale;
    v[2 * b + 1] = s_code[byte & 0x0fu] * scale;
  }
  *reinterpret_cast<uint4*>(out) = make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]),
                                              pack2<T>(v[4], v[5]), pack2<T>(v[6], v[7]));
}

// fp32 output: a word's 8 floats are 32 bytes, two 16-byte stores. Were each
// lane to store its own word, a warp's store would cover 1024 bytes at half
// density (every other 16 bytes), twice; instead the warp's 32 consecutive
// words (first = the first one's index) go out as two dense 512-byte
// stores: in store h, lane l writes half (l & 1) of word 16 h + l / 2,
// fetched with a shuffle. All 32 lanes must call it; words >= vec_words are
// skipped.
__device__ __forceinline__ void decode_warp_words_f32(uint32_t word, float scale, const float* s_code,
                                                      float* out, int64_t first, int64_t vec_words) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int src = 16 * h + (lane >> 1);
    const uint32_t w = __shfl_sync(0xffffffffu, word, src);
    const float sc = __shfl_sync(0xffffffffu, scale, src);
    if (first + src < vec_words) {
      const uint32_t two_bytes = w >> (16 * (lane & 1));  // elements 0-3 or 4-7 of the word
      const uint32_t b0 = two_bytes & 0xffu, b1 = (two_bytes >> 8) & 0xffu;
      // written once, read by a later kernel: stream it past the caches (st.global.cs)
      __stcs(reinterpret_cast<float4*>(out + (first + src) * kElemsPerWord + 4 * (lane & 1)),
             make_float4(s_code[b0 >> 4] * sc, s_code[b0 & 0x0fu] * sc, s_code[b1 >> 4] * sc,
                         s_code[b1 & 0x0fu] * sc));
    }
  }
}

template <typename T, bool kNested>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM * 4 / kWordsPerThread<T>)
dequantize_nf4_kernel(DequantParams p, T* __restrict__ out, int64_t vec_words) {
  constexpr int kUnroll = kWordsPerThread<T>;
  __shared__ float s_code[16];
  __shared__ float s_nested_code[kNested ? 256 : 1];
  if (threadIdx.x < 16) s_code[threadIdx.x] = p.code[threadIdx.x];
  if constexpr (kNested)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s_nested_code[i] = p.nested_code[i];
  const float offset = kNested ? __ldg(p.nested_offset) : 0.0f;
  __syncthreads();

  // Thread t of a step handles words base + u * kThreads: a warp's loads are
  // 128 contiguous bytes and its 16-byte stores 512 contiguous bytes. The
  // loop runs while the warp's first word is in range (base - lane is the
  // same for the whole warp), so the fp32 path's shuffles see every lane.
  const uint32_t* codes = reinterpret_cast<const uint32_t*>(p.packed);
  const int lane = threadIdx.x & 31;
  const int64_t stride = int64_t(gridDim.x) * kThreads * kUnroll;
  for (int64_t base = int64_t(blockIdx.x) * kThreads * kUnroll + threadIdx.x; base - lane < vec_words;
       base += stride) {
    uint32_t raw[kUnroll];
    float scale[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t w = base + u * kThreads;
      raw[u] = w < vec_words ? load_codes(codes + w) : 0u;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t w = base + u * kThreads;
      scale[u] = w < vec_words ? block_scale<kNested>(p, (w * kElemsPerWord) >> p.log2_blocksize,
                                                      s_nested_code, offset)
                               : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t w = base + u * kThreads;
      if constexpr (sizeof(T) == 4) {
        if (w - lane < vec_words) decode_warp_words_f32(raw[u], scale[u], s_code, out, w - lane, vec_words);
      } else {
        if (w < vec_words) decode_word(raw[u], scale[u], s_code, out + w * kElemsPerWord);
      }
    }
  }

  // Elements the vector loop did not cover (the last < 8, or all of them
  // when a buffer is not 16-byte aligned): one element per thread.
  const int64_t threads = int64_t(gridDim.x) * kThreads;
  for (int64_t i = vec_words * kElemsPerWord + int64_t(blockIdx.x) * kThreads + threadIdx.x;
       i < p.numel; i += threads) {
    const uint8_t byte = p.packed[i >> 1];
    const uint8_t level = (i & 1) ? (byte & 0x0f) : (byte >> 4);
    const float scale = block_scale<kNested>(p, i >> p.log2_blocksize, s_nested_code, offset);
    out[i] = from_float<T>(s_code[level] * scale);
  }
}

// Blocks resident per SM for a kernel, cached per device (grid sized to the GPU).
template <class Kernel>
int resident_grid(Kernel kernel, int threads) {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};
  const int device = cuda::current_device();
  int& slot = cache[device % kMaxDevices];
  if (slot == 0) {
    int per_sm = 0;
    QF_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
    slot = std::max(1, per_sm) * cuda::multiprocessor_count(device);
  }
  return slot;
}

template <typename T, bool kNested>
void launch_dequantize(const DequantParams& p, void* out, cudaStream_t stream) {
  const bool aligned = reinterpret_cast<uintptr_t>(p.packed) % 4 == 0 &&
                       reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const int64_t vec_words = aligned ? p.numel / kElemsPerWord : 0;
  constexpr int kUnroll = kWordsPerThread<T>;
  const int64_t work = vec_words > 0 ? (vec_words + kThreads * kUnroll - 1) / (kThreads * kUnroll)
                                     : (p.numel + kThreads - 1) / kThreads;
  auto kernel = dequantize_nf4_kernel<T, kNested>;
  const int grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(work, resident_grid(kernel, kThreads))));
  kernel<<<grid, kThreads, 0, stream>>>(p, static_cast<T*>(out), vec_words);
  QF_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void dispatch_nested(const DequantParams& p, void* out, cudaStream_t stream) {
  if (p.absmax_u8) launch_dequantize<T, true>(p, out, stream);
  else launch_dequantize<T, false>(p, out, stream);
}

// ------------------------------------------------------------- quantize
// bitsandbytes' 1.0f / absmax under --use_fast_math (flushes denormals too).
__device__ __forceinline__ float fast_reciprocal(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

// x * y with denormal results flushed, as bitsandbytes' fast-math multiply.
__device__ __forceinline__ float mul_ftz(float x, float y) {
  float r;
  asm("mul.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(x), "f"(y));
  return r;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// One warp per quant block of `blocksize` values value(i), i < n: writes the
// block's absmax (max |value|, NaN ignored), then calls
// emit(begin, end, lane, 1/absmax) to quantize the block.
template <class Value, class Emit>
__device__ __forceinline__ void for_each_block_per_warp(int64_t n, int blocksize, float* absmax,
                                                        Value value, Emit emit) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / 32;
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  for (int64_t b = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; b < blocks; b += warps) {
    const int64_t begin = b * blocksize, end = min(n, begin + blocksize);
    float m = 0.0f;
    for (int64_t i = begin + lane; i < end; i += 32) m = fmaxf(m, fabsf(value(i)));
    m = warp_max(m);
    if (lane == 0) absmax[b] = m;
    emit(begin, end, lane, fast_reciprocal(m));  // all-zero block: inf, 0 * inf = NaN -> level 0
  }
}

template <typename T>
__global__ void quantize_nf4_kernel(const T* __restrict__ x, int64_t numel, int blocksize,
                                    uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  auto value = [&](int64_t i) { return to_float(x[i]); };
  for_each_block_per_warp(numel, blocksize, absmax, value,
                          [&](int64_t begin, int64_t end, int lane, float inv) {
    for (int64_t i = begin + 2 * lane; i < end; i += 64) {
      const uint8_t hi = nf4_level(mul_ftz(value(i), inv));
      const uint8_t lo = nf4_level(mul_ftz(i + 1 < end ? value(i + 1) : 0.0f, inv));
      packed[i >> 1] = static_cast<uint8_t>(hi << 4 | lo);
    }
  });
}

__global__ void quantize_blockwise_8bit_kernel(const float* __restrict__ x, int64_t n,
                                               const float* offset, const float* code,
                                               int blocksize, uint8_t* __restrict__ q,
                                               float* __restrict__ absmax) {
  __shared__ float s_code[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) s_code[i] = code[i];
  __syncthreads();
  const float shift = offset ? *offset : 0.0f;
  auto value = [&](int64_t i) { return x[i] - shift; };
  for_each_block_per_warp(n, blocksize, absmax, value,
                          [&](int64_t begin, int64_t end, int lane, float inv) {
    for (int64_t i = begin + lane; i < end; i += 32) q[i] = code8_index(s_code, mul_ftz(value(i), inv));
  });
}

int warp_grid(int64_t blocks, int threads) {
  const int64_t warps_per_cta = threads / 32;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((blocks + warps_per_cta - 1) / warps_per_cta, 65535)));
}

}  // namespace

void dequantize_cuda(const Weights& w, void* out, DType out_dtype, void* stream) {
  cuda::require_cuda("dequantize_nf4 on CUDA");
  DequantParams p{};
  p.packed = w.packed;
  p.numel = w.numel;
  p.log2_blocksize = log2_exact(w.blocksize);
  p.code = w.code;
  if (w.nested) {
    p.absmax_u8 = static_cast<const uint8_t*>(w.absmax);
    p.nested_absmax = w.nested_absmax;
    p.nested_code = w.nested_code;
    p.nested_offset = w.nested_offset;
    p.log2_nested_blocksize = log2_exact(w.nested_blocksize);
  } else {
    p.absmax_f32 = static_cast<const float*>(w.absmax);
  }
  auto s = static_cast<cudaStream_t>(stream);
  switch (out_dtype) {
    case DType::F16: return dispatch_nested<__half>(p, out, s);
    case DType::BF16: return dispatch_nested<__nv_bfloat16>(p, out, s);
    default: return dispatch_nested<float>(p, out, s);
  }
}

void quantize_cuda(const void* x, DType x_dtype, int64_t numel, int32_t blocksize,
                   uint8_t* packed, float* absmax, void* stream) {
  cuda::require_cuda("quantize_nf4 on CUDA");
  constexpr int threads = 256;
  const int grid = warp_grid(num_blocks(numel, blocksize), threads);
  auto s = static_cast<cudaStream_t>(stream);
  switch (x_dtype) {
    case DType::F16:
      quantize_nf4_kernel<<<grid, threads, 0, s>>>(static_cast<const __half*>(x), numel, blocksize, packed, absmax);
      break;
    case DType::BF16:
      quantize_nf4_kernel<<<grid, threads, 0, s>>>(static_cast<const __nv_bfloat16*>(x), numel, blocksize, packed, absmax);
      break;
    default:
      quantize_nf4_kernel<<<grid, threads, 0, s>>>(static_cast<const float*>(x), numel, blocksize, packed, absmax);
  }
  QF_CUDA_CHECK(cudaGetLastError());
}

void quantize_blockwise_8bit_cuda(const float* x, int64_t n, const float* offset,
                                  const float* code, int32_t blocksize, uint8_t* q, float* absmax,
                                  void* stream) {
  cuda::require_cuda("quantize_blockwise_8bit on CUDA");
  constexpr int threads = 256;
  const int grid = warp_grid(num_blocks(n, blocksize), threads);
  quantize_blockwise_8bit_kernel<<<grid, threads, 0, static_cast<cudaStream_t>(stream)>>>(
      x, n, offset, code, blocksize, q, absmax);
  QF_CUDA_CHECK(cudaGetLastError());
}

}  // namespace qforge::nf4
