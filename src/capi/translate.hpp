// The C ABI's enums as the core's types: each value checked, the wrong one named.
#pragma once
#include "core/dtype_name.hpp"
#include "qforge/dtype.hpp"
#include "qforge/error.hpp"
#include "qforge/qforge.h"

namespace qforge::capi {

// `op`, when given, names the call in the error.
inline Device to_device(qf_device d, const char* op = nullptr) {
  QF_CHECK(d == QF_CPU || d == QF_CUDA, op ? op : "", op ? ": " : "", "unknown device ", static_cast<int>(d),
           " (qf_device: 0 cpu, 1 cuda)");
  return static_cast<Device>(d);
}

// A floating-point qf_dtype; `what` names the argument in the error, `op`, when given, the call.
inline DType to_float_dtype(qf_dtype d, const char* what, const char* op = nullptr) {
  QF_CHECK(d == QF_FLOAT32 || d == QF_FLOAT16 || d == QF_BFLOAT16, op ? op : "", op ? ": " : "", what,
           " must be float32, float16 or bfloat16, got ", dtype_name(static_cast<int>(d)));
  return static_cast<DType>(d);
}

static_assert(static_cast<int>(DType::F32) == QF_FLOAT32 && static_cast<int>(DType::F16) == QF_FLOAT16 &&
                  static_cast<int>(DType::BF16) == QF_BFLOAT16,
              "qforge::DType and qf_dtype must agree");
static_assert(static_cast<int>(Device::CPU) == QF_CPU && static_cast<int>(Device::CUDA) == QF_CUDA,
              "qforge::Device and qf_device must agree");

}  // namespace qforge::capi
