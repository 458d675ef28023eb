// The core's view of the CUDA runtime; compiles with or without a toolkit.
#include "qforge/cuda_runtime.hpp"

#include "qforge/error.hpp"

#ifdef QFORGE_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace qforge::cuda {

bool built_with_cuda() {
#ifdef QFORGE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int device_count() {
#ifdef QFORGE_WITH_CUDA
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver / no GPU: clear the sticky-free error and report none
    return 0;
  }
  return count;
#else
  return 0;
#endif
}

int current_device() {
#ifdef QFORGE_WITH_CUDA
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) throw RuntimeFailure("cudaGetDevice failed");
  return device;
#else
  return 0;
#endif
}

int multiprocessor_count(int device) {
#ifdef QFORGE_WITH_CUDA
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    throw RuntimeFailure("cudaDeviceGetAttribute(MultiProcessorCount) failed");
  return count;
#else
  (void)device;
  return 0;
#endif
}

void require_cuda(const char* what) {
  QF_CHECK(built_with_cuda(), what, ": this libqforge was built without CUDA (no nvcc at build time)");
  QF_CHECK(device_count() > 0, what, ": no CUDA device is available");
}

}  // namespace qforge::cuda
