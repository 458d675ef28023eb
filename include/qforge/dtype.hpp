// Element types and devices of the C++ core's APIs. The values are those of
// qforge.h's qf_dtype and qf_device, so the C ABI translates by checking the range.
#pragma once
#include <cstdint>

#include "qforge/export.hpp"

namespace qforge {

// The floating-point types the kernels read and write.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

enum class Device : int { CPU = 0, CUDA = 1 };

QFORGE_API const char* dtype_name(DType d);  // "float32", "float16", "bfloat16"
QFORGE_API int64_t dtype_size(DType d);      // bytes per element

}  // namespace qforge
