// The NF4 CPU twin against facts of bitsandbytes' format, and the C ABI's
// error contract. (Bit-exactness against bitsandbytes itself: tests/python.)
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/half.hpp"
#include "nf4/rules.hpp"
#include "qforge/nf4.hpp"
#include "qforge/qforge.h"

namespace nf4 = qforge::nf4;

namespace {

using qforge::Device;
using qforge::DType;

nf4::Weights plain_weights(const std::vector<uint8_t>& packed, const std::vector<float>& absmax,
                           int64_t numel, int32_t blocksize) {
  nf4::Weights w;
  w.packed = packed.data();
  w.packed_bytes = static_cast<int64_t>(packed.size());
  w.numel = numel;
  w.blocksize = blocksize;
  w.code = nf4::kCode;
  w.absmax = absmax.data();
  w.absmax_len = static_cast<int64_t>(absmax.size());
  return w;
}

// The same weight as the C ABI describes it.
qf_nf4_weights c_weights(const nf4::Weights& w) {
  return qf_nf4_weights{w.packed,        w.packed_bytes,      w.numel,       w.blocksize,
                        w.code,          w.absmax,            w.nested ? QF_UINT8 : QF_FLOAT32,
                        w.absmax_len,    w.nested_absmax,     w.nested_absmax_len,
                        w.nested_code,   w.nested_offset,     w.nested_blocksize};
}

uint8_t level_of(const std::vector<uint8_t>& packed, int64_t i) {
  return (i & 1) ? (packed[i >> 1] & 0x0f) : (packed[i >> 1] >> 4);
}

}  // namespace

TEST(Nf4Rules, LevelsMapToThemselvesAndMidpointTiesGoDown) {
  for (int l = 0; l < 16; ++l) EXPECT_EQ(nf4::nf4_level(nf4::kCode[l]), l);
  for (int l = 0; l < 15; ++l) {
    const float mid = nf4::nf4_midpoint(l);
    EXPECT_LT(std::fabs(mid - (nf4::kCode[l] + nf4::kCode[l + 1]) / 2), 1e-7f) << l;
    EXPECT_EQ(nf4::nf4_level(mid), l) << "midpoint " << l;
    EXPECT_EQ(nf4::nf4_level(std::nextafter(mid, 2.0f)), l + 1);
  }
  EXPECT_EQ(nf4::nf4_level(NAN), 0);
  EXPECT_EQ(nf4::nf4_level(-7.0f), 0);
  EXPECT_EQ(nf4::nf4_level(7.0f), 15);
}

TEST(Nf4Rules, DynamicMapRoundsToNearest) {
  // kDynamicMap is sorted; every entry maps to itself and values between two
  // entries go to the nearer one.
  for (int i = 1; i < 256; ++i) ASSERT_LT(nf4::kDynamicMap[i - 1], nf4::kDynamicMap[i]);
  std::mt19937 gen(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int i = 0; i < 256; ++i) EXPECT_EQ(nf4::code8_index(nf4::kDynamicMap, nf4::kDynamicMap[i]), i);
  for (int t = 0; t < 20000; ++t) {
    const float x = u(gen);
    const int q = nf4::code8_index(nf4::kDynamicMap, x);
    for (int j = 0; j < 256; ++j)
      ASSERT_LE(std::fabs(x - nf4::kDynamicMap[q]), std::fabs(x - nf4::kDynamicMap[j])) << x;
  }
}

TEST(Nf4Cpu, QuantizeDequantizeRoundTripsLevelsExactly) {
  // Values that are exactly level * absmax come back bit-for-bit.
  const int32_t bs = 64;
  const int64_t n = 3 * bs + 7;  // odd count, partial last block
  std::vector<float> x(n);
  for (int64_t i = 0; i < n; ++i) x[i] = nf4::kCode[(i * 7) % 16] * (1.5f + static_cast<float>(i / bs));
  std::vector<uint8_t> packed(nf4::packed_bytes(n));
  std::vector<float> absmax(nf4::num_blocks(n, bs));
  nf4::quantize(Device::CPU, x.data(), DType::F32, n, bs, packed.data(), packed.size(), absmax.data(),
                absmax.size(), nullptr);
  for (int64_t b = 0; b < 4; ++b) EXPECT_EQ(absmax[b], 1.5f + b);
  for (int64_t i = 0; i < n; ++i) EXPECT_EQ(level_of(packed, i), (i * 7) % 16) << i;
  EXPECT_EQ(packed.back() & 0x0f, 7) << "odd tail pads with 0.0 -> level 7";
  std::vector<float> out(n);
  const auto w = plain_weights(packed, absmax, n, bs);
  nf4::dequantize(Device::CPU, w, out.data(), DType::F32, n, nullptr);
  for (int64_t i = 0; i < n; ++i) EXPECT_EQ(out[i], x[i]) << i;
}

TEST(Nf4Cpu, AllZeroBlockIsLevelZeroWithZeroAbsmax) {
  std::vector<float> x(128, 0.0f);
  x[100] = 0.5f;
  std::vector<uint8_t> packed(64);
  std::vector<float> absmax(2);
  nf4::quantize(Device::CPU, x.data(), DType::F32, 128, 64, packed.data(), 64, absmax.data(), 2, nullptr);
  EXPECT_EQ(absmax[0], 0.0f);
  for (int i = 0; i < 32; ++i) EXPECT_EQ(packed[i], 0x00);
  std::vector<float> out(128);
  nf4::dequantize(Device::CPU, plain_weights(packed, absmax, 128, 64), out.data(), DType::F32, 128,
                  nullptr);
  for (int i = 0; i < 64; ++i) EXPECT_EQ(out[i], 0.0f);
  EXPECT_EQ(out[100], 0.5f);
}

TEST(Nf4Cpu, DoubleQuantizedAbsmaxRoundsMultiplyAndAddSeparately) {
  const int64_t n = 64 * 300;  // 300 blocks -> 2 nested blocks of 256
  std::vector<uint8_t> packed(n / 2, 0xf0);  // levels 15 (1.0) and 0 (-1.0)
  std::vector<uint8_t> q(300);
  for (int b = 0; b < 300; ++b) q[b] = static_cast<uint8_t>((b * 37) % 256);
  const float nested_absmax[2] = {0.75f, 3.0f}, offset = 0.1f;
  nf4::Weights w;
  w.packed = packed.data();
  w.packed_bytes = n / 2;
  w.numel = n;
  w.blocksize = 64;
  w.code = nf4::kCode;
  w.absmax = q.data();
  w.nested = true;
  w.absmax_len = 300;
  w.nested_absmax = nested_absmax;
  w.nested_absmax_len = 2;
  w.nested_code = nf4::kDynamicMap;
  w.nested_offset = &offset;
  w.nested_blocksize = 256;
  std::vector<uint16_t> out(n);
  nf4::dequantize(Device::CPU, w, out.data(), DType::BF16, n, nullptr);
  for (int b = 0; b < 300; ++b) {
    volatile float scaled = nf4::kDynamicMap[q[b]] * nested_absmax[b / 256];
    const float scale = scaled + offset;
    EXPECT_EQ(out[b * 64], qforge::float_to_bf16(scale));
    EXPECT_EQ(out[b * 64 + 1], qforge::float_to_bf16(-scale));
  }
}

TEST(HalfConversions, RoundToNearestEvenLikeCuda) {
  EXPECT_EQ(qforge::float_to_half(1.0f), 0x3c00);
  EXPECT_EQ(qforge::float_to_half(65504.0f), 0x7bff);
  EXPECT_EQ(qforge::float_to_half(65520.0f), 0x7c00);                     // rounds up to inf
  EXPECT_EQ(qforge::float_to_half(std::ldexp(1.0f, -24)), 0x0001);        // smallest subnormal
  EXPECT_EQ(qforge::float_to_half(std::ldexp(1.0f, -25)), 0x0000);        // tie -> even (0)
  EXPECT_EQ(qforge::float_to_half(std::ldexp(3.0f, -25)), 0x0002);        // tie -> even (2)
  EXPECT_EQ(qforge::float_to_half(1.0f + std::ldexp(1.0f, -11)), 0x3c00);  // tie -> even
  EXPECT_EQ(qforge::float_to_half(1.0f + std::ldexp(3.0f, -11)), 0x3c02);
  EXPECT_EQ(qforge::float_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);  // tie -> even
  EXPECT_EQ(qforge::float_to_bf16(1.0f + std::ldexp(3.0f, -8)), 0x3f82);
  EXPECT_TRUE(std::isnan(qforge::bf16_to_float(qforge::float_to_bf16(NAN))));
  for (uint32_t h = 0; h < 0x7c00; ++h)  // every finite half survives a round trip
    ASSERT_EQ(qforge::float_to_half(qforge::half_to_float(static_cast<uint16_t>(h))), h);
}

// qf_nf4_quantize of 100 float elements into `packed` and `absmax_len` absmax
// entries: the status, and qf_last_error() in `message`.
int quantize_100(const std::vector<float>& x, qf_dtype dtype, int32_t blocksize, int64_t absmax_len,
                 std::string& message) {
  std::vector<uint8_t> packed(50);
  std::vector<float> absmax(3);
  const int status = qf_nf4_quantize(QF_CPU, x.data(), dtype, 100, blocksize, packed.data(), 50, absmax.data(),
                                     absmax_len, nullptr);
  message = qf_last_error();
  return status;
}

TEST(CApi, BadInputReturnsStatusAndMessage) {
  const std::vector<float> x(100, 1.0f);
  std::string message;
  EXPECT_EQ(quantize_100(x, QF_FLOAT32, 48, 2, message), QF_ERR_INVALID_ARGUMENT);
  EXPECT_NE(message.find("blocksize must be a power of two"), std::string::npos) << message;
  EXPECT_EQ(quantize_100(x, QF_UINT8, 64, 2, message), QF_ERR_INVALID_ARGUMENT);
  EXPECT_NE(message.find("quantize input must be float32, float16 or bfloat16, got uint8"), std::string::npos)
      << message;
  EXPECT_EQ(quantize_100(x, QF_FLOAT32, 64, 3, message), QF_ERR_INVALID_ARGUMENT);
  EXPECT_NE(message.find("absmax output has 3 entries"), std::string::npos) << message;
  EXPECT_EQ(qf_nf4_quantize(static_cast<qf_device>(7), x.data(), QF_FLOAT32, 100, 64, nullptr, 50, nullptr, 2,
                            nullptr),
            QF_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(qf_last_error()).find("unknown device 7"), std::string::npos) << qf_last_error();
  std::vector<float> out(100);
  EXPECT_EQ(qf_nf4_dequantize(QF_CPU, nullptr, out.data(), QF_FLOAT32, 100, nullptr), QF_ERR_INVALID_ARGUMENT);
  const std::vector<uint8_t> packed(50);
  const std::vector<float> absmax(2);
  auto w = c_weights(plain_weights(packed, absmax, 100, 64));
  w.absmax_dtype = QF_UINT8;  // double-quantized but no nested tensors
  EXPECT_EQ(qf_nf4_dequantize(QF_CPU, &w, out.data(), QF_FLOAT32, 100, nullptr), QF_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(qf_last_error()).find("nested"), std::string::npos);
  w.absmax_dtype = QF_FLOAT16;
  EXPECT_EQ(qf_nf4_dequantize(QF_CPU, &w, out.data(), QF_FLOAT32, 100, nullptr), QF_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(qf_last_error()).find("absmax must be float32 (plain) or uint8 (double-quantized), got "
                                              "float16"),
            std::string::npos)
      << qf_last_error();
  // a success clears the message
  EXPECT_EQ(quantize_100(x, QF_FLOAT32, 64, 2, message), QF_OK);
  EXPECT_EQ(message, "");
}

TEST(CApi, ValidateChecksWithoutReading) {
  const std::vector<uint8_t> packed(50);
  const std::vector<float> absmax(2);
  const auto plain = c_weights(plain_weights(packed, absmax, 100, 64));
  EXPECT_EQ(qf_nf4_validate(&plain), QF_OK) << qf_last_error();
  auto expect_invalid = [&](void (*change)(qf_nf4_weights&), const char* message) {
    qf_nf4_weights w = plain;
    change(w);
    EXPECT_EQ(qf_nf4_validate(&w), QF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(qf_last_error()).find(message), std::string::npos) << qf_last_error();
  };
  expect_invalid([](qf_nf4_weights& w) { w.numel = 101; }, "packed weight has 50 bytes but 101 elements need 51");
  expect_invalid([](qf_nf4_weights& w) { w.absmax_len = 1; },
                 "absmax has 1 entries but 100 elements in blocks of 64 need 2");
  expect_invalid([](qf_nf4_weights& w) { w.blocksize = 48; }, "blocksize must be a power of two from 32 to 4096");
  EXPECT_EQ(qf_nf4_validate(nullptr), QF_ERR_INVALID_ARGUMENT);
}

TEST(CApi, CudaWithoutDeviceIsAClearError) {
  if (qf_cuda_device_count() > 0) GTEST_SKIP() << "a GPU is present; the GPU tests cover CUDA";
  std::vector<float> x(64, 1.0f);
  std::vector<uint8_t> packed(32);
  std::vector<float> absmax(1);
  EXPECT_EQ(qf_nf4_quantize(QF_CUDA, x.data(), QF_FLOAT32, 64, 64, packed.data(), 32,
                            absmax.data(), 1, nullptr),
            QF_ERR_INVALID_ARGUMENT);
  const std::string msg = qf_last_error();
  EXPECT_TRUE(msg.find("no CUDA device") != std::string::npos ||
              msg.find("built without CUDA") != std::string::npos)
      << msg;
}
