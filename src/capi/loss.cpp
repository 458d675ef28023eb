// C ABI of the fused linear + cross-entropy: argument translation only.
#include "guard.hpp"
#include "qforge/loss.hpp"
#include "qforge/qforge.h"

namespace {
using namespace qforge;

loss::DType to_dtype(qf_dtype d, const char* what) {
  switch (d) {
    case QF_FLOAT32: return loss::DType::F32;
    case QF_FLOAT16: return loss::DType::F16;
    case QF_BFLOAT16: return loss::DType::BF16;
    default: break;
  }
  QF_CHECK(false, "linear_cross_entropy: ", what, " must be float32, float16 or bfloat16 (qf_dtype ",
           int(d), ")");
  return loss::DType::F32;
}

loss::LceOptions to_options(const qf_lce_options* options) {
  QF_CHECK(options != nullptr, "linear_cross_entropy: options is null");
  loss::LceOptions opt;
  opt.ignore_index = options->ignore_index;
  opt.label_smoothing = options->label_smoothing;
  opt.softcap = options->softcap;
  opt.logit_scale = options->logit_scale;
  opt.z_loss = options->z_loss;
  QF_CHECK(options->reduction >= 0 && options->reduction <= 2,
           "linear_cross_entropy: reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
           options->reduction);
  opt.reduction = static_cast<loss::Reduction>(options->reduction);
  opt.validate = options->validate != 0;
  opt.chunk = options->chunk_size;
  return opt;
}

loss::TensorRef to_ref(const qf_tensor& t) {
  loss::TensorRef r;
  r.data = t.data;
  r.elem = t.dtype;
  r.device = t.device;
  r.device_index = t.device_index;
  r.ndim = t.ndim < 0 ? -1 : t.ndim;
  for (int i = 0; i < QF_MAX_DIMS; ++i) {
    r.sizes[i] = t.sizes[i];
    r.strides[i] = t.strides[i];
  }
  return r;
}

void check_device(qf_device device) {
  QF_CHECK(device == QF_CPU || device == QF_CUDA, "linear_cross_entropy: unknown device ", int(device));
}
}  // namespace

extern "C" {

int qf_lce_workspace_bytes(qf_device device, int64_t n, int64_t d, int64_t v, qf_dtype dtype,
                           int64_t chunk_size, int64_t* bytes) {
  return capi::guard([&] {
    check_device(device);
    QF_CHECK(bytes != nullptr, "qf_lce_workspace_bytes: bytes is null");
    QF_CHECK(chunk_size >= 0, "linear_cross_entropy: chunk_size must be >= 0, got ", chunk_size);
    *bytes = loss::lce_workspace_bytes(device == QF_CUDA, n, d, v, to_dtype(dtype, "dtype"), chunk_size);
  });
}

int qf_lce_forward(qf_device device, const void* hidden, const void* weight, const void* bias,
                   qf_dtype dtype, int64_t n, int64_t d, int64_t v, const int64_t* labels,
                   const float* class_weight, const qf_lce_options* options, float* loss,
                   float* lse, void* grad_hidden, void* grad_weight, qf_dtype grad_weight_dtype,
                   float* grad_bias, const float* grad_scale, void* workspace,
                   int64_t workspace_bytes, void* stream) {
  return capi::guard([&] {
    check_device(device);
    loss::LceInputs in;
    in.hidden = hidden;
    in.weight = weight;
    in.bias = bias;
    in.dtype = to_dtype(dtype, "dtype");
    in.N = n;
    in.D = d;
    in.V = v;
    in.labels = labels;
    in.class_weight = class_weight;
    const loss::LceOptions opt = to_options(options);
    loss::LceOutputs out;
    out.loss = loss;
    out.lse = lse;
    out.grad_hidden = grad_hidden;
    out.grad_weight = grad_weight;
    out.grad_weight_dtype = grad_weight ? to_dtype(grad_weight_dtype, "grad_weight dtype") : in.dtype;
    out.grad_bias = grad_bias;
    out.grad_scale = grad_scale;
    if (device == QF_CUDA)
      loss::lce_forward_cuda(in, opt, out, workspace, workspace_bytes, stream);
    else
      loss::lce_forward_cpu(in, opt, out, workspace, workspace_bytes);
  });
}

int qf_lce_run(const qf_lce_tensors* tensors, const qf_lce_options* options, void* stream) {
  return capi::guard([&] {
    QF_CHECK(tensors != nullptr, "qf_lce_run: tensors is null");
    static_assert(QF_MAX_DIMS == loss::kMaxDims, "qf_tensor and loss::TensorRef must agree");
    const loss::LceOptions opt = to_options(options);
    const loss::LceTensors t{to_ref(tensors->hidden),      to_ref(tensors->weight),
                             to_ref(tensors->bias),        to_ref(tensors->labels),
                             to_ref(tensors->class_weight), to_ref(tensors->loss),
                             to_ref(tensors->lse),         to_ref(tensors->grad_hidden),
                             to_ref(tensors->grad_weight), to_ref(tensors->grad_bias),
                             to_ref(tensors->grad_scale),  to_ref(tensors->workspace)};
    const loss::LceCall call = loss::lce_bind(t, opt);
    if (call.cuda)
      loss::lce_forward_cuda(call.in, opt, call.out, call.workspace, call.workspace_bytes, stream);
    else
      loss::lce_forward_cpu(call.in, opt, call.out, call.workspace, call.workspace_bytes);
  });
}

int qf_lce_scale_inplace(qf_device device, void* x, qf_dtype dtype, int64_t n, const float* scale,
                         void* stream) {
  return capi::guard([&] {
    check_device(device);
    const loss::DType d = to_dtype(dtype, "dtype");
    if (device == QF_CUDA)
      loss::scale_inplace_cuda(x, d, n, scale, stream);
    else
      loss::scale_inplace_cpu(x, d, n, scale);
  });
}

}  // extern "C"
