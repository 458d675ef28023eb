#include "qforge/dtype.hpp"

namespace qforge {

const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
  }
  return "an unknown dtype";
}

int64_t dtype_size(DType d) { return d == DType::F32 ? 4 : 2; }

}  // namespace qforge
