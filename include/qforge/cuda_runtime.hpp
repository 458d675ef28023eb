// Thin, torch-free view of the CUDA runtime that the rest of the core uses.
// Builds without a CUDA toolkit: then built_with_cuda() is false and every
// device entry point throws a clear error instead of crashing.
#pragma once
#include "qforge/export.hpp"
#include <cstdint>

namespace qforge::cuda {

QFORGE_API bool built_with_cuda();
QFORGE_API int device_count();  // 0 when built without CUDA or no driver/GPU is present
QFORGE_API int multiprocessor_count(int device);
QFORGE_API int current_device();

// Throws InvalidArgument when the build has no CUDA (used by every "device" path).
QFORGE_API void require_cuda(const char* what);

}  // namespace qforge::cuda
