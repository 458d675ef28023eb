// The name of a qf_dtype as torch prints it, for error messages.
#pragma once
#include "qforge/qforge.h"

namespace qforge {

inline const char* dtype_name(int d) {
  switch (d) {
    case QF_FLOAT32: return "float32";
    case QF_FLOAT16: return "float16";
    case QF_BFLOAT16: return "bfloat16";
    case QF_UINT8: return "uint8";
    case QF_INT64: return "int64";
    case QF_INT32: return "int32";
    case QF_FLOAT64: return "float64";
    default: return "an unknown dtype";
  }
}

}  // namespace qforge
