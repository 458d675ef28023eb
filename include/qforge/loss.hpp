// Fused, chunked linear + cross-entropy (challenge E). The N x V logits of
// hidden[N,D] @ weight[V,D]^T are never materialised: tokens are processed
// in chunks of `chunk` rows; per chunk one GEMM writes the chunk's logits
// into a workspace, one pass computes log-sum-exp and the loss and (when
// gradients are asked for) overwrites the logits with d loss / d logits,
// and two more GEMMs turn that into grad_hidden (the chunk's rows) and
// grad_weight (accumulated over chunks). With gradients computed in the
// forward pass the backward pass is a rescale by the upstream gradient.
//
// Semantics (what the CPU twin and the CUDA kernels both compute; equal to
// torch.nn.functional.cross_entropy for every option it has):
//   u_c  = logit_scale * (h . w_c + bias_c)
//   z_c  = softcap > 0 ? softcap * tanh(u_c / softcap) : u_c
//   lse  = log sum_c exp(z_c)
//   ce   = (1 - eps) * cw[y] * (lse - z_y) + eps / V * sum_c cw[c] * (lse - z_c)
//   loss_i = ce + z_loss * lse^2                  (0 for ignored tokens)
//   mean: sum_i loss_i / sum_{valid i} cw[y_i];  sum: sum_i loss_i;  none: loss_i
// (cw = class weights, 1 when absent; eps = label_smoothing.) A mean over no
// valid token is 0/0 = NaN as in PyTorch, with zero gradients.
// Logits and d loss / d logits are stored in the input dtype between the
// GEMMs (as PyTorch's own bf16 matmul output is); everything else runs in fp32.
// NaN or Inf in hidden/weight propagates to the loss and the gradients.
#pragma once
#include <cstdint>
#include <string_view>

#include "qforge/dtype.hpp"
#include "qforge/export.hpp"

namespace qforge::loss {

using qforge::Device;
using qforge::DType;

enum class Reduction : int { None = 0, Mean = 1, Sum = 2 };

// "none", "mean" or "sum" (PyTorch's names); anything else throws InvalidArgument.
QFORGE_API Reduction reduction_from_name(std::string_view name);

struct QFORGE_API LceOptions {
  int64_t ignore_index = -100;
  float label_smoothing = 0.0f;
  float softcap = 0.0f;  // 0: no soft-capping
  float logit_scale = 1.0f;
  float z_loss = 0.0f;
  Reduction reduction = Reduction::Mean;
  int64_t chunk = 0;     // tokens per chunk, >= 1 (0: all N at once)
  bool validate = true;  // CUDA: check labels on the host side (one stream sync)
};

struct QFORGE_API LceInputs {
  const void* hidden = nullptr;  // [N, D], row-major, dtype
  const void* weight = nullptr;  // [V, D], row-major, dtype
  const void* bias = nullptr;    // [V] dtype, or null
  DType dtype = DType::F32;
  int64_t N = 0, D = 0, V = 0;
  const int64_t* labels = nullptr;       // [N]: 0..V-1 or ignore_index
  const float* class_weight = nullptr;   // [V] fp32, or null
};

struct QFORGE_API LceOutputs {
  float* loss = nullptr;           // [1] (mean/sum) or [N] (none); required
  float* lse = nullptr;            // [N] or null
  void* grad_hidden = nullptr;     // [N, D] dtype, or null: not computed
  void* grad_weight = nullptr;     // [V, D] grad_weight_dtype, or null
  DType grad_weight_dtype = DType::F32;  // dtype, or F32 for fp32 accumulation
  float* grad_bias = nullptr;      // [V] fp32, or null
  // Per-token upstream gradient [N] (reduction none), or null (= 1). The
  // gradients then are sum_i grad_scale[i] * d loss_i (times 1/denominator
  // for mean).
  const float* grad_scale = nullptr;
};

// A tensor handed over by a caller that holds shapes and strides (a torch op):
// the C ABI's qf_tensor, translated. Element types and devices use the C
// ABI's numbering (qf_dtype, qf_device).
constexpr int kMaxDims = 8;
struct QFORGE_API TensorRef {
  const void* data = nullptr;
  int elem = 0;          // qf_dtype
  int device = 0;        // qf_device
  int device_index = 0;
  int ndim = -1;         // < 0: absent
  int64_t sizes[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};
  bool present() const { return ndim >= 0; }
};

struct QFORGE_API LceTensors {
  TensorRef hidden, weight, bias, labels, class_weight;
  TensorRef loss, lse, grad_hidden, grad_weight, grad_bias, grad_scale, workspace;
};

// What lce_forward_* take, bound from checked tensors.
struct QFORGE_API LceCall {
  LceInputs in;
  LceOutputs out;
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
  Device device = Device::CPU;
  int device_index = 0;
};

// Checks every tensor (presence, rank, sizes, contiguity, element type,
// device) against the others and `opt`, throwing InvalidArgument that names
// the tensor and what is wrong. lce_forward_* then run lce_check (options,
// workspace size, labels' range).
QFORGE_API LceCall lce_bind(const LceTensors& t, const LceOptions& opt);

// lce_bind, then lce_forward on the tensors' device.
QFORGE_API void lce_run(const LceTensors& t, const LceOptions& opt, void* stream);

// Bytes of workspace lce_forward needs for these sizes (chunk 0 = N).
QFORGE_API int64_t lce_workspace_bytes(Device device, int64_t N, int64_t D, int64_t V, DType dtype,
                                       int64_t chunk);

// Tokens per chunk whose workspace (lce_workspace_bytes) fits in budget_bytes:
// N when all fit; else the largest 128 * 2^k that fits (on an H100 the GEMMs
// ran fastest at such sizes: 1024 and 2048 beat 1536 and 1792 by 4%), or
// below 128 the largest that fits; at least 1.
QFORGE_API int64_t lce_chunk_size(Device device, int64_t N, int64_t D, int64_t V, DType dtype,
                                  int64_t budget_bytes);

// Validates everything (shapes, options, buffer sizes; labels on CPU) and
// throws InvalidArgument naming the problem.
QFORGE_API void lce_check(const LceInputs& in, const LceOptions& opt, const LceOutputs& out,
                          int64_t workspace_bytes, Device device);

// lce_forward_cpu or lce_forward_cuda, by device.
QFORGE_API void lce_forward(Device device, const LceInputs& in, const LceOptions& opt, const LceOutputs& out,
                            void* workspace, int64_t workspace_bytes, void* stream);

QFORGE_API void lce_forward_cpu(const LceInputs& in, const LceOptions& opt, const LceOutputs& out,
                     void* workspace, int64_t workspace_bytes);
// Pointers are device pointers; runs on `stream` (a cudaStream_t).
QFORGE_API void lce_forward_cuda(const LceInputs& in, const LceOptions& opt, const LceOutputs& out,
                      void* workspace, int64_t workspace_bytes, void* stream);

// x[i] *= scale[0] for n elements of dtype (fp32 arithmetic, rounded once);
// scale lives where x does. The backward pass's rescale by the upstream gradient.
QFORGE_API void scale_inplace(Device device, void* x, DType dtype, int64_t n, const float* scale, void* stream);
QFORGE_API void scale_inplace_cpu(void* x, DType dtype, int64_t n, const float* scale);
QFORGE_API void scale_inplace_cuda(void* x, DType dtype, int64_t n, const float* scale, void* stream);

}  // namespace qforge::loss
