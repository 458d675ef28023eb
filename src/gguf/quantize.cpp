// ggml's reference block quantizers (ggml-quants.c, quantize_row_*_ref),
// ported operation for operation so the bytes are equal: every expression
// keeps the C code's evaluation order and float/int conversions, and the
// build forbids FMA contraction (-ffp-contract=off), as ggml-base's x86 build
// has no FMA. Block layouts are ggml-common.h's.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

#include "core/half.hpp"
#include "qforge/error.hpp"
#include "qforge/gguf.hpp"

namespace qforge::gguf {
namespace {

constexpr int QK4_0 = 32, QK5_0 = 32, QK5_1 = 32, QK8_0 = 32, QK_K = 256;
constexpr float GROUP_MAX_EPS = 1e-15f;

inline uint16_t fp16(float f) { return float_to_half(f); }
inline float fp32(uint16_t h) { return half_to_float(h); }

// ggml's round-to-nearest through the float mantissa (|fval| <= 4194303).
inline int nearest_int(float fval) {
  float val = fval + 12582912.f;
  int i;
  std::memcpy(&i, &val, sizeof(int));
  return (i & 0x007fffff) - 0x00400000;
}

void put16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }

// The first element of largest magnitude, sign kept (q4_0 and q5_0 scale by it).
float signed_absmax(const float* x, int n) {
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < n; j++) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  return max;
}

void q4_0(const float* x, uint8_t* y, int64_t k) {  // block: d f16, qs[16]
  const int64_t nb = k / QK4_0;
  for (int64_t i = 0; i < nb; i++, y += 18) {
    const float d = signed_absmax(x + i * QK4_0, QK4_0) / -8;
    const float id = d ? 1.0f / d : 0.0f;
    put16(y, fp16(d));
    for (int j = 0; j < QK4_0 / 2; ++j) {
      const float x0 = x[i * QK4_0 + 0 + j] * id;
      const float x1 = x[i * QK4_0 + QK4_0 / 2 + j] * id;
      const uint8_t xi0 = static_cast<uint8_t>(std::min<int>(15, static_cast<int8_t>(x0 + 8.5f)));
      const uint8_t xi1 = static_cast<uint8_t>(std::min<int>(15, static_cast<int8_t>(x1 + 8.5f)));
      y[2 + j] = static_cast<uint8_t>(xi0 | (xi1 << 4));
    }
  }
}

void q5_0(const float* x, uint8_t* y, int64_t k) {  // block: d f16, qh[4], qs[16]
  const int64_t nb = k / QK5_0;
  for (int64_t i = 0; i < nb; i++, y += 22) {
    const float d = signed_absmax(x + i * QK5_0, QK5_0) / -16;
    const float id = d ? 1.0f / d : 0.0f;
    put16(y, fp16(d));
    uint32_t qh = 0;
    for (int j = 0; j < QK5_0 / 2; ++j) {
      const float x0 = x[i * QK5_0 + 0 + j] * id;
      const float x1 = x[i * QK5_0 + QK5_0 / 2 + j] * id;
      const uint8_t xi0 = static_cast<uint8_t>(std::min<int>(31, static_cast<int8_t>(x0 + 16.5f)));
      const uint8_t xi1 = static_cast<uint8_t>(std::min<int>(31, static_cast<int8_t>(x1 + 16.5f)));
      y[6 + j] = static_cast<uint8_t>((xi0 & 0x0F) | ((xi1 & 0x0F) << 4));
      qh |= ((xi0 & 0x10u) >> 4) << (j + 0);
      qh |= ((xi1 & 0x10u) >> 4) << (j + QK5_0 / 2);
    }
    std::memcpy(y + 2, &qh, 4);
  }
}

void q5_1(const float* x, uint8_t* y, int64_t k) {  // block: d f16, m f16, qh[4], qs[16]
  const int64_t nb = k / QK5_1;
  for (int64_t i = 0; i < nb; i++, y += 24) {
    float min = 3.402823466e+38F, max = -3.402823466e+38F;
    for (int j = 0; j < QK5_1; j++) {
      const float v = x[i * QK5_1 + j];
      if (v < min) min = v;
      if (v > max) max = v;
    }
    const float d = (max - min) / ((1 << 5) - 1);
    const float id = d ? 1.0f / d : 0.0f;
    put16(y, fp16(d));
    put16(y + 2, fp16(min));
    uint32_t qh = 0;
    for (int j = 0; j < QK5_1 / 2; ++j) {
      const float x0 = (x[i * QK5_1 + 0 + j] - min) * id;
      const float x1 = (x[i * QK5_1 + QK5_1 / 2 + j] - min) * id;
      const uint8_t xi0 = static_cast<uint8_t>(x0 + 0.5f);
      const uint8_t xi1 = static_cast<uint8_t>(x1 + 0.5f);
      y[8 + j] = static_cast<uint8_t>((xi0 & 0x0F) | ((xi1 & 0x0F) << 4));
      qh |= ((xi0 & 0x10u) >> 4) << (j + 0);
      qh |= ((xi1 & 0x10u) >> 4) << (j + QK5_1 / 2);
    }
    std::memcpy(y + 4, &qh, 4);
  }
}

void q8_0(const float* x, uint8_t* y, int64_t k) {  // block: d f16, qs[32] int8
  const int64_t nb = k / QK8_0;
  for (int64_t i = 0; i < nb; i++, y += 34) {
    float amax = 0.0f;
    for (int j = 0; j < QK8_0; j++) amax = std::max(amax, std::fabs(x[i * QK8_0 + j]));
    const float d = amax / ((1 << 7) - 1);
    const float id = d ? 1.0f / d : 0.0f;
    put16(y, fp16(d));
    for (int j = 0; j < QK8_0; ++j) {
      const float x0 = x[i * QK8_0 + j] * id;
      y[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::round(x0)));
    }
  }
}

// make_qx_quants with qw == NULL (the reference quantizers' only use).
float make_qx_quants(int n, int nmax, const float* x, int8_t* L, int rmse_type) {
  float max = 0, amax = 0;
  for (int i = 0; i < n; ++i) {
    float ax = std::fabs(x[i]);
    if (ax > amax) {
      amax = ax;
      max = x[i];
    }
  }
  if (amax < GROUP_MAX_EPS) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  float iscale = -nmax / max;
  if (rmse_type == 0) {
    for (int i = 0; i < n; ++i) {
      int l = nearest_int(iscale * x[i]);
      L[i] = static_cast<int8_t>(nmax + std::max(-nmax, std::min(nmax - 1, l)));
    }
    return 1 / iscale;
  }
  bool return_early = false;
  if (rmse_type < 0) {
    rmse_type = -rmse_type;
    return_early = true;
  }
  auto weight = [rmse_type](float v) {
    return rmse_type == 1 ? v * v : rmse_type == 2 ? 1 : rmse_type == 3 ? std::fabs(v) : std::sqrt(std::fabs(v));
  };
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    int l = nearest_int(iscale * x[i]);
    l = std::max(-nmax, std::min(nmax - 1, l));
    L[i] = static_cast<int8_t>(l + nmax);
    float w = weight(x[i]);
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  float scale = suml2 ? sumlx / suml2 : 0.0f;
  if (return_early) return suml2 > 0 ? 0.5f * (scale + 1 / iscale) : 1 / iscale;
  float best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(nmax + 0.1f * is) / max;
    sumlx = suml2 = 0;
    for (int i = 0; i < n; ++i) {
      int l = nearest_int(iscale * x[i]);
      l = std::max(-nmax, std::min(nmax - 1, l));
      float w = weight(x[i]);
      sumlx += w * x[i] * l;
      suml2 += w * l * l;
    }
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        L[i] = static_cast<int8_t>(nmax + std::max(-nmax, std::min(nmax - 1, l)));
      }
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

float make_qkx2_quants(int n, int nmax, const float* x, const float* weights, uint8_t* L, float* the_min,
                       uint8_t* Laux, float rmin, float rdelta, int nstep, bool use_mad) {
  float min = x[0], max = x[0];
  float sum_w = weights[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < min) min = x[i];
    if (x[i] > max) max = x[i];
    float w = weights[i];
    sum_w += w;
    sum_x += w * x[i];
  }
  if (min > 0) min = 0;
  if (max == min) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    *the_min = -min;
    return 0.f;
  }
  float iscale = nmax / (max - min);
  float scale = 1 / iscale;
  float best_error = 0;
  for (int i = 0; i < n; ++i) {
    int l = nearest_int(iscale * (x[i] - min));
    L[i] = static_cast<uint8_t>(std::max(0, std::min(nmax, l)));
    float diff = scale * L[i] + min - x[i];
    diff = use_mad ? std::fabs(diff) : diff * diff;
    float w = weights[i];
    best_error += w * diff;
  }
  if (nstep < 1) {
    *the_min = -min;
    return scale;
  }
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * is + nmax) / (max - min);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      int l = nearest_int(iscale * (x[i] - min));
      l = std::max(0, std::min(nmax, l));
      Laux[i] = static_cast<uint8_t>(l);
      float w = weights[i];
      sum_l += w * l;
      sum_l2 += w * l * l;
      sum_xl += w * l * x[i];
    }
    float D = sum_w * sum_l2 - sum_l * sum_l;
    if (D > 0) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
      if (this_min > 0) {
        this_min = 0;
        this_scale = sum_xl / sum_l2;
      }
      float cur_error = 0;
      for (int i = 0; i < n; ++i) {
        float diff = this_scale * Laux[i] + this_min - x[i];
        diff = use_mad ? std::fabs(diff) : diff * diff;
        float w = weights[i];
        cur_error += w * diff;
      }
      if (cur_error < best_error) {
        for (int i = 0; i < n; ++i) L[i] = Laux[i];
        best_error = cur_error;
        scale = this_scale;
        min = this_min;
      }
    }
  }
  *the_min = -min;
  return scale;
}

void get_scale_min_k4(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = static_cast<uint8_t>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    *m = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4));
  }
}

// q4_K and q5_K share the scale/min search and the 6-bit packing of scales;
// they differ in nmax (15, 31), the search range and the nibble layout.
// Fills L[256] and the block's d, dmin, scales[12].
void k_scales_and_levels(const float* x, int nmax, float rmin, int nstep, uint8_t* L, uint8_t* d_out,
                         uint8_t* dmin_out, uint8_t* scales_out) {
  uint8_t Laux[32];
  float weights[32], mins[QK_K / 32], scales[QK_K / 32];
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < QK_K / 32; ++j) {
    float sum_x2 = 0;
    for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
    float av_x = std::sqrt(sum_x2 / 32);
    for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(x[32 * j + l]);
    scales[j] = make_qkx2_quants(32, nmax, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, rmin, 0.1f, nstep, false);
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
  float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
  std::memset(scales_out, 0, 12);
  for (int j = 0; j < QK_K / 32; ++j) {
    uint8_t ls = static_cast<uint8_t>(nearest_int(inv_scale * scales[j]));
    uint8_t lm = static_cast<uint8_t>(nearest_int(inv_min * mins[j]));
    ls = std::min<uint8_t>(63, ls);
    lm = std::min<uint8_t>(63, lm);
    if (j < 4) {
      scales_out[j] = ls;
      scales_out[j + 4] = lm;
    } else {
      scales_out[j + 4] = static_cast<uint8_t>((ls & 0xF) | ((lm & 0xF) << 4));
      scales_out[j - 4] |= static_cast<uint8_t>((ls >> 4) << 6);
      scales_out[j - 0] |= static_cast<uint8_t>((lm >> 4) << 6);
    }
  }
  const uint16_t d16 = fp16(max_scale / 63.f), dmin16 = fp16(max_min / 63.f);
  put16(d_out, d16);
  put16(dmin_out, dmin16);
  uint8_t sc, m;
  for (int j = 0; j < QK_K / 32; ++j) {
    get_scale_min_k4(j, scales_out, &sc, &m);
    const float d = fp32(d16) * sc;
    if (!d) continue;
    const float dm = fp32(dmin16) * m;
    for (int ii = 0; ii < 32; ++ii) {
      int l = nearest_int((x[32 * j + ii] + dm) / d);
      L[32 * j + ii] = static_cast<uint8_t>(std::max(0, std::min(nmax, l)));
    }
  }
}

void q4_K(const float* x, uint8_t* y, int64_t k) {  // block: d, dmin f16, scales[12], qs[128]
  const int64_t nb = k / QK_K;
  uint8_t L[QK_K];
  for (int64_t i = 0; i < nb; i++, y += 144, x += QK_K) {
    k_scales_and_levels(x, 15, -1.f, 20, L, y, y + 2, y + 4);
    uint8_t* q = y + 16;
    for (int j = 0; j < QK_K; j += 64) {
      for (int l = 0; l < 32; ++l) q[l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 4));
      q += 32;
    }
  }
}

void q5_K(const float* x, uint8_t* y, int64_t k) {  // block: d, dmin f16, scales[12], qh[32], qs[128]
  const int64_t nb = k / QK_K;
  uint8_t L[QK_K];
  for (int64_t i = 0; i < nb; i++, y += 176, x += QK_K) {
    k_scales_and_levels(x, 31, -0.5f, 15, L, y, y + 2, y + 4);
    uint8_t* qh = y + 16;
    uint8_t* ql = y + 48;
    std::memset(qh, 0, QK_K / 8);
    uint8_t m1 = 1, m2 = 2;
    for (int n = 0; n < QK_K; n += 64) {
      for (int j = 0; j < 32; ++j) {
        int l1 = L[n + j];
        if (l1 > 15) {
          l1 -= 16;
          qh[j] |= m1;
        }
        int l2 = L[n + j + 32];
        if (l2 > 15) {
          l2 -= 16;
          qh[j] |= m2;
        }
        ql[j] = static_cast<uint8_t>(l1 | (l2 << 4));
      }
      m1 = static_cast<uint8_t>(m1 << 2);
      m2 = static_cast<uint8_t>(m2 << 2);
      ql += 32;
    }
  }
}

void q6_K(const float* x, uint8_t* y, int64_t k) {  // block: ql[128], qh[64], scales[16] int8, d f16
  const int64_t nb = k / QK_K;
  int8_t L[QK_K];
  float scales[QK_K / 16];
  for (int64_t i = 0; i < nb; i++, y += 210, x += QK_K) {
    uint8_t* ql = y;
    uint8_t* qh = y + 128;
    int8_t* bscales = reinterpret_cast<int8_t*>(y + 192);
    uint8_t* dptr = y + 208;
    float max_scale = 0, max_abs_scale = 0;
    for (int ib = 0; ib < QK_K / 16; ++ib) {
      const float scale = make_qx_quants(16, 32, x + 16 * ib, L + 16 * ib, 1);
      scales[ib] = scale;
      const float abs_scale = std::fabs(scale);
      if (abs_scale > max_abs_scale) {
        max_abs_scale = abs_scale;
        max_scale = scale;
      }
    }
    if (max_abs_scale < GROUP_MAX_EPS) {
      std::memset(y, 0, 210);
      put16(dptr, fp16(0.f));
      continue;
    }
    float iscale = -128.f / max_scale;
    const uint16_t d16 = fp16(1 / iscale);
    put16(dptr, d16);
    for (int ib = 0; ib < QK_K / 16; ++ib)
      bscales[ib] = static_cast<int8_t>(std::min(127, nearest_int(iscale * scales[ib])));
    for (int j = 0; j < QK_K / 16; ++j) {
      float d = fp32(d16) * bscales[j];
      if (!d) continue;
      for (int ii = 0; ii < 16; ++ii) {
        int l = nearest_int(x[16 * j + ii] / d);
        l = std::max(-32, std::min(31, l));
        L[16 * j + ii] = static_cast<int8_t>(l + 32);
      }
    }
    for (int j = 0; j < QK_K; j += 128) {
      for (int l = 0; l < 32; ++l) {
        const uint8_t q1 = L[j + l + 0] & 0xF;
        const uint8_t q2 = L[j + l + 32] & 0xF;
        const uint8_t q3 = L[j + l + 64] & 0xF;
        const uint8_t q4 = L[j + l + 96] & 0xF;
        ql[l + 0] = static_cast<uint8_t>(q1 | (q3 << 4));
        ql[l + 32] = static_cast<uint8_t>(q2 | (q4 << 4));
        qh[l] = static_cast<uint8_t>((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) |
                                     ((L[j + l + 96] >> 4) << 6));
      }
      ql += 64;
      qh += 32;
    }
  }
}

struct Traits {
  Type type;
  const char* name;
  int64_t block, bytes;
};
constexpr Traits kTraits[] = {
    {Type::F32, "f32", 1, 4},       {Type::F16, "f16", 1, 2},       {Type::BF16, "bf16", 1, 2},
    {Type::Q4_0, "q4_0", 32, 18},   {Type::Q5_0, "q5_0", 32, 22},   {Type::Q5_1, "q5_1", 32, 24},
    {Type::Q8_0, "q8_0", 32, 34},   {Type::Q4_K, "q4_K", 256, 144}, {Type::Q5_K, "q5_K", 256, 176},
    {Type::Q6_K, "q6_K", 256, 210},
};

const Traits* find_traits(uint32_t type) {
  for (const auto& t : kTraits)
    if (static_cast<uint32_t>(t.type) == type) return &t;
  return nullptr;
}

const Traits& traits(Type type) {
  const Traits* t = find_traits(static_cast<uint32_t>(type));
  QF_CHECK(t != nullptr, "ggml type ", static_cast<uint32_t>(type), " is not supported by qforge's GGUF writer");
  return *t;
}

}  // namespace

bool is_supported(uint32_t type) { return find_traits(type) != nullptr; }

Type to_type(uint32_t type) {
  QF_CHECK(is_supported(type), "ggml type ", type,
           " is not supported (qforge writes f32, f16, bf16, q4_0, q5_0, q5_1, q8_0, q4_K, q5_K, q6_K)");
  return static_cast<Type>(type);
}

const char* type_name(Type type) { return traits(type).name; }
int64_t block_elements(Type type) { return traits(type).block; }
int64_t block_bytes(Type type) { return traits(type).bytes; }

int64_t row_bytes(Type type, int64_t ncols) {
  const Traits& t = traits(type);
  QF_CHECK(ncols > 0, "row length must be positive, got ", ncols);
  QF_CHECK(ncols % t.block == 0, "row length ", ncols, " is not a multiple of ", t.block, " (the block of ",
           t.name, ")");
  QF_CHECK(ncols / t.block <= (int64_t{1} << 40) / t.bytes, "row length ", ncols, " is too large");
  return ncols / t.block * t.bytes;
}

void quantize_row_reference(Type type, const float* x, int64_t n, void* out) {
  auto* y = static_cast<uint8_t*>(out);
  switch (type) {
    case Type::F32: std::memcpy(y, x, static_cast<size_t>(n) * 4); return;
    case Type::F16:
      for (int64_t i = 0; i < n; ++i) put16(y + 2 * i, fp16(x[i]));
      return;
    case Type::BF16:
      for (int64_t i = 0; i < n; ++i) put16(y + 2 * i, float_to_bf16(x[i]));
      return;
    case Type::Q4_0: q4_0(x, y, n); return;
    case Type::Q5_0: q5_0(x, y, n); return;
    case Type::Q5_1: q5_1(x, y, n); return;
    case Type::Q8_0: q8_0(x, y, n); return;
    case Type::Q4_K: q4_K(x, y, n); return;
    case Type::Q5_K: q5_K(x, y, n); return;
    case Type::Q6_K: q6_K(x, y, n); return;
    default: break;
  }
  QF_CHECK(false, "ggml type ", static_cast<uint32_t>(type), " is not supported");
}

void quantize_rows(Type type, const float* x, int64_t nrows, int64_t ncols, void* out, int64_t out_bytes,
                   int threads) {
  QF_CHECK(nrows >= 0, "row count must be >= 0, got ", nrows);
  const int64_t rb = row_bytes(type, ncols);
  QF_CHECK(nrows == 0 || rb <= INT64_MAX / nrows, "tensor of ", nrows, " x ", ncols, " is too large");
  QF_CHECK(out_bytes >= nrows * rb, "output holds ", out_bytes, " bytes, ", nrows, " rows of ", type_name(type),
           " need ", nrows * rb);
  if (nrows == 0) return;
  QF_CHECK(x != nullptr && out != nullptr, "quantize_rows: null input or output");
  const bool quantized = traits(type).block > 1;
  if (quantized) {  // the block formats' integer conversions are undefined for NaN/Inf
    for (int64_t i = 0; i < nrows * ncols; ++i)
      QF_CHECK(std::isfinite(x[i]), "element ", i, " (row ", i / ncols, ") is not finite (", x[i],
               "); cannot quantize to ", type_name(type));
  }
  int n_threads = threads > 0 ? threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  n_threads = static_cast<int>(std::min<int64_t>({n_threads, kMaxThreads, nrows}));
  // tiny tensors are not worth a thread
  if (!quantized || nrows * ncols < (int64_t{1} << 16)) n_threads = 1;
  auto* y = static_cast<uint8_t*>(out);
  auto work = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) quantize_row_reference(type, x + r * ncols, ncols, y + r * rb);
  };
  if (n_threads == 1) {
    work(0, nrows);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t per = (nrows + n_threads - 1) / n_threads;
  int64_t first_unstarted = per;  // rows [0, per) are the calling thread's share
  try {
    for (int t = 1; t < n_threads; ++t) {
      const int64_t r0 = t * per, r1 = std::min(nrows, r0 + per);
      if (r0 >= r1) break;
      pool.emplace_back(work, r0, r1);
      first_unstarted = r1;
    }
  } catch (const std::system_error&) {
    // the system refused a thread: this thread quantizes the rest itself
  }
  work(0, std::min(per, nrows));
  if (first_unstarted < nrows) work(first_unstarted, nrows);
  for (auto& t : pool) t.join();
}

}  // namespace qforge::gguf
