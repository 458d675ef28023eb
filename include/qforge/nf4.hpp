// NF4 4-bit weights exactly as bitsandbytes stores them: the C++ API (the C
// ABI's qf_nf4_* entries translate to it). Every function validates sizes
// first and throws qforge::InvalidArgument naming the problem; docs/nf4.md.
#pragma once
#include <cstdint>

#include "qforge/dtype.hpp"
#include "qforge/export.hpp"

namespace qforge::nf4 {

// bitsandbytes get_4bit_type("nf4"): the 16 levels, ascending.
extern QFORGE_API const float kCode[16];
// bitsandbytes create_dynamic_map(): the signed 8-bit dynamic map used for
// the double-quantized absmax.
extern QFORGE_API const float kDynamicMap[256];

// One NF4 weight in bitsandbytes' layout. All pointers live on the device the
// call runs on.
struct QFORGE_API Weights {
  const uint8_t* packed = nullptr;  // two codes per byte, high nibble first
  int64_t packed_bytes = 0;         // ceil(numel / 2)
  int64_t numel = 0;                // elements of the unpacked weight
  int32_t blocksize = 64;           // 32, 64, ..., 4096
  const float* code = nullptr;      // the 16-entry quant_map
  // One scale per block: float absmax, or with double quantization (nested)
  // the uint8 codes of bitsandbytes' 8-bit blockwise quantization of it.
  const void* absmax = nullptr;
  bool nested = false;
  int64_t absmax_len = 0;  // ceil(numel / blocksize)
  // double quantization only:
  const float* nested_absmax = nullptr;  // ceil(absmax_len / nested_blocksize)
  int64_t nested_absmax_len = 0;
  const float* nested_code = nullptr;    // 256 entries
  const float* nested_offset = nullptr;  // 1 entry
  int32_t nested_blocksize = 256;        // a power of two; bitsandbytes uses 256
};

QFORGE_API int64_t packed_bytes(int64_t numel);                   // ceil(numel / 2)
QFORGE_API int64_t num_blocks(int64_t numel, int64_t blocksize);  // ceil(numel / blocksize)

// Throws unless w describes a consistent NF4 weight (sizes, blocksize, pointers).
QFORGE_API void validate(const Weights& w);

// out[i] = (T)(code[nibble(i)] * absmax(i / blocksize)), T = out_dtype.
QFORGE_API void dequantize(Device device, const Weights& w, void* out, DType out_dtype, int64_t out_numel,
                           void* stream);

// Per block: absmax = max|x|, codes = NF4 level nearest to x * (1/absmax)
// (ties to the lower level), packed high nibble first.
QFORGE_API void quantize(Device device, const void* x, DType x_dtype, int64_t numel, int32_t blocksize,
                         uint8_t* packed, int64_t packed_len, float* absmax, int64_t absmax_len, void* stream);

// bitsandbytes quantize_blockwise on (x - *offset) through a 256-entry code.
QFORGE_API void quantize_blockwise_8bit(Device device, const float* x, int64_t n, const float* offset,
                                        const float* code, int32_t blocksize, uint8_t* q, float* absmax,
                                        int64_t absmax_len, void* stream);

// CPU twins: the definition of every CUDA kernel's result.
QFORGE_API void dequantize_cpu(const Weights& w, void* out, DType out_dtype);
QFORGE_API void quantize_cpu(const void* x, DType x_dtype, int64_t numel, int32_t blocksize, uint8_t* packed,
                             float* absmax);
QFORGE_API void quantize_blockwise_8bit_cpu(const float* x, int64_t n, const float* offset, const float* code,
                                            int32_t blocksize, uint8_t* q, float* absmax);

// CUDA versions (nf4.cu); throw when the build has no CUDA.
QFORGE_API void dequantize_cuda(const Weights& w, void* out, DType out_dtype, void* stream);
QFORGE_API void quantize_cuda(const void* x, DType x_dtype, int64_t numel, int32_t blocksize, uint8_t* packed,
                              float* absmax, void* stream);
QFORGE_API void quantize_blockwise_8bit_cuda(const float* x, int64_t n, const float* offset, const float* code,
                                             int32_t blocksize, uint8_t* q, float* absmax, void* stream);

}  // namespace qforge::nf4
