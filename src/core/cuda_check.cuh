// Turn a failed CUDA runtime call or kernel launch into a RuntimeFailure.
#pragma once
#include <cuda_runtime.h>

#include "qforge/error.hpp"

#define QF_CUDA_CHECK(expr)                                                                  \
  do {                                                                                       \
    cudaError_t qf_status_ = (expr);                                                         \
    if (qf_status_ != cudaSuccess)                                                           \
      throw ::qforge::RuntimeFailure(::qforge::detail::concat(#expr, " failed: ",            \
                                                              cudaGetErrorString(qf_status_))); \
  } while (0)
