// Thin, torch-free view of the CUDA runtime that the rest of the core uses.
// Builds without a CUDA toolkit: then built_with_cuda() is false and every
// device entry point throws a clear error instead of crashing.
#pragma once
#include <cstdint>

namespace qforge::cuda {

bool built_with_cuda();
int device_count();  // 0 when built without CUDA or no driver/GPU is present
int multiprocessor_count(int device);
int current_device();

// Throws InvalidArgument when the build has no CUDA (used by every "device" path).
void require_cuda(const char* what);

}  // namespace qforge::cuda
