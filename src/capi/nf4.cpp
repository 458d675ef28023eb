// C ABI for NF4: translates arguments to qforge::nf4 and nothing else.
#include <algorithm>

#include "core/dtype_name.hpp"
#include "guard.hpp"
#include "qforge/nf4.hpp"
#include "translate.hpp"

using qforge::capi::guard;
using qforge::capi::to_device;
using qforge::capi::to_float_dtype;
namespace nf4 = qforge::nf4;

namespace {

nf4::Weights to_weights(const qf_nf4_weights* w) {
  QF_CHECK(w != nullptr, "weights descriptor is null");
  QF_CHECK(w->absmax_dtype == QF_FLOAT32 || w->absmax_dtype == QF_UINT8,
           "absmax must be float32 (plain) or uint8 (double-quantized), got ",
           qforge::dtype_name(static_cast<int>(w->absmax_dtype)));
  return nf4::Weights{.packed = w->packed,
                      .packed_bytes = w->packed_bytes,
                      .numel = w->numel,
                      .blocksize = w->blocksize,
                      .code = w->code,
                      .absmax = w->absmax,
                      .nested = w->absmax_dtype == QF_UINT8,
                      .absmax_len = w->absmax_len,
                      .nested_absmax = w->nested_absmax,
                      .nested_absmax_len = w->nested_absmax_len,
                      .nested_code = w->nested_code,
                      .nested_offset = w->nested_offset,
                      .nested_blocksize = w->nested_blocksize};
}

}  // namespace

extern "C" {

int64_t qf_nf4_packed_bytes(int64_t numel) { return nf4::packed_bytes(numel); }

int64_t qf_nf4_num_blocks(int64_t numel, int32_t blocksize) {
  return blocksize > 0 ? nf4::num_blocks(numel, blocksize) : -1;
}

int qf_nf4_validate(const qf_nf4_weights* w) {
  return guard([&] { nf4::validate(to_weights(w)); });
}

int qf_nf4_dequantize(qf_device device, const qf_nf4_weights* w, void* out, qf_dtype out_dtype,
                      int64_t out_numel, void* stream) {
  return guard([&] {
    nf4::dequantize(to_device(device), to_weights(w), out, to_float_dtype(out_dtype, "dequantize output"),
                    out_numel, stream);
  });
}

int qf_nf4_quantize(qf_device device, const void* x, qf_dtype x_dtype, int64_t numel,
                    int32_t blocksize, uint8_t* packed, int64_t packed_bytes, float* absmax,
                    int64_t absmax_len, void* stream) {
  return guard([&] {
    nf4::quantize(to_device(device), x, to_float_dtype(x_dtype, "quantize input"), numel, blocksize, packed,
                  packed_bytes, absmax, absmax_len, stream);
  });
}

int qf_quantize_blockwise_8bit(qf_device device, const float* x, int64_t n, const float* offset,
                               const float* code256, int32_t blocksize, uint8_t* q, float* absmax,
                               int64_t absmax_len, void* stream) {
  return guard([&] {
    nf4::quantize_blockwise_8bit(to_device(device), x, n, offset, code256, blocksize, q, absmax, absmax_len,
                                 stream);
  });
}

int qf_dynamic_map_8bit(float* out256) {
  return guard([&] {
    QF_CHECK(out256 != nullptr, "qf_dynamic_map_8bit: output is null");
    std::copy(nf4::kDynamicMap, nf4::kDynamicMap + 256, out256);
  });
}

int qf_nf4_code(float* out16) {
  return guard([&] {
    QF_CHECK(out16 != nullptr, "qf_nf4_code: output is null");
    std::copy(nf4::kCode, nf4::kCode + 16, out16);
  });
}

}
