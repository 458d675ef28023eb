// Uses the installed library through both of its APIs: the C++ chat engine
// (qforge::chat), NF4 core (qforge::nf4) and layer kernels (qforge::layer), and
// the C ABI (qforge.h). Prints what they returned; exits nonzero when either
// disagrees with what it must return.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "qforge/chat/apply.hpp"
#include "qforge/chat/template.hpp"
#include "qforge/layer.hpp"
#include "qforge/nf4.hpp"
#include "qforge/qforge.h"

// NF4 levels times a block's absmax survive a quantize / dequantize round trip exactly.
bool nf4_round_trips() {
  namespace nf4 = qforge::nf4;
  const int64_t n = 70;  // two blocks of 64, the second partial
  std::vector<float> x(n);
  for (int64_t i = 0; i < n; ++i) x[i] = nf4::kCode[i % 16] * (i < 64 ? 2.0f : 0.5f);
  std::vector<uint8_t> packed(nf4::packed_bytes(n));
  std::vector<float> absmax(nf4::num_blocks(n, 64)), out(n);
  nf4::quantize(qforge::Device::CPU, x.data(), qforge::DType::F32, n, 64, packed.data(),
                static_cast<int64_t>(packed.size()), absmax.data(), static_cast<int64_t>(absmax.size()), nullptr);
  nf4::Weights w;
  w.packed = packed.data();
  w.packed_bytes = static_cast<int64_t>(packed.size());
  w.numel = n;
  w.blocksize = 64;
  w.code = nf4::kCode;
  w.absmax = absmax.data();
  w.absmax_len = static_cast<int64_t>(absmax.size());
  nf4::dequantize(qforge::Device::CPU, w, out.data(), qforge::DType::F32, n, nullptr);
  return out == x;
}

// SwiGLU in fp32 on the CPU: out = silu(gate) * up.
bool swiglu_computes() {
  const float gate[3] = {-2.0f, 0.0f, 1.5f}, up[3] = {3.0f, 5.0f, -2.0f};
  float out[3] = {};
  qforge::layer::swiglu_forward(qforge::Device::CPU, gate, up, qforge::DType::F32, 3, out, nullptr);
  for (int i = 0; i < 3; ++i)
    if (std::fabs(out[i] - gate[i] / (1.0f + std::exp(-gate[i])) * up[i]) > 1e-6f) return false;
  return true;
}

int main() {
  using namespace qforge::chat;
  Template tmpl("{% for m in messages %}<{{ m.role }}>{{ m.content | upper }}{% endfor %}");
  ChatRequest req;
  req.messages = json_loads(R"([{"role": "user", "content": "hi"}])");
  const std::string text = apply_chat_template(tmpl, req).text;
  std::printf("chat: %s\n", text.c_str());

  const int64_t packed = qf_nf4_packed_bytes(7);
  std::printf("qf_nf4_packed_bytes(7): %lld\n", static_cast<long long>(packed));
  std::printf("qf_version: %s\n", qf_version());

  bool caught = false;
  try {
    Template broken("{% if %}");
  } catch (const TemplateError& e) {  // the exception's type crosses the library boundary
    caught = e.kind == "TemplateSyntaxError";
  }
  std::printf("TemplateError caught: %d\n", caught ? 1 : 0);
  const bool nf4_ok = nf4_round_trips();
  std::printf("nf4 round trip: %d\n", nf4_ok ? 1 : 0);
  const bool swiglu_ok = swiglu_computes();
  std::printf("layer swiglu: %d\n", swiglu_ok ? 1 : 0);
  return text == "<user>HI" && packed == 4 && caught && nf4_ok && swiglu_ok ? 0 : 1;
}
