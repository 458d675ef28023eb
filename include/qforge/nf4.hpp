// NF4 4-bit weights exactly as bitsandbytes stores them: the C++ API.
// The storage is described by qf_nf4_weights (qforge.h). Every function
// validates sizes first and throws qforge::InvalidArgument naming the problem.
#pragma once
#include "qforge/export.hpp"
#include <cstdint>

#include "qforge/qforge.h"

namespace qforge::nf4 {

// bitsandbytes get_4bit_type("nf4"): the 16 levels, ascending.
extern QFORGE_API const float kCode[16];
// bitsandbytes create_dynamic_map(): the signed 8-bit dynamic map used for
// the double-quantized absmax.
extern QFORGE_API const float kDynamicMap[256];

QFORGE_API int64_t packed_bytes(int64_t numel);                   // ceil(numel / 2)
QFORGE_API int64_t num_blocks(int64_t numel, int64_t blocksize);  // ceil(numel / blocksize)

// Throws unless w describes a consistent NF4 weight (sizes, blocksize, pointers).
QFORGE_API void validate(const qf_nf4_weights& w);

// out[i] = (T)(code[nibble(i)] * absmax(i / blocksize)), T = out_dtype.
QFORGE_API void dequantize(qf_device device, const qf_nf4_weights& w, void* out, qf_dtype out_dtype,
                int64_t out_numel, void* stream);

// Per block: absmax = max|x|, codes = NF4 level nearest to x * (1/absmax)
// (ties to the lower level), packed high nibble first.
QFORGE_API void quantize(qf_device device, const void* x, qf_dtype x_dtype, int64_t numel, int32_t blocksize,
              uint8_t* packed, int64_t packed_len, float* absmax, int64_t absmax_len,
              void* stream);

// bitsandbytes quantize_blockwise on (x - *offset) through a 256-entry code.
QFORGE_API void quantize_blockwise_8bit(qf_device device, const float* x, int64_t n, const float* offset,
                             const float* code, int32_t blocksize, uint8_t* q, float* absmax,
                             int64_t absmax_len, void* stream);

// CPU twins: the definition of every CUDA kernel's result.
QFORGE_API void dequantize_cpu(const qf_nf4_weights& w, void* out, qf_dtype out_dtype);
QFORGE_API void quantize_cpu(const void* x, qf_dtype x_dtype, int64_t numel, int32_t blocksize,
                  uint8_t* packed, float* absmax);
QFORGE_API void quantize_blockwise_8bit_cpu(const float* x, int64_t n, const float* offset,
                                 const float* code, int32_t blocksize, uint8_t* q, float* absmax);

// CUDA versions (nf4.cu); throw when the build has no CUDA.
QFORGE_API void dequantize_cuda(const qf_nf4_weights& w, void* out, qf_dtype out_dtype, void* stream);
QFORGE_API void quantize_cuda(const void* x, qf_dtype x_dtype, int64_t numel, int32_t blocksize,
                   uint8_t* packed, float* absmax, void* stream);
QFORGE_API void quantize_blockwise_8bit_cuda(const float* x, int64_t n, const float* offset,
                                  const float* code, int32_t blocksize, uint8_t* q, float* absmax,
                                  void* stream);

}  // namespace qforge::nf4
