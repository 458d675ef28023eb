// Turn a failed CUDA runtime call, kernel launch or cuBLAS / cuBLASLt call
// into a RuntimeFailure naming the call and the status.
#pragma once
#include <cuda_runtime.h>

#include "qforge/error.hpp"

// expr returns a Status; anything but ok throws "<text> failed: <describe...>". text is
// the caller's #expr: stringified here, a macro inside expr would show expanded.
#define QF_STATUS_CHECK_(Status, expr, text, ok, ...)                                              \
  do {                                                                                            \
    const Status qf_status_ = (expr);                                                             \
    if (qf_status_ != (ok))                                                                       \
      throw ::qforge::RuntimeFailure(::qforge::detail::concat(text, " failed: ", __VA_ARGS__));   \
  } while (0)

#define QF_CUDA_CHECK(expr) QF_STATUS_CHECK_(cudaError_t, expr, #expr, cudaSuccess, cudaGetErrorString(qf_status_))

// cuBLAS and cuBLASLt calls (include <cublasLt.h> first). The status is printed
// as its number (cublasLtGetStatusName would give its name).
#define QF_CUBLAS_CHECK(expr) \
  QF_STATUS_CHECK_(cublasStatus_t, expr, #expr, CUBLAS_STATUS_SUCCESS, "cuBLAS status ", static_cast<int>(qf_status_))
