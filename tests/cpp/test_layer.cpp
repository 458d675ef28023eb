// The layer kernels (src/layer): the CPU twins against float64 references
// written here, the C ABI's errors, and (with a GPU) CUDA against the twins.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/float_io.hpp"
#include "qforge/cuda_runtime.hpp"
#include "qforge/layer.hpp"
#include "qforge/qforge.h"

#ifdef QFORGE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace {

using qforge::Device;
using qforge::DType;
using qforge::dtype_name;
using qforge::load_float;
using qforge::store_float;

// A host buffer of n elements of dtype.
struct Buf {
  DType dtype;
  std::vector<uint8_t> bytes;
  Buf(DType d, int64_t n) : dtype(d), bytes(static_cast<size_t>(n) * qforge::dtype_size(d)) {}
  int64_t size() const { return static_cast<int64_t>(bytes.size() / qforge::dtype_size(dtype)); }
  void* data() { return bytes.data(); }
  const void* data() const { return bytes.data(); }
  double at(int64_t i) const { return load_float(bytes.data(), dtype, i); }
};

Buf random_buf(DType d, int64_t n, std::mt19937& rng, float scale = 1.0f) {
  Buf b(d, n);
  std::normal_distribution<float> nd(0.0f, scale);
  for (int64_t i = 0; i < n; ++i) store_float(b.data(), d, i, nd(rng));
  return b;
}

// One ulp of dtype at |v| (relative 2^-7 for bf16, 2^-10 for fp16, 2^-23 fp32), plus a floor.
double ulp(DType d, double v) {
  const int bits = d == DType::BF16 ? 7 : d == DType::F16 ? 10 : 23;
  return std::ldexp(std::max(std::fabs(v), 1e-3), -bits);
}

constexpr DType kDtypes[] = {DType::F32, DType::F16, DType::BF16};

// ---------------------------------------------------------- CPU twins vs float64
TEST(LayerCpu, RmsNormForwardAndBackwardMatchFloat64) {
  std::mt19937 rng(11);
  for (DType d : kDtypes)
    for (int64_t dim : {int64_t(1), int64_t(7), int64_t(64), int64_t(1000)}) {
      const int64_t rows = 5;
      const float eps = 1e-5f;
      Buf x = random_buf(d, rows * dim, rng, 2.0f), w = random_buf(d, dim, rng), dy = random_buf(d, rows * dim, rng);
      Buf y(d, rows * dim), dx(d, rows * dim);
      std::vector<float> rstd(rows);
      const qforge::layer::RmsNormArgs a{x.data(), d, w.data(), d, rows, dim};
      qforge::layer::rms_norm_forward(Device::CPU, a, eps, y.data(), rstd.data(), nullptr);
      qforge::layer::rms_norm_backward(Device::CPU, a, dy.data(), rstd.data(), dx.data(), nullptr);
      for (int64_t r = 0; r < rows; ++r) {
        double ss = 0;
        for (int64_t j = 0; j < dim; ++j) ss += x.at(r * dim + j) * x.at(r * dim + j);
        const double inv = 1.0 / std::sqrt(ss / dim + eps);
        EXPECT_NEAR(rstd[r], inv, 1e-5 * inv) << "row " << r;
        double dot = 0;  // sum_j g_j xhat_j, the backward's row constant
        for (int64_t j = 0; j < dim; ++j) dot += dy.at(r * dim + j) * w.at(j) * x.at(r * dim + j) * inv;
        for (int64_t j = 0; j < dim; ++j) {
          const int64_t i = r * dim + j;
          // y = w * round(x * rstd): allow the inner rounding plus the outer one
          const double yref = w.at(j) * x.at(i) * inv;
          EXPECT_NEAR(y.at(i), yref, 2.5 * ulp(d, yref) + 1e-6) << "dim " << dim << " i " << i;
          const double dxref = inv * (dy.at(i) * w.at(j) - x.at(i) * inv * dot / dim);
          EXPECT_NEAR(dx.at(i), dxref, 1.5 * ulp(d, dxref) + 2e-5 * (std::fabs(inv) + 1)) << "dim " << dim;
        }
      }
    }
}

TEST(LayerCpu, RmsNormFp32WeightWithHalfInput) {
  std::mt19937 rng(12);
  const int64_t rows = 3, dim = 24;
  Buf x = random_buf(DType::BF16, rows * dim, rng), w = random_buf(DType::F32, dim, rng);
  Buf y(DType::BF16, rows * dim);
  std::vector<float> rstd(rows);
  qforge::layer::rms_norm_forward(Device::CPU, {x.data(), DType::BF16, w.data(), DType::F32, rows, dim}, 1e-6f,
                                  y.data(), rstd.data(), nullptr);
  for (int64_t i = 0; i < rows * dim; ++i) {
    // Llama's order: the normalized value is rounded to bf16 before the weight multiplies it
    const float normed = qforge::round_to(DType::BF16, static_cast<float>(x.at(i)) * rstd[i / dim]);
    EXPECT_EQ(y.at(i), qforge::round_to(DType::BF16, static_cast<float>(w.at(i % dim)) * normed)) << i;
  }
}

TEST(LayerCpu, SwigluForwardAndBackwardMatchFloat64) {
  std::mt19937 rng(13);
  for (DType d : kDtypes) {
    const int64_t n = 1001;
    Buf g = random_buf(d, n, rng, 3.0f), u = random_buf(d, n, rng), dout = random_buf(d, n, rng);
    store_float(g.data(), d, 0, -100.0f);  // exp(100) overflows fp32: silu -> -0, not NaN
    Buf out(d, n), dg(d, n), du(d, n);
    qforge::layer::swiglu_forward(Device::CPU, g.data(), u.data(), d, n, out.data(), nullptr);
    qforge::layer::swiglu_backward(Device::CPU, dout.data(), g.data(), u.data(), d, n, dg.data(), du.data(), nullptr);
    for (int64_t i = 0; i < n; ++i) {
      const double gv = g.at(i), sig = 1.0 / (1.0 + std::exp(-gv)), s = gv * sig;
      EXPECT_NEAR(out.at(i), s * u.at(i), 2.5 * ulp(d, s * u.at(i))) << i;
      const double duref = dout.at(i) * s, dgref = dout.at(i) * u.at(i) * sig * (1 + gv * (1 - sig));
      const double fp32_slack = 1e-6 * std::fabs(dout.at(i)) * (std::fabs(u.at(i)) + std::fabs(gv) + 1);
      EXPECT_NEAR(du.at(i), duref, 1.5 * ulp(d, duref) + fp32_slack) << i;
      EXPECT_NEAR(dg.at(i), dgref, 1.5 * ulp(d, dgref) + fp32_slack) << i;
    }
  }
}

// x rotated by HF's x * cos + rotate_half(x) * sin, in float64.
std::vector<double> rope_reference(const Buf& x, const Buf& cos, const Buf& sin, int64_t B, int64_t T,
                                   int64_t H, int64_t D, int64_t cos_batch) {
  std::vector<double> out(static_cast<size_t>(B * T * H * D));
  const int64_t half = D / 2;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < D; ++i) {
          const int64_t base = ((b * T + t) * H + h) * D, cs = ((cos_batch == 1 ? 0 : b) * T + t) * D;
          const double rot = i < half ? -x.at(base + i + half) : x.at(base + i - half);
          out[base + i] = x.at(base + i) * cos.at(cs + i) + rot * sin.at(cs + i);
        }
  return out;
}

TEST(LayerCpu, RopeMatchesFloat64AndBackwardInvertsForward) {
  std::mt19937 rng(14);
  for (DType d : kDtypes)
    for (DType cd : {d, DType::F32})
      for (int64_t cos_batch : {int64_t(1), int64_t(2)}) {
        const int64_t B = 2, T = 5, H = 3, D = 6;
        Buf x = random_buf(d, B * T * H * D, rng);
        // HF's cos/sin: angles repeated over the two halves, so cos^2 + sin^2 = 1 per pair
        Buf cos(cd, cos_batch * T * D), sin(cd, cos_batch * T * D);
        std::uniform_real_distribution<float> angle(-3.0f, 3.0f);
        for (int64_t r = 0; r < cos_batch * T; ++r)
          for (int64_t i = 0; i < D / 2; ++i) {
            const float a = angle(rng);
            for (int64_t k : {i, i + D / 2}) {
              store_float(cos.data(), cd, r * D + k, std::cos(a));
              store_float(sin.data(), cd, r * D + k, std::sin(a));
            }
          }
        Buf y(d, x.size());
        qforge::layer::RopeArgs a;
        a.x = x.data();
        a.out = y.data();
        a.dtype = d;
        a.batch = B, a.seq = T, a.heads = H, a.head_dim = D;
        a.cos = cos.data(), a.sin = sin.data(), a.cos_dtype = cd, a.cos_batch = cos_batch;
        qforge::layer::rope(Device::CPU, a, false, nullptr);
        const std::vector<double> ref = rope_reference(x, cos, sin, B, T, H, D, cos_batch);
        for (int64_t i = 0; i < x.size(); ++i) EXPECT_NEAR(y.at(i), ref[i], 2 * ulp(d, ref[i]) + 1e-6) << i;
        // in place: the backward (the transpose rotation) brings x back up to rounding
        a.x = y.data();
        qforge::layer::rope(Device::CPU, a, true, nullptr);
        for (int64_t i = 0; i < x.size(); ++i) {
          const int64_t partner = i % D < D / 2 ? i + D / 2 : i - D / 2;  // the other element of its pair
          const double pair = std::max(std::fabs(x.at(i)), std::fabs(x.at(partner)));
          EXPECT_NEAR(y.at(i), x.at(i), 4 * ulp(d, pair) + 1e-6) << i;
        }
      }
}

// ------------------------------------------------------------------ C ABI errors
void expect_error(int status, const std::string& needle) {
  EXPECT_EQ(status, QF_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(qf_last_error()).find(needle), std::string::npos) << qf_last_error();
}

TEST(LayerCapi, BadArgumentsAreNamed) {
  std::vector<float> x(64), y(64), w(8), r(8), c(64), s(64);
  expect_error(qf_rms_norm_forward(QF_CPU, x.data(), QF_INT64, w.data(), QF_FLOAT32, 8, 8, 1e-5f, y.data(),
                                   r.data(), nullptr),
               "rms_norm_forward: x must be float32, float16 or bfloat16, got int64");
  expect_error(qf_rms_norm_forward(QF_CPU, x.data(), QF_BFLOAT16, w.data(), QF_FLOAT16, 8, 8, 1e-5f, y.data(),
                                   r.data(), nullptr),
               "weight must be bfloat16 (as x) or float32, got float16");
  expect_error(qf_rms_norm_forward(QF_CPU, x.data(), QF_FLOAT32, w.data(), QF_FLOAT32, 8, 0, 1e-5f, y.data(),
                                   r.data(), nullptr),
               "normalized dimension must be > 0, got 0");
  expect_error(qf_rms_norm_forward(QF_CPU, x.data(), QF_FLOAT32, w.data(), QF_FLOAT32, 8, 8, -1.0f, y.data(),
                                   r.data(), nullptr),
               "eps must be >= 0");
  expect_error(qf_rms_norm_forward(QF_CPU, x.data(), QF_FLOAT32, w.data(), QF_FLOAT32, 4, 8, 1e-5f, x.data() + 3,
                                   r.data(), nullptr),
               "y partially overlaps x");
  expect_error(qf_rms_norm_forward(QF_CPU, x.data(), QF_FLOAT32, w.data(), QF_FLOAT32, int64_t(1) << 40,
                                   int64_t(1) << 40, 1e-5f, y.data(), r.data(), nullptr),
               "overflows int64");
  expect_error(qf_rms_norm_backward(QF_CPU, nullptr, x.data(), QF_FLOAT32, w.data(), QF_FLOAT32, r.data(), 8, 8,
                                    y.data(), nullptr),
               "null dy, rstd or dx");
  expect_error(qf_swiglu_forward(static_cast<qf_device>(7), x.data(), y.data(), QF_FLOAT32, 8, w.data(), nullptr),
               "swiglu_forward: unknown device 7");
  expect_error(qf_swiglu_backward(QF_CPU, x.data(), y.data(), w.data(), QF_FLOAT32, 8, c.data(), c.data(), nullptr),
               "dgate and dup must be different buffers");
  expect_error(qf_swiglu_backward(QF_CPU, x.data(), y.data(), w.data(), QF_FLOAT32, 8, c.data(), c.data() + 4,
                                  nullptr),
               "dgate partially overlaps dup");
  expect_error(qf_swiglu_forward(QF_CPU, x.data(), y.data(), QF_FLOAT32, -1, c.data(), nullptr),
               "sizes must be >= 0, got -1");
  expect_error(qf_rope(QF_CPU, x.data(), x.data(), QF_FLOAT32, 1, 2, 2, 5, c.data(), s.data(), QF_FLOAT32, 1, 0,
                       nullptr),
               "head_dim must be even and > 0");
  expect_error(qf_rope(QF_CPU, x.data(), x.data(), QF_FLOAT32, 2, 2, 2, 4, c.data(), s.data(), QF_FLOAT32, 3, 0,
                       nullptr),
               "cos/sin have batch 3 but x has batch 2 (expected 1 or 2)");
  expect_error(qf_rope(QF_CPU, x.data(), x.data(), QF_BFLOAT16, 1, 2, 2, 4, c.data(), s.data(), QF_FLOAT16, 1, 1,
                       nullptr),
               "rope_backward: cos and sin must be bfloat16 (as x) or float32, got float16");
  // empty tensors are fine and touch nothing
  EXPECT_EQ(qf_swiglu_forward(QF_CPU, nullptr, nullptr, QF_FLOAT32, 0, nullptr, nullptr), QF_OK);
  EXPECT_EQ(qf_rope(QF_CPU, nullptr, nullptr, QF_FLOAT32, 0, 2, 2, 4, nullptr, nullptr, QF_FLOAT32, 1, 0, nullptr),
            QF_OK);
}

TEST(LayerCapi, CudaWithoutDeviceIsAClearError) {
  if (qf_cuda_device_count() > 0) GTEST_SKIP() << "a GPU is present; the GPU tests cover CUDA";
  std::vector<float> g(8), u(8), o(8);
  EXPECT_EQ(qf_swiglu_forward(QF_CUDA, g.data(), u.data(), QF_FLOAT32, 8, o.data(), nullptr),
            QF_ERR_INVALID_ARGUMENT);
  const std::string msg = qf_last_error();
  EXPECT_TRUE(msg.find("no CUDA device") != std::string::npos || msg.find("built without CUDA") != std::string::npos)
      << msg;
}

// ------------------------------------------------------------- CUDA vs CPU twin
#ifdef QFORGE_WITH_CUDA
// A device copy of b starting `offset` elements into its allocation (offset
// 1 misaligns the 16-byte vector path, exercising the scalar one).
struct Dev {
  void* base = nullptr;
  void* p = nullptr;
  size_t bytes = 0;
  // an output of n elements, poisoned with NaN (all bits set) to catch unwritten ones
  Dev(DType d, int64_t n, int64_t offset = 0) {
    const size_t esize = qforge::dtype_size(d);
    bytes = static_cast<size_t>(n) * esize;
    EXPECT_EQ(cudaMalloc(&base, bytes + 64), cudaSuccess);
    p = static_cast<uint8_t*>(base) + offset * esize;
    EXPECT_EQ(cudaMemset(base, 0xff, bytes + 64), cudaSuccess);
  }
  Dev(const Buf& b, int64_t offset = 0) : Dev(b.dtype, b.size(), offset) {
    if (bytes) EXPECT_EQ(cudaMemcpy(p, b.data(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
  }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  ~Dev() { cudaFree(base); }
  Buf get(DType d) const {
    Buf b(d, 0);
    b.bytes.resize(bytes);
    EXPECT_EQ(cudaMemcpy(b.data(), p, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
    return b;
  }
};

// CUDA against the twin. Sums over a row add in another order and CUDA's
// expf may differ from glibc's by an ulp, so an element may differ by an ulp
// of its dtype or by rtol (fp32 arithmetic) relative to its size, atol near
// zero; in fp16/bf16 the rounding hides most such differences, so at most
// max_mismatch_fraction of the elements may differ at all.
struct TwinTolerance {
  double max_mismatch_fraction = 0.0;
  double rtol = 0.0;
  double atol = 0.0;
};

void expect_twin(const Buf& cuda, const Buf& cpu, const char* what, TwinTolerance tol) {
  ASSERT_EQ(cuda.size(), cpu.size());
  int64_t mismatched = 0;
  for (int64_t i = 0; i < cpu.size(); ++i) {
    ASSERT_FALSE(std::isnan(cuda.at(i)) && !std::isnan(cpu.at(i))) << what << " element " << i << " unwritten";
    if (cuda.at(i) != cpu.at(i)) {
      ++mismatched;
      ASSERT_NEAR(cuda.at(i), cpu.at(i), 1.01 * ulp(cuda.dtype, cpu.at(i)) + tol.rtol * std::fabs(cpu.at(i)) + tol.atol)
          << what << " element " << i;
    }
  }
  if (cpu.dtype != DType::F32) EXPECT_LE(mismatched, tol.max_mismatch_fraction * cpu.size() + 1) << what;
}

TEST(LayerCuda, RmsNormMatchesCpuTwin) {
  if (qforge::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(21);
  // short rows (warp per row), long rows (block per row), rows past the register cache, odd sizes
  for (DType d : kDtypes)
    for (DType wd : {d, DType::F32})
      for (int64_t dim : {int64_t(8), int64_t(100), int64_t(1024), int64_t(4097), int64_t(40000)})
        for (int64_t offset : {int64_t(0), int64_t(1)}) {
          const int64_t rows = dim > 4096 ? 7 : 37;
          SCOPED_TRACE(testing::Message() << "dtype " << dtype_name(d) << " weight " << dtype_name(wd) << " dim " << dim
                                          << " off " << offset);
          Buf x = random_buf(d, rows * dim, rng, 3.0f), w = random_buf(wd, dim, rng), dy = random_buf(d, rows * dim, rng);
          const qforge::layer::RmsNormArgs a{x.data(), d, w.data(), wd, rows, dim};
          Buf y(d, rows * dim), dx(d, rows * dim);
          std::vector<float> rstd(rows);
          qforge::layer::rms_norm_forward(Device::CPU, a, 1e-6f, y.data(), rstd.data(), nullptr);
          qforge::layer::rms_norm_backward(Device::CPU, a, dy.data(), rstd.data(), dx.data(), nullptr);
          Dev xd(x, offset), wdev(w), dyd(dy, offset), yd(d, rows * dim, offset), dxd(d, rows * dim, offset);
          Dev rd(DType::F32, rows);
          const qforge::layer::RmsNormArgs ad{xd.p, d, wdev.p, wd, rows, dim};
          qforge::layer::rms_norm_forward(Device::CUDA, ad, 1e-6f, yd.p, static_cast<float*>(rd.p), nullptr);
          Buf rstd_cuda = rd.get(DType::F32);
          for (int64_t r = 0; r < rows; ++r) EXPECT_NEAR(rstd_cuda.at(r), rstd[r], 2e-6 * rstd[r]) << r;
          // the backward from the CPU's rstd, so that only the kernel differs
          EXPECT_EQ(cudaMemcpy(rd.p, rstd.data(), rows * 4, cudaMemcpyHostToDevice), cudaSuccess);
          qforge::layer::rms_norm_backward(Device::CUDA, ad, dyd.p, static_cast<float*>(rd.p), dxd.p, nullptr);
          ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
          const TwinTolerance tol{0.02, 4e-6, 1e-5};
          expect_twin(yd.get(d), y, "y", tol);
          expect_twin(dxd.get(d), dx, "dx", tol);
          // in place: dx over dy
          qforge::layer::rms_norm_backward(Device::CUDA, ad, dyd.p, static_cast<float*>(rd.p), dyd.p, nullptr);
          ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
          expect_twin(dyd.get(d), dx, "dx in place", tol);
        }
}

TEST(LayerCuda, SwigluMatchesCpuTwinInAndOutOfPlace) {
  if (qforge::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(22);
  for (DType d : kDtypes)
    for (int64_t n : {int64_t(1), int64_t(13), int64_t(4096 + 5), int64_t(3 << 20)})
      for (int64_t offset : {int64_t(0), int64_t(1)}) {
        SCOPED_TRACE(testing::Message() << "dtype " << dtype_name(d) << " n " << n << " off " << offset);
        Buf g = random_buf(d, n, rng, 3.0f), u = random_buf(d, n, rng), dout = random_buf(d, n, rng);
        Buf out(d, n), dg(d, n), du(d, n);
        qforge::layer::swiglu_forward(Device::CPU, g.data(), u.data(), d, n, out.data(), nullptr);
        qforge::layer::swiglu_backward(Device::CPU, dout.data(), g.data(), u.data(), d, n, dg.data(), du.data(),
                                       nullptr);
        Dev gd(g, offset), ud(u, offset), dd(dout, offset), od(d, n, offset), dgd(d, n, offset), dud(d, n, offset);
        qforge::layer::swiglu_forward(Device::CUDA, gd.p, ud.p, d, n, od.p, nullptr);
        qforge::layer::swiglu_backward(Device::CUDA, dd.p, gd.p, ud.p, d, n, dgd.p, dud.p, nullptr);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        // fp32 dgate: 1 + g (1 - s) cancels near g = -1.28, so an ulp of expf grows there
        const TwinTolerance tol{0.01, 1e-6, 1e-6};
        expect_twin(od.get(d), out, "out", tol);
        expect_twin(dgd.get(d), dg, "dgate", tol);
        expect_twin(dud.get(d), du, "dup", tol);
        qforge::layer::swiglu_backward(Device::CUDA, dd.p, gd.p, ud.p, d, n, gd.p, ud.p, nullptr);  // in place
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        expect_twin(gd.get(d), dg, "dgate in place", tol);
        expect_twin(ud.get(d), du, "dup in place", tol);
      }
}

TEST(LayerCuda, RopeMatchesCpuTwinBitForBit) {
  if (qforge::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(23);
  struct Shape { int64_t B, T, H, D; };
  for (DType d : kDtypes)
    for (DType cd : {d, DType::F32})
      for (Shape s : {Shape{2, 33, 5, 128}, Shape{1, 7, 3, 6}, Shape{3, 17, 9, 64}, Shape{2, 9, 2, 18}})
        for (int64_t cos_batch : {int64_t(1), s.B})
          for (bool backward : {false, true}) {
            SCOPED_TRACE(testing::Message() << "dtype " << dtype_name(d) << " cos " << dtype_name(cd) << " D " << s.D
                                            << " back " << backward);
            const int64_t n = s.B * s.T * s.H * s.D;
            Buf x = random_buf(d, n, rng), cos = random_buf(cd, cos_batch * s.T * s.D, rng),
                sin = random_buf(cd, cos_batch * s.T * s.D, rng), y(d, n);
            qforge::layer::RopeArgs a;
            a.x = x.data(), a.out = y.data(), a.dtype = d;
            a.batch = s.B, a.seq = s.T, a.heads = s.H, a.head_dim = s.D;
            a.cos = cos.data(), a.sin = sin.data(), a.cos_dtype = cd, a.cos_batch = cos_batch;
            qforge::layer::rope(Device::CPU, a, backward, nullptr);
            Dev xd(x), cdv(cos), sdv(sin), yd(d, n);
            a.x = xd.p, a.out = yd.p, a.cos = cdv.p, a.sin = sdv.p;
            qforge::layer::rope(Device::CUDA, a, backward, nullptr);
            a.out = xd.p;  // in place
            qforge::layer::rope(Device::CUDA, a, backward, nullptr);
            ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
            // the same products and sums in the same order: bit for bit
            EXPECT_EQ(yd.get(d).bytes, y.bytes);
            EXPECT_EQ(xd.get(d).bytes, y.bytes) << "in place";
          }
}
#endif

}  // namespace
