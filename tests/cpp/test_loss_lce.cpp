// Fused linear + cross-entropy: the CPU twin against a plain double-precision
// reference written here, the C ABI's errors, and (with a GPU) CUDA vs CPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/half.hpp"
#include "qforge/cuda_runtime.hpp"
#include "qforge/loss.hpp"
#include "qforge/qforge.h"

#ifdef QFORGE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace {

struct Case {
  int64_t N, D, V;
  std::vector<float> h, w, b, cw;
  std::vector<int64_t> y;
};

Case make_case(int64_t N, int64_t D, int64_t V, unsigned seed, double ignore_frac) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_real_distribution<float> ud(0.0f, 1.0f);
  Case c{N, D, V, {}, {}, {}, {}, {}};
  c.h.resize(N * D);
  c.w.resize(V * D);
  c.b.resize(V);
  c.cw.resize(V);
  c.y.resize(N);
  for (auto& x : c.h) x = nd(rng);
  for (auto& x : c.w) x = nd(rng) * 0.4f;
  for (auto& x : c.b) x = nd(rng) * 0.5f;
  for (auto& x : c.cw) x = 0.1f + ud(rng);
  for (auto& y : c.y) y = ud(rng) < ignore_frac ? -100 : int64_t(ud(rng) * V) % V;
  return c;
}

struct Ref {
  double loss;
  std::vector<double> tok, lse, gh, gw, gb;
};

// Straightforward double-precision reference of the documented formulas.
Ref reference(const Case& c, const qf_lce_options& o, bool bias, bool weights,
              const std::vector<float>* gscale) {
  const int64_t N = c.N, D = c.D, V = c.V;
  Ref r;
  r.tok.assign(N, 0.0);
  r.lse.assign(N, 0.0);
  r.gh.assign(N * D, 0.0);
  r.gw.assign(V * D, 0.0);
  r.gb.assign(V, 0.0);
  const double eps = o.label_smoothing;
  double denom = 0.0, wsum = 0.0;
  for (int64_t v = 0; v < V; ++v) wsum += weights ? c.cw[v] : 1.0;
  for (int64_t i = 0; i < N; ++i)
    if (c.y[i] != o.ignore_index) denom += weights ? c.cw[c.y[i]] : 1.0;
  double total = 0.0;
  std::vector<double> z(V), u(V), dz(V);
  for (int64_t i = 0; i < N; ++i) {
    double m = -INFINITY;
    for (int64_t v = 0; v < V; ++v) {
      double a = 0.0;
      for (int64_t k = 0; k < D; ++k) a += double(c.h[i * D + k]) * c.w[v * D + k];
      if (bias) a += c.b[v];
      u[v] = a * o.logit_scale;
      z[v] = o.softcap > 0 ? o.softcap * std::tanh(u[v] / o.softcap) : u[v];
      m = std::max(m, z[v]);
    }
    double s = 0.0;
    for (int64_t v = 0; v < V; ++v) s += std::exp(z[v] - m);
    const double lse = m + std::log(s);
    r.lse[i] = lse;
    const int64_t y = c.y[i];
    if (y == o.ignore_index) continue;
    const double wy = weights ? c.cw[y] : 1.0;
    double sm = 0.0;
    for (int64_t v = 0; v < V; ++v) sm += (weights ? c.cw[v] : 1.0) * (lse - z[v]);
    const double l = (1 - eps) * wy * (lse - z[y]) + eps / V * sm + o.z_loss * lse * lse;
    r.tok[i] = l;
    total += l;
    double sc = o.reduction == QF_REDUCTION_MEAN ? 1.0 / denom : 1.0;
    if (gscale) sc *= (*gscale)[i];
    for (int64_t v = 0; v < V; ++v) {
      const double p = std::exp(z[v] - lse);
      double d = (1 - eps) * wy * (p - (v == y)) + eps / V * (wsum * p - (weights ? c.cw[v] : 1.0)) +
                 2 * o.z_loss * lse * p;
      if (o.softcap > 0) d *= 1 - std::pow(z[v] / o.softcap, 2);
      dz[v] = d * o.logit_scale * sc;
    }
    for (int64_t v = 0; v < V; ++v) {
      r.gb[v] += dz[v];
      for (int64_t k = 0; k < D; ++k) {
        r.gh[i * D + k] += dz[v] * c.w[v * D + k];
        r.gw[v * D + k] += dz[v] * c.h[i * D + k];
      }
    }
  }
  r.loss = o.reduction == QF_REDUCTION_MEAN ? total / denom : total;
  return r;
}

double rel_err(const std::vector<float>& a, const std::vector<double>& r) {
  double num = 0, den = 0;
  for (size_t i = 0; i < r.size(); ++i) {
    num += (a[i] - r[i]) * (a[i] - r[i]);
    den += r[i] * r[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1.0));
}

qf_lce_options opts(int32_t red, float eps = 0, float cap = 0, float scale = 1, float zl = 0,
                    int64_t chunk = 0) {
  qf_lce_options o{};
  o.ignore_index = -100;
  o.label_smoothing = eps;
  o.softcap = cap;
  o.logit_scale = scale;
  o.z_loss = zl;
  o.reduction = red;
  o.validate = 1;
  o.chunk_size = chunk;
  return o;
}

struct Out {
  std::vector<float> loss, lse, gh, gw, gb;
};

Out run_cpu(const Case& c, const qf_lce_options& o, bool bias, bool weights,
            const std::vector<float>* gscale) {
  Out out;
  out.loss.assign(o.reduction == QF_REDUCTION_NONE ? c.N : 1, -7.f);
  out.lse.assign(c.N, -7.f);
  out.gh.assign(c.N * c.D, -7.f);
  out.gw.assign(c.V * c.D, -7.f);
  out.gb.assign(c.V, -7.f);
  int64_t bytes = 0;
  EXPECT_EQ(qf_lce_workspace_bytes(QF_CPU, c.N, c.D, c.V, QF_FLOAT32, o.chunk_size, &bytes), QF_OK);
  std::vector<char> ws(bytes + 16);
  const int st = qf_lce_forward(QF_CPU, c.h.data(), c.w.data(), bias ? c.b.data() : nullptr,
                                QF_FLOAT32, c.N, c.D, c.V, c.y.data(), weights ? c.cw.data() : nullptr,
                                &o, out.loss.data(), out.lse.data(), out.gh.data(), out.gw.data(),
                                QF_FLOAT32, out.gb.data(), gscale ? gscale->data() : nullptr,
                                ws.data(), bytes, nullptr);
  EXPECT_EQ(st, QF_OK) << qf_last_error();
  return out;
}

void expect_close(const Out& out, const Ref& r, const qf_lce_options& o, double tol) {
  if (o.reduction == QF_REDUCTION_NONE)
    EXPECT_LT(rel_err(out.loss, r.tok), tol);
  else
    EXPECT_NEAR(out.loss[0], r.loss, tol * std::max(1.0, std::abs(r.loss)));
  EXPECT_LT(rel_err(out.lse, r.lse), tol);
  EXPECT_LT(rel_err(out.gh, r.gh), tol);
  EXPECT_LT(rel_err(out.gw, r.gw), tol);
  EXPECT_LT(rel_err(out.gb, r.gb), tol);
}

TEST(LossLce, CpuMatchesDoubleReferenceForEveryOption) {
  struct O { float eps, cap, scale, zl; bool bias, weights; };
  const O list[] = {{0, 0, 1, 0, false, false}, {0.2f, 0, 1, 0, true, false},
                    {0.1f, 0, 1, 0, true, true}, {0, 3.0f, 0.8f, 1e-2f, true, false},
                    {0.3f, 5.0f, 1.3f, 1e-3f, false, true}};
  unsigned seed = 1;
  for (const O& x : list)
    for (int32_t red : {QF_REDUCTION_NONE, QF_REDUCTION_MEAN, QF_REDUCTION_SUM})
      for (int64_t chunk : {int64_t(0), int64_t(1), int64_t(4), int64_t(23)}) {
        const Case c = make_case(23, 11, 37, seed++, 0.3);
        const qf_lce_options o = opts(red, x.eps, x.cap, x.scale, x.zl, chunk);
        std::vector<float> g(c.N);
        std::mt19937 rng(seed);
        std::normal_distribution<float> nd;
        for (auto& v : g) v = nd(rng);
        const std::vector<float>* gs = red == QF_REDUCTION_NONE ? &g : nullptr;
        const Ref r = reference(c, o, x.bias, x.weights, gs);
        const Out out = run_cpu(c, o, x.bias, x.weights, gs);
        SCOPED_TRACE(testing::Message() << "eps=" << x.eps << " cap=" << x.cap << " red=" << red
                                        << " chunk=" << chunk);
        expect_close(out, r, o, 2e-5);
      }
}

TEST(LossLce, AllIgnoredMeanIsNanWithZeroGradients) {
  Case c = make_case(5, 4, 9, 3, 1.0);
  const qf_lce_options o = opts(QF_REDUCTION_MEAN, 0, 0, 1, 0, 2);
  const Out out = run_cpu(c, o, true, false, nullptr);
  EXPECT_TRUE(std::isnan(out.loss[0]));
  for (float g : out.gh) EXPECT_EQ(g, 0.0f);
  for (float g : out.gw) EXPECT_EQ(g, 0.0f);
  for (float g : out.gb) EXPECT_EQ(g, 0.0f);
}

TEST(LossLce, Bf16CpuTwinRoundsLikeTheGpu) {
  const Case c = make_case(17, 16, 45, 9, 0.2);
  std::vector<uint16_t> h(c.h.size()), w(c.w.size());
  Case cr = c;  // the reference sees the rounded inputs
  for (size_t i = 0; i < h.size(); ++i) cr.h[i] = qforge::bf16_to_float(h[i] = qforge::float_to_bf16(c.h[i]));
  for (size_t i = 0; i < w.size(); ++i) cr.w[i] = qforge::bf16_to_float(w[i] = qforge::float_to_bf16(c.w[i]));
  const qf_lce_options o = opts(QF_REDUCTION_SUM, 0.1f, 0, 1, 0, 5);
  const Ref r = reference(cr, o, false, false, nullptr);
  float loss = 0;
  std::vector<uint16_t> gh(c.N * c.D), gw(c.V * c.D);
  int64_t bytes = 0;
  ASSERT_EQ(qf_lce_workspace_bytes(QF_CPU, c.N, c.D, c.V, QF_BFLOAT16, 5, &bytes), QF_OK);
  std::vector<char> ws(bytes);
  ASSERT_EQ(qf_lce_forward(QF_CPU, h.data(), w.data(), nullptr, QF_BFLOAT16, c.N, c.D, c.V, c.y.data(),
                           nullptr, &o, &loss, nullptr, gh.data(), gw.data(), QF_BFLOAT16, nullptr,
                           nullptr, ws.data(), bytes, nullptr),
            QF_OK)
      << qf_last_error();
  std::vector<float> ghf(gh.size()), gwf(gw.size());
  for (size_t i = 0; i < gh.size(); ++i) ghf[i] = qforge::bf16_to_float(gh[i]);
  for (size_t i = 0; i < gw.size(); ++i) gwf[i] = qforge::bf16_to_float(gw[i]);
  EXPECT_NEAR(loss, r.loss, 1e-2 * std::abs(r.loss));
  EXPECT_LT(rel_err(ghf, r.gh), 2e-2);
  EXPECT_LT(rel_err(gwf, r.gw), 2e-2);
}

TEST(LossLce, ClearErrors) {
  const Case c = make_case(6, 4, 10, 5, 0.0);
  qf_lce_options o = opts(QF_REDUCTION_MEAN);
  float loss = 0;
  int64_t bytes = 0;
  ASSERT_EQ(qf_lce_workspace_bytes(QF_CPU, c.N, c.D, c.V, QF_FLOAT32, 0, &bytes), QF_OK);
  std::vector<char> ws(bytes);
  auto call = [&](const int64_t* y, int64_t V, int64_t wsb, qf_dtype dt = QF_FLOAT32) {
    return qf_lce_forward(QF_CPU, c.h.data(), c.w.data(), nullptr, dt, c.N, c.D, V, y, nullptr, &o,
                          &loss, nullptr, nullptr, nullptr, QF_FLOAT32, nullptr, nullptr, ws.data(),
                          wsb, nullptr);
  };
  std::vector<int64_t> y = c.y;
  y[4] = 10;
  EXPECT_EQ(call(y.data(), c.V, bytes), QF_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(qf_last_error()).find("labels[4] = 10 is out of range [0, 10)"), std::string::npos)
      << qf_last_error();
  EXPECT_EQ(call(c.y.data(), c.V, bytes - 1), QF_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(qf_last_error()).find("workspace"), std::string::npos);
  EXPECT_EQ(call(c.y.data(), 0, bytes), QF_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(call(c.y.data(), c.V, bytes, QF_UINT8), QF_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(qf_last_error()).find("float32, float16 or bfloat16"), std::string::npos);
  o.label_smoothing = 2.0f;
  EXPECT_EQ(call(c.y.data(), c.V, bytes), QF_ERR_INVALID_ARGUMENT);
  o = opts(7);
  EXPECT_EQ(call(c.y.data(), c.V, bytes), QF_ERR_INVALID_ARGUMENT);
  o = opts(QF_REDUCTION_MEAN);
  EXPECT_EQ(call(c.y.data(), c.V, bytes), QF_OK) << qf_last_error();
  EXPECT_EQ(qf_lce_workspace_bytes(QF_CPU, -1, 4, 4, QF_FLOAT32, 0, &bytes), QF_ERR_INVALID_ARGUMENT);
}

qf_tensor describe(const void* data, qf_dtype dtype, std::initializer_list<int64_t> sizes) {
  qf_tensor t{};
  t.data = data;
  t.dtype = dtype;
  t.device = QF_CPU;
  t.ndim = int32_t(sizes.size());
  int i = 0;
  for (int64_t s : sizes) t.sizes[i++] = s;
  int64_t stride = 1;
  for (int k = t.ndim - 1; k >= 0; --k) {
    t.strides[k] = stride;
    stride *= t.sizes[k];
  }
  return t;
}

qf_tensor absent() {
  qf_tensor t{};
  t.ndim = -1;
  return t;
}

// qf_lce_run (behind the torch ops) checks every tensor's shape, strides,
// dtype and device before it reads anything, and agrees with qf_lce_forward.
TEST(LossLce, TensorDescriptorsAreCheckedBeforeAnyRead) {
  const Case c = make_case(6, 4, 10, 7, 0.2);
  const qf_lce_options o = opts(QF_REDUCTION_MEAN);
  int64_t bytes = 0;
  ASSERT_EQ(qf_lce_workspace_bytes(QF_CPU, c.N, c.D, c.V, QF_FLOAT32, 0, &bytes), QF_OK);
  std::vector<uint8_t> ws(bytes);
  float loss = 0, loss_ref = 0;
  std::vector<float> gh(c.N * c.D), gh_ref(c.N * c.D);
  auto good = [&] {
    qf_lce_tensors t{};
    t.hidden = describe(c.h.data(), QF_FLOAT32, {c.N, c.D});
    t.weight = describe(c.w.data(), QF_FLOAT32, {c.V, c.D});
    t.bias = absent();
    t.labels = describe(c.y.data(), QF_INT64, {c.N});
    t.class_weight = absent();
    t.loss = describe(&loss, QF_FLOAT32, {});
    t.lse = absent();
    t.grad_hidden = describe(gh.data(), QF_FLOAT32, {c.N, c.D});
    t.grad_weight = absent();
    t.grad_bias = absent();
    t.grad_scale = absent();
    t.workspace = describe(ws.data(), QF_UINT8, {bytes});
    return t;
  };
  qf_lce_tensors t = good();
  ASSERT_EQ(qf_lce_run(&t, &o, nullptr), QF_OK) << qf_last_error();
  ASSERT_EQ(qf_lce_forward(QF_CPU, c.h.data(), c.w.data(), nullptr, QF_FLOAT32, c.N, c.D, c.V, c.y.data(),
                           nullptr, &o, &loss_ref, nullptr, gh_ref.data(), nullptr, QF_FLOAT32, nullptr,
                           nullptr, ws.data(), bytes, nullptr),
            QF_OK);
  EXPECT_EQ(loss, loss_ref);
  EXPECT_EQ(gh, gh_ref);

  auto expect_error = [&](const qf_lce_tensors& bad, const std::string& what) {
    loss = -1.0f;
    EXPECT_EQ(qf_lce_run(&bad, &o, nullptr), QF_ERR_INVALID_ARGUMENT) << what;
    EXPECT_NE(std::string(qf_last_error()).find(what), std::string::npos) << qf_last_error();
    EXPECT_EQ(loss, -1.0f) << "nothing may be written for " << what;
  };
  t = good();
  t.labels.sizes[0] = 3;  // fewer labels than tokens: would read past the end
  expect_error(t, "labels must be [N] = [6], got [3]");
  t = good();
  t.weight = describe(c.w.data(), QF_FLOAT32, {c.V, c.D + 1});
  expect_error(t, "disagree on D");
  t = good();
  std::swap(t.hidden.strides[0], t.hidden.strides[1]);  // a transposed view
  expect_error(t, "hidden must be contiguous");
  t = good();
  t.weight.dtype = QF_FLOAT16;
  expect_error(t, "weight (hidden's dtype) must be float32, got float16");
  t = good();
  t.labels.dtype = QF_INT32;
  expect_error(t, "labels must be int64, got int32");
  t = good();
  t.hidden = describe(c.h.data(), QF_FLOAT32, {2, 3, 4});
  expect_error(t, "hidden must be 2-D [N, D]");
  t = good();
  t.hidden.ndim = QF_MAX_DIMS + 1;
  expect_error(t, "at most 8");
  t = good();
  t.hidden.sizes[0] = -6;
  expect_error(t, "negative size -6");
  t = good();
  t.workspace.device = QF_CUDA;
  expect_error(t, "workspace is on cuda:0 but hidden is on cpu");
  t = good();
  t.loss = describe(&loss, QF_FLOAT32, {c.N});
  expect_error(t, "loss (reduction mean/sum) must have one element, got [6]");
  t = good();
  t.labels = absent();
  expect_error(t, "labels is required");
  t = good();
  t.grad_hidden = describe(gh.data(), QF_FLOAT32, {c.N, c.D - 1});
  expect_error(t, "grad_hidden must be [N, D] = [6, 4], got [6, 3]");
  t = good();
  t.workspace.sizes[0] = bytes - 1;
  expect_error(t, "workspace of");
  qf_lce_options bad_reduction = opts(5);
  t = good();
  EXPECT_EQ(qf_lce_run(&t, &bad_reduction, nullptr), QF_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(qf_last_error()).find("reduction must be 0 (none), 1 (mean) or 2 (sum), got 5"),
            std::string::npos);
  EXPECT_EQ(qf_lce_run(nullptr, &o, nullptr), QF_ERR_INVALID_ARGUMENT);
}

// The chunk size query answers with the workspace query's own sizes: the chunk
// fits the budget, the next 128 * 2^k (or the next size below 128) does not.
TEST(LossLce, ChunkSizeFitsTheWorkspaceBudget) {
  for (qf_device device : {QF_CPU, QF_CUDA}) {
    for (int64_t budget : {int64_t(1) << 20, int64_t(7) << 20, int64_t(448) << 20, int64_t(1) << 40}) {
      const int64_t n = 16384, d = 512, v = 32003;
      int64_t chunk = 0, bytes = 0, next = 0;
      ASSERT_EQ(qf_lce_chunk_size(device, n, d, v, QF_BFLOAT16, budget, &chunk), QF_OK) << qf_last_error();
      ASSERT_GE(chunk, 1);
      ASSERT_LE(chunk, n);
      ASSERT_EQ(qf_lce_workspace_bytes(device, n, d, v, QF_BFLOAT16, chunk, &bytes), QF_OK);
      if (chunk == n) {
        EXPECT_LE(bytes, budget);
        continue;
      }
      EXPECT_TRUE(bytes <= budget || chunk == 1) << device << " " << budget << " " << chunk;
      const int64_t larger = chunk >= 128 ? 2 * chunk : chunk + 1;
      ASSERT_EQ(qf_lce_workspace_bytes(device, n, d, v, QF_BFLOAT16, larger, &next), QF_OK);
      EXPECT_GT(next, budget) << device << " " << budget << " " << chunk;
      if (chunk >= 128) EXPECT_EQ(chunk & (chunk - 1), 0) << chunk;  // 128 * 2^k
    }
  }
  int64_t chunk = -1;
  ASSERT_EQ(qf_lce_chunk_size(QF_CPU, 0, 4, 4, QF_FLOAT32, 0, &chunk), QF_OK);
  EXPECT_EQ(chunk, 1);
  EXPECT_EQ(qf_lce_chunk_size(QF_CPU, 8, 4, 4, QF_INT64, 1 << 20, &chunk), QF_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(qf_last_error()).find("dtype must be float32, float16 or bfloat16, got int64"),
            std::string::npos)
      << qf_last_error();
}

TEST(LossLce, ReductionNames) {
  int32_t r = -1;
  ASSERT_EQ(qf_lce_reduction("none", &r), QF_OK);
  EXPECT_EQ(r, QF_REDUCTION_NONE);
  ASSERT_EQ(qf_lce_reduction("mean", &r), QF_OK);
  EXPECT_EQ(r, QF_REDUCTION_MEAN);
  ASSERT_EQ(qf_lce_reduction("sum", &r), QF_OK);
  EXPECT_EQ(r, QF_REDUCTION_SUM);
  EXPECT_EQ(qf_lce_reduction("avg", &r), QF_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(qf_last_error()).find("reduction must be 'mean', 'sum' or 'none', got 'avg'"),
            std::string::npos)
      << qf_last_error();
  EXPECT_EQ(qf_lce_reduction(nullptr, &r), QF_ERR_INVALID_ARGUMENT);
}

#ifdef QFORGE_WITH_CUDA
template <class T>
T* to_dev(const std::vector<T>& v) {
  T* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(1, v.size()) * sizeof(T)), cudaSuccess);
  if (!v.empty()) EXPECT_EQ(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  return p;
}
template <class T>
std::vector<T> from_dev(const T* p, size_t n) {
  std::vector<T> v(n);
  if (n) EXPECT_EQ(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  return v;
}

TEST(LossLceCuda, Fp32MatchesReferenceAndCpuTwin) {
  if (qforge::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (int64_t V : {int64_t(211), int64_t(120001)})  // one CTA per row; a cluster of 4 per row
  for (int32_t red : {QF_REDUCTION_NONE, QF_REDUCTION_MEAN, QF_REDUCTION_SUM})
    for (int64_t chunk : {int64_t(1), int64_t(7), int64_t(0)}) {
      if (V > 1000 && chunk == 1) continue;
      const Case c = make_case(V > 1000 ? 9 : 29, V > 1000 ? 8 : 24, V, 40 + red, 0.4);
      const qf_lce_options o = opts(red, 0.1f, 6.0f, 0.9f, 1e-3f, chunk);
      std::vector<float> g(c.N, 1.0f);
      std::mt19937 rng(3);
      std::normal_distribution<float> nd;
      for (auto& v : g) v = nd(rng);
      const std::vector<float>* gs = red == QF_REDUCTION_NONE ? &g : nullptr;
      const Ref r = reference(c, o, true, true, gs);
      float *h = to_dev(c.h), *w = to_dev(c.w), *b = to_dev(c.b), *cw = to_dev(c.cw), *gsd = to_dev(g);
      int64_t* y = to_dev(c.y);
      const size_t nl = red == QF_REDUCTION_NONE ? c.N : 1;
      float *loss = to_dev(std::vector<float>(nl, -7.f)), *lse = to_dev(std::vector<float>(c.N, -7.f));
      float *gh = to_dev(std::vector<float>(c.N * c.D, -7.f)), *gw = to_dev(std::vector<float>(c.V * c.D, -7.f));
      float* gb = to_dev(std::vector<float>(c.V, -7.f));
      int64_t bytes = 0;
      ASSERT_EQ(qf_lce_workspace_bytes(QF_CUDA, c.N, c.D, c.V, QF_FLOAT32, chunk, &bytes), QF_OK);
      void* ws = nullptr;
      ASSERT_EQ(cudaMalloc(&ws, bytes), cudaSuccess);
      ASSERT_EQ(qf_lce_forward(QF_CUDA, h, w, b, QF_FLOAT32, c.N, c.D, c.V, y, cw, &o, loss, lse, gh, gw,
                               QF_FLOAT32, gb, gs ? gsd : nullptr, ws, bytes, nullptr),
                QF_OK)
          << qf_last_error();
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      Out out{from_dev(loss, nl), from_dev(lse, c.N), from_dev(gh, c.N * c.D), from_dev(gw, c.V * c.D),
              from_dev(gb, c.V)};
      SCOPED_TRACE(testing::Message() << "red=" << red << " chunk=" << chunk);
      expect_close(out, r, o, 2e-5);
      // out-of-range label: a clear error from the device path
      std::vector<int64_t> bad = c.y;
      bad[3] = c.V + 5;
      int64_t* yb = to_dev(bad);
      EXPECT_EQ(qf_lce_forward(QF_CUDA, h, w, b, QF_FLOAT32, c.N, c.D, c.V, yb, cw, &o, loss, lse, gh, gw,
                               QF_FLOAT32, gb, gs ? gsd : nullptr, ws, bytes, nullptr),
                QF_ERR_INVALID_ARGUMENT);
      EXPECT_NE(std::string(qf_last_error()).find("labels[3] = " + std::to_string(c.V + 5)), std::string::npos)
          << qf_last_error();
      for (void* p : {(void*)h, (void*)w, (void*)b, (void*)cw, (void*)gsd, (void*)y, (void*)yb, (void*)loss,
                      (void*)lse, (void*)gh, (void*)gw, (void*)gb, ws})
        cudaFree(p);
    }
}
#endif

}  // namespace
