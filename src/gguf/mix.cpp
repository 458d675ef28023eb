// llama-quantize's per-tensor type choice for the quantization mixes qforge
// writes: llama_tensor_get_type / llama_tensor_get_type_impl /
// tensor_type_fallback in llama.cpp's src/llama-quant.cpp, for dense
// (non-MoE, non-Falcon) models without an importance matrix or overrides.
#include <string>

#include "qforge/error.hpp"
#include "qforge/gguf.hpp"

namespace qforge::gguf {
namespace {

enum class Category { Output, TokenEmbd, AttnV, AttnK, AttnQ, AttnOutput, FfnUp, FfnGate, FfnDown, Other };

bool has(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

Category category(const std::string& name) {
  if (name == "output.weight") return Category::Output;
  if (name == "token_embd.weight" || name == "per_layer_token_embd.weight") return Category::TokenEmbd;
  if (has(name, "attn_qkv.weight") || has(name, "attn_kv_b.weight") || has(name, "attn_v.weight"))
    return Category::AttnV;  // llama.cpp's category_is_attn_v
  if (has(name, "attn_k.weight")) return Category::AttnK;
  if (has(name, "attn_q.weight")) return Category::AttnQ;
  if (has(name, "attn_output.weight")) return Category::AttnOutput;
  if (has(name, "ffn_up")) return Category::FfnUp;
  if (has(name, "ffn_gate")) return Category::FfnGate;
  if (has(name, "ffn_down")) return Category::FfnDown;
  return Category::Other;
}

// tensor_allows_quantization, for the tensor names of dense decoder models.
bool allows_quantization(const std::string& name, int n_dims) {
  if (n_dims < 2) return false;
  if (name.size() < 6 || name.compare(name.size() - 6, 6, "weight") != 0) return false;
  return !has(name, "_norm.weight") && !has(name, "ffn_gate_inp.weight") && name != "position_embd.weight" &&
         name != "token_types.weight";
}

Type default_type(Mix mix) {
  switch (mix) {
    case Mix::F16: return Type::F16;
    case Mix::BF16: return Type::BF16;
    case Mix::Q8_0: return Type::Q8_0;
    case Mix::Q4_0: return Type::Q4_0;
    case Mix::Q4_K_M: return Type::Q4_K;
    case Mix::Q5_K_M: return Type::Q5_K;
    case Mix::Q6_K: return Type::Q6_K;
  }
  QF_CHECK(false, "unknown quantization mix ", static_cast<uint32_t>(mix));
  return Type::F32;
}

bool use_more_bits(int i_layer, int n_layers) {
  return i_layer < n_layers / 8 || i_layer >= 7 * n_layers / 8 || (i_layer - n_layers / 8) % 3 == 2;
}

Type fallback(Type t, int64_t ncols) {
  const int64_t qk = block_elements(t);
  if (ncols % qk == 0) return t;
  Type r = t;
  switch (t) {
    case Type::Q4_K: r = Type::Q5_0; break;
    case Type::Q5_K: r = Type::Q5_1; break;
    case Type::Q6_K: r = Type::Q8_0; break;
    default: break;  // 32-element blocks: nothing smaller; F16 below
  }
  if (ncols % block_elements(r) != 0) r = Type::F16;
  return r;
}

}  // namespace

std::vector<Type> mix_types(Mix mix, const std::vector<std::string>& names, const std::vector<int32_t>& n_dims,
                            const std::vector<int64_t>& ne0, int n_layer, bool is_70b) {
  QF_CHECK(names.size() == n_dims.size() && names.size() == ne0.size(), "mix_types: ", names.size(), " names, ",
           n_dims.size(), " dims, ", ne0.size(), " row lengths");
  QF_CHECK(n_layer > 0, "mix_types: n_layer must be positive, got ", n_layer);
  const Type base = default_type(mix);
  const bool k_mix = mix == Mix::Q4_K_M || mix == Mix::Q5_K_M;
  int n_attention_wv = 0;
  bool tied = true;
  for (const auto& n : names) {
    const Category c = category(n);
    if (c == Category::AttnV) ++n_attention_wv;
    if (c == Category::Output) tied = false;
  }
  int i_attention_wv = 0, i_ffn_down = 0;
  std::vector<Type> out(names.size());
  for (size_t i = 0; i < names.size(); ++i) {
    const std::string& name = names[i];
    if (!allows_quantization(name, n_dims[i])) {
      out[i] = Type::F32;  // convert_hf_to_gguf keeps 1-D tensors in f32
      continue;
    }
    Type t = base;
    const bool quantized = block_elements(base) > 1;
    if (quantized) {
      const Category c = category(name);
      if (c == Category::Output || (tied && c == Category::TokenEmbd)) {
        if (ne0[i] % block_elements(t) != 0) t = Type::Q8_0;
        else if (t != Type::Q8_0) t = Type::Q6_K;
      } else if (c == Category::AttnV) {
        if (k_mix && use_more_bits(i_attention_wv, n_attention_wv)) t = Type::Q6_K;
        if (is_70b && t == Type::Q4_K) t = Type::Q5_K;
        ++i_attention_wv;
      } else if (c == Category::FfnDown) {
        if (k_mix && use_more_bits(i_ffn_down, n_layer)) t = Type::Q6_K;
        ++i_ffn_down;
      }
      t = fallback(t, ne0[i]);
    }
    out[i] = t;
  }
  return out;
}

std::vector<Type> mmproj_types(Mix mix, const std::vector<std::string>& names, const std::vector<int32_t>& n_dims,
                               const std::vector<int64_t>& ne0) {
  QF_CHECK(names.size() == n_dims.size() && names.size() == ne0.size(), "mmproj_types: ", names.size(), " names, ",
           n_dims.size(), " dims, ", ne0.size(), " row lengths");
  QF_CHECK(mix == Mix::F16 || mix == Mix::BF16 || mix == Mix::Q8_0, "mmproj_types: mix ",
           static_cast<uint32_t>(mix), " is not f16, bf16 or q8_0 (the types convert_hf_to_gguf.py --mmproj writes)");
  const Type base = default_type(mix);
  std::vector<Type> out(names.size());
  for (size_t i = 0; i < names.size(); ++i) {
    const std::string& name = names[i];
    const bool is_weight = name.size() >= 7 && name.compare(name.size() - 7, 7, ".weight") == 0;
    const bool is_embedding = name == "v.patch_embd.weight" || name == "v.position_embd.weight";
    if (n_dims[i] < 2 || !is_weight || has(name, "_norm.weight") || is_embedding) {
      out[i] = Type::F32;
    } else {
      out[i] = ne0[i] % block_elements(base) == 0 ? base : Type::F16;
    }
  }
  return out;
}

}  // namespace qforge::gguf
