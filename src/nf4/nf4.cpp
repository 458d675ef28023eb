// NF4 storage: validation, the CPU twins of the CUDA kernels, and dispatch.
#include "qforge/nf4.hpp"

#include <algorithm>
#include <cmath>

#include "core/float_io.hpp"
#include "core/half.hpp"
#include "nf4/rules.hpp"
#include "qforge/cuda_runtime.hpp"
#include "qforge/error.hpp"

namespace qforge::nf4 {

const float kCode[16] = {-1.0f,
                         -0.6961928009986877f,
                         -0.5250730514526367f,
                         -0.39491748809814453f,
                         -0.28444138169288635f,
                         -0.18477343022823334f,
                         -0.09105003625154495f,
                         0.0f,
                         0.07958029955625534f,
                         0.16093020141124725f,
                         0.24611230194568634f,
                         0.33791524171829224f,
                         0.44070982933044434f,
                         0.5626170039176941f,
                         0.7229568362236023f,
                         1.0f};

// bitsandbytes.functional.create_dynamic_map() as float32, in exact hex form
const float kDynamicMap[256] = {
    -0x1.fc6666p-1f, -0x1.f53334p-1f, -0x1.eep-1f, -0x1.e6ccccp-1f, -0x1.df999ap-1f,
    -0x1.d86666p-1f, -0x1.d13334p-1f, -0x1.cap-1f, -0x1.c2ccccp-1f, -0x1.bb999ap-1f,
    -0x1.b46666p-1f, -0x1.ad3334p-1f, -0x1.a6p-1f, -0x1.9eccccp-1f, -0x1.97999ap-1f,
    -0x1.906666p-1f, -0x1.893334p-1f, -0x1.82p-1f, -0x1.7accccp-1f, -0x1.73999ap-1f,
    -0x1.6c6668p-1f, -0x1.653334p-1f, -0x1.5ep-1f, -0x1.56ccccp-1f, -0x1.4f999ap-1f,
    -0x1.486668p-1f, -0x1.413334p-1f, -0x1.3ap-1f, -0x1.32ccccp-1f, -0x1.2b999ap-1f,
    -0x1.246668p-1f, -0x1.1d3334p-1f, -0x1.16p-1f, -0x1.0eccccp-1f, -0x1.079998p-1f,
    -0x1.006666p-1f, -0x1.f26664p-2f, -0x1.e4p-2f, -0x1.d59998p-2f, -0x1.c73334p-2f,
    -0x1.b8ccccp-2f, -0x1.aa6666p-2f, -0x1.9cp-2f, -0x1.8d9998p-2f, -0x1.7f3334p-2f,
    -0x1.70ccccp-2f, -0x1.626666p-2f, -0x1.54p-2f, -0x1.459998p-2f, -0x1.373334p-2f,
    -0x1.28ccccp-2f, -0x1.1a6668p-2f, -0x1.0cp-2f, -0x1.fb3332p-3f, -0x1.de6666p-3f,
    -0x1.c1999ap-3f, -0x1.a4ccccp-3f, -0x1.88p-3f, -0x1.6b3334p-3f, -0x1.4e6666p-3f,
    -0x1.31999ap-3f, -0x1.14ccccp-3f, -0x1.fp-4f, -0x1.b66668p-4f, -0x1.93d70ap-4f,
    -0x1.8851eep-4f, -0x1.7ccccep-4f, -0x1.7147aep-4f, -0x1.65c29p-4f, -0x1.5a3d7p-4f,
    -0x1.4eb854p-4f, -0x1.433334p-4f, -0x1.37ae14p-4f, -0x1.2c28f6p-4f, -0x1.20a3d6p-4f,
    -0x1.151ebap-4f, -0x1.09999ap-4f, -0x1.fc28f6p-5f, -0x1.e51ebap-5f, -0x1.ce147ap-5f,
    -0x1.b70a3ep-5f, -0x1.ap-5f, -0x1.88f5c2p-5f, -0x1.71eb86p-5f, -0x1.5ae146p-5f,
    -0x1.43d70ap-5f, -0x1.2ccccep-5f, -0x1.15c29p-5f, -0x1.fd70a4p-6f, -0x1.cf5c2ap-6f,
    -0x1.a147aep-6f, -0x1.733334p-6f, -0x1.451ebap-6f, -0x1.170a3ep-6f, -0x1.d1eb86p-7f,
    -0x1.75c29p-7f, -0x1.3e76c8p-7f, -0x1.2c083p-7f, -0x1.19999ap-7f, -0x1.072b02p-7f,
    -0x1.e978d4p-8f, -0x1.c49ba6p-8f, -0x1.9fbe76p-8f, -0x1.7ae148p-8f, -0x1.56041ap-8f,
    -0x1.3126e8p-8f, -0x1.0c49bap-8f, -0x1.ced914p-9f, -0x1.851eb8p-9f, -0x1.3b645ap-9f,
    -0x1.e353f8p-10f, -0x1.4fdf3ap-10f, -0x1.eecbfep-11f, -0x1.b3d07cp-11f, -0x1.78d5p-11f,
    -0x1.3dd982p-11f, -0x1.02de02p-11f, -0x1.8fc506p-12f, -0x1.19ce0ap-12f, -0x1.47ae16p-13f,
    -0x1.743e96p-14f, -0x1.15df66p-14f, -0x1.6f0068p-15f, -0x1.64840cp-16f, -0x1.040bfep-17f,
    -0x1.b43528p-19f, -0x1.27476ep-21f, 0.0f, 0x1.27476ep-21f, 0x1.b43528p-19f,
    0x1.040bfep-17f, 0x1.64840cp-16f, 0x1.6f0068p-15f, 0x1.15df66p-14f, 0x1.743e96p-14f,
    0x1.47ae16p-13f, 0x1.19ce0ap-12f, 0x1.8fc506p-12f, 0x1.02de02p-11f, 0x1.3dd982p-11f,
    0x1.78d5p-11f, 0x1.b3d07cp-11f, 0x1.eecbfep-11f, 0x1.4fdf3ap-10f, 0x1.e353f8p-10f,
    0x1.3b645ap-9f, 0x1.851eb8p-9f, 0x1.ced914p-9f, 0x1.0c49bap-8f, 0x1.3126e8p-8f,
    0x1.56041ap-8f, 0x1.7ae148p-8f, 0x1.9fbe76p-8f, 0x1.c49ba6p-8f, 0x1.e978d4p-8f,
    0x1.072b02p-7f, 0x1.19999ap-7f, 0x1.2c083p-7f, 0x1.3e76c8p-7f, 0x1.75c29p-7f,
    0x1.d1eb86p-7f, 0x1.170a3ep-6f, 0x1.451ebap-6f, 0x1.733334p-6f, 0x1.a147aep-6f,
    0x1.cf5c2ap-6f, 0x1.fd70a4p-6f, 0x1.15c29p-5f, 0x1.2ccccep-5f, 0x1.43d70ap-5f,
    0x1.5ae146p-5f, 0x1.71eb86p-5f, 0x1.88f5c2p-5f, 0x1.ap-5f, 0x1.b70a3ep-5f,
    0x1.ce147ap-5f, 0x1.e51ebap-5f, 0x1.fc28f6p-5f, 0x1.09999ap-4f, 0x1.151ebap-4f,
    0x1.20a3d6p-4f, 0x1.2c28f6p-4f, 0x1.37ae14p-4f, 0x1.433334p-4f, 0x1.4eb854p-4f,
    0x1.5a3d7p-4f, 0x1.65c29p-4f, 0x1.7147aep-4f, 0x1.7ccccep-4f, 0x1.8851eep-4f,
    0x1.93d70ap-4f, 0x1.b66668p-4f, 0x1.fp-4f, 0x1.14ccccp-3f, 0x1.31999ap-3f,
    0x1.4e6666p-3f, 0x1.6b3334p-3f, 0x1.88p-3f, 0x1.a4ccccp-3f, 0x1.c1999ap-3f,
    0x1.de6666p-3f, 0x1.fb3332p-3f, 0x1.0cp-2f, 0x1.1a6668p-2f, 0x1.28ccccp-2f,
    0x1.373334p-2f, 0x1.459998p-2f, 0x1.54p-2f, 0x1.626666p-2f, 0x1.70ccccp-2f,
    0x1.7f3334p-2f, 0x1.8d9998p-2f, 0x1.9cp-2f, 0x1.aa6666p-2f, 0x1.b8ccccp-2f,
    0x1.c73334p-2f, 0x1.d59998p-2f, 0x1.e4p-2f, 0x1.f26664p-2f, 0x1.006666p-1f,
    0x1.079998p-1f, 0x1.0eccccp-1f, 0x1.16p-1f, 0x1.1d3334p-1f, 0x1.246668p-1f,
    0x1.2b999ap-1f, 0x1.32ccccp-1f, 0x1.3ap-1f, 0x1.413334p-1f, 0x1.486668p-1f,
    0x1.4f999ap-1f, 0x1.56ccccp-1f, 0x1.5ep-1f, 0x1.653334p-1f, 0x1.6c6668p-1f,
    0x1.73999ap-1f, 0x1.7accccp-1f, 0x1.82p-1f, 0x1.893334p-1f, 0x1.906666p-1f,
    0x1.97999ap-1f, 0x1.9eccccp-1f, 0x1.a6p-1f, 0x1.ad3334p-1f, 0x1.b46666p-1f,
    0x1.bb999ap-1f, 0x1.c2ccccp-1f, 0x1.cap-1f, 0x1.d13334p-1f, 0x1.d86666p-1f,
    0x1.df999ap-1f, 0x1.e6ccccp-1f, 0x1.eep-1f, 0x1.f53334p-1f, 0x1.fc6666p-1f,
    0x1p+0f,
};

namespace {
bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// Below this many elements a thread team costs more than it saves (its
// start-up and barrier take milliseconds when the cores are oversubscribed).
constexpr int64_t kParallelMinElements = int64_t{1} << 18;

void check_blocksize(int64_t blocksize) {
  QF_CHECK(blocksize >= 32 && blocksize <= 4096 && is_pow2(blocksize),
           "blocksize must be a power of two from 32 to 4096, got ", blocksize);
}

// max |x| over the block, NaN ignored (fmaxf), as bitsandbytes' block reduce.
float block_absmax(const void* x, DType dtype, int64_t begin, int64_t end) {
  float m = 0.0f;
  for (int64_t i = begin; i < end; ++i) m = std::fmax(m, std::fabs(load_float(x, dtype, i)));
  return m;
}
}  // namespace

int64_t packed_bytes(int64_t numel) { return (numel + 1) / 2; }
int64_t num_blocks(int64_t numel, int64_t blocksize) { return (numel + blocksize - 1) / blocksize; }

void validate(const Weights& w) {
  QF_CHECK(w.numel >= 0, "numel must be >= 0, got ", w.numel);
  check_blocksize(w.blocksize);
  QF_CHECK(w.packed_bytes == packed_bytes(w.numel), "packed weight has ", w.packed_bytes,
           " bytes but ", w.numel, " elements need ", packed_bytes(w.numel));
  const int64_t blocks = num_blocks(w.numel, w.blocksize);
  QF_CHECK(w.absmax_len == blocks, "absmax has ", w.absmax_len, " entries but ", w.numel,
           " elements in blocks of ", w.blocksize, " need ", blocks);
  if (w.numel == 0) return;
  QF_CHECK(w.packed != nullptr, "packed weight pointer is null");
  QF_CHECK(w.code != nullptr, "quant_map (16-entry code) pointer is null");
  QF_CHECK(w.absmax != nullptr, "absmax pointer is null");
  if (w.nested) {
    QF_CHECK(w.nested_blocksize > 0 && is_pow2(w.nested_blocksize),
             "nested_blocksize must be a positive power of two, got ", w.nested_blocksize);
    const int64_t nested = num_blocks(blocks, w.nested_blocksize);
    QF_CHECK(w.nested_absmax_len == nested, "nested_absmax has ", w.nested_absmax_len,
             " entries but ", blocks, " absmax codes in blocks of ", w.nested_blocksize,
             " need ", nested);
    QF_CHECK(w.nested_absmax != nullptr && w.nested_code != nullptr && w.nested_offset != nullptr,
             "double-quantized absmax needs nested_absmax, nested_quant_map and nested_offset");
  }
}

namespace {
// The per-block loop of dequantize_cpu, for one output type (no per-element dispatch).
template <class Out, class Convert>
void dequantize_blocks(const Weights& w, Out* out, Convert convert) {
  const int64_t blocks = num_blocks(w.numel, w.blocksize);
#pragma omp parallel for schedule(static) if (w.numel >= kParallelMinElements)
  for (int64_t b = 0; b < blocks; ++b) {
    const float scale =
        w.nested ? nested_absmax_value(w.nested_code, static_cast<const uint8_t*>(w.absmax)[b],
                                     w.nested_absmax[b / w.nested_blocksize], *w.nested_offset)
               : static_cast<const float*>(w.absmax)[b];
    float level_value[16];  // the block's 16 possible outputs, before rounding
    for (int l = 0; l < 16; ++l) level_value[l] = w.code[l] * scale;
    const int64_t end = std::min<int64_t>(w.numel, (b + 1) * w.blocksize);
    for (int64_t i = b * w.blocksize; i < end; ++i) {
      const uint8_t byte = w.packed[i >> 1];
      out[i] = convert(level_value[(i & 1) ? (byte & 0x0f) : (byte >> 4)]);
    }
  }
}
}  // namespace

void dequantize_cpu(const Weights& w, void* out, DType out_dtype) {
  switch (out_dtype) {
    case DType::F16: return dequantize_blocks(w, static_cast<uint16_t*>(out), float_to_half);
    case DType::BF16: return dequantize_blocks(w, static_cast<uint16_t*>(out), float_to_bf16);
    default: return dequantize_blocks(w, static_cast<float*>(out), [](float v) { return v; });
  }
}

void quantize_cpu(const void* x, DType x_dtype, int64_t numel, int32_t blocksize,
                  uint8_t* packed, float* absmax) {
  const int64_t blocks = num_blocks(numel, blocksize);
#pragma omp parallel for schedule(static) if (numel >= kParallelMinElements)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * blocksize, end = std::min<int64_t>(numel, begin + blocksize);
    const float amax = block_absmax(x, x_dtype, begin, end);
    absmax[b] = amax;
    const float inv = 1.0f / amax;  // inf for an all-zero block: 0 * inf = NaN -> level 0
    // a trailing odd element pairs with a zero, as bitsandbytes pads its tile
    for (int64_t i = begin; i < end; i += 2) {
      const uint8_t hi = nf4_level(load_float(x, x_dtype, i) * inv);
      const uint8_t lo = nf4_level((i + 1 < end ? load_float(x, x_dtype, i + 1) : 0.0f) * inv);
      packed[i >> 1] = static_cast<uint8_t>(hi << 4 | lo);
    }
  }
}

void quantize_blockwise_8bit_cpu(const float* x, int64_t n, const float* offset,
                                 const float* code, int32_t blocksize, uint8_t* q, float* absmax) {
  const float shift = offset ? *offset : 0.0f;
  const int64_t blocks = num_blocks(n, blocksize);
#pragma omp parallel for schedule(static) if (n >= kParallelMinElements)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * blocksize, end = std::min<int64_t>(n, begin + blocksize);
    float amax = 0.0f;
    for (int64_t i = begin; i < end; ++i) amax = std::fmax(amax, std::fabs(x[i] - shift));
    absmax[b] = amax;
    const float inv = 1.0f / amax;
    for (int64_t i = begin; i < end; ++i) q[i] = code8_index(code, (x[i] - shift) * inv);
  }
}

// ------------------------------------------------------------------ dispatch
void dequantize(Device device, const Weights& w, void* out, DType out_dtype, int64_t out_numel,
                void* stream) {
  validate(w);
  QF_CHECK(out_numel == w.numel, "output has ", out_numel, " elements but the weight has ",
           w.numel);
  if (w.numel == 0) return;
  QF_CHECK(out != nullptr, "output pointer is null");
  if (device == Device::CUDA) return dequantize_cuda(w, out, out_dtype, stream);
  dequantize_cpu(w, out, out_dtype);
}

void quantize(Device device, const void* x, DType x_dtype, int64_t numel, int32_t blocksize,
              uint8_t* packed, int64_t packed_len, float* absmax, int64_t absmax_len,
              void* stream) {
  check_blocksize(blocksize);
  QF_CHECK(numel >= 0, "numel must be >= 0, got ", numel);
  QF_CHECK(packed_len == packed_bytes(numel), "packed output has ", packed_len, " bytes but ",
           numel, " elements need ", packed_bytes(numel));
  QF_CHECK(absmax_len == num_blocks(numel, blocksize), "absmax output has ", absmax_len,
           " entries but ", numel, " elements in blocks of ", blocksize, " need ",
           num_blocks(numel, blocksize));
  if (numel == 0) return;
  QF_CHECK(x && packed && absmax, "quantize: null input or output pointer");
  if (device == Device::CUDA) return quantize_cuda(x, x_dtype, numel, blocksize, packed, absmax, stream);
  quantize_cpu(x, x_dtype, numel, blocksize, packed, absmax);
}

void quantize_blockwise_8bit(Device device, const float* x, int64_t n, const float* offset,
                             const float* code, int32_t blocksize, uint8_t* q, float* absmax,
                             int64_t absmax_len, void* stream) {
  QF_CHECK(blocksize > 0 && is_pow2(blocksize) && blocksize <= 4096,
           "8-bit blocksize must be a power of two up to 4096, got ", blocksize);
  QF_CHECK(n >= 0, "n must be >= 0, got ", n);
  QF_CHECK(absmax_len == num_blocks(n, blocksize), "absmax output has ", absmax_len,
           " entries but ", n, " values in blocks of ", blocksize, " need ",
           num_blocks(n, blocksize));
  if (n == 0) return;
  QF_CHECK(x && code && q && absmax, "quantize_blockwise_8bit: null pointer");
  if (device == Device::CUDA)
    return quantize_blockwise_8bit_cuda(x, n, offset, code, blocksize, q, absmax, stream);
  quantize_blockwise_8bit_cpu(x, n, offset, code, blocksize, q, absmax);
}

#ifndef QFORGE_WITH_CUDA
void dequantize_cuda(const Weights&, void*, DType, void*) {
  cuda::require_cuda("dequantize_nf4 on CUDA");
}
void quantize_cuda(const void*, DType, int64_t, int32_t, uint8_t*, float*, void*) {
  cuda::require_cuda("quantize_nf4 on CUDA");
}
void quantize_blockwise_8bit_cuda(const float*, int64_t, const float*, const float*, int32_t,
                                  uint8_t*, float*, void*) {
  cuda::require_cuda("quantize_blockwise_8bit on CUDA");
}
#endif

}  // namespace qforge::nf4
