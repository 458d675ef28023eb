// QF_HOST_DEVICE marks a function written once for the CPU twin and the CUDA
// kernel alike (per-element rules that the two must share).
#pragma once

#if defined(__CUDACC__)
#define QF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define QF_HOST_DEVICE inline
#endif
