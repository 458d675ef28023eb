// C ABI of the fused linear + cross-entropy: argument translation only.
#include "guard.hpp"
#include "qforge/loss.hpp"
#include "qforge/qforge.h"
#include "translate.hpp"

namespace {
using namespace qforge;
using capi::to_device;

DType to_dtype(qf_dtype d, const char* what) {
  return capi::to_float_dtype(d, what);
}

loss::LceOptions to_options(const qf_lce_options* options) {
  QF_CHECK(options != nullptr, "linear_cross_entropy: options is null");
  loss::LceOptions opt;
  opt.ignore_index = options->ignore_index;
  opt.label_smoothing = options->label_smoothing;
  opt.softcap = options->softcap;
  opt.logit_scale = options->logit_scale;
  opt.z_loss = options->z_loss;
  opt.reduction = static_cast<loss::Reduction>(options->reduction);  // checked by the core
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
}  // namespace

extern "C" {

int qf_lce_workspace_bytes(qf_device device, int64_t n, int64_t d, int64_t v, qf_dtype dtype,
                           int64_t chunk_size, int64_t* bytes) {
  return capi::guard([&] {
    QF_CHECK(bytes != nullptr, "qf_lce_workspace_bytes: bytes is null");
    *bytes = loss::lce_workspace_bytes(to_device(device), n, d, v, to_dtype(dtype, "linear_cross_entropy: dtype"),
                                       chunk_size);
  });
}

int qf_lce_chunk_size(qf_device device, int64_t n, int64_t d, int64_t v, qf_dtype dtype, int64_t budget_bytes,
                      int64_t* chunk_size) {
  return capi::guard([&] {
    QF_CHECK(chunk_size != nullptr, "qf_lce_chunk_size: chunk_size is null");
    *chunk_size = loss::lce_chunk_size(to_device(device), n, d, v, to_dtype(dtype, "linear_cross_entropy: dtype"),
                                       budget_bytes);
  });
}

int qf_lce_reduction(const char* name, int32_t* reduction) {
  return capi::guard([&] {
    QF_CHECK(name != nullptr && reduction != nullptr, "qf_lce_reduction: null argument");
    *reduction = static_cast<int32_t>(loss::reduction_from_name(name));
  });
}

int qf_lce_forward(qf_device device, const void* hidden, const void* weight, const void* bias,
                   qf_dtype dtype, int64_t n, int64_t d, int64_t v, const int64_t* labels,
                   const float* class_weight, const qf_lce_options* options, float* loss,
                   float* lse, void* grad_hidden, void* grad_weight, qf_dtype grad_weight_dtype,
                   float* grad_bias, const float* grad_scale, void* workspace,
                   int64_t workspace_bytes, void* stream) {
  return capi::guard([&] {
    const Device dev = to_device(device);
    loss::LceInputs in;
    in.hidden = hidden;
    in.weight = weight;
    in.bias = bias;
    in.dtype = to_dtype(dtype, "linear_cross_entropy: dtype");
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
    out.grad_weight_dtype =
        grad_weight ? to_dtype(grad_weight_dtype, "linear_cross_entropy: grad_weight dtype") : in.dtype;
    out.grad_bias = grad_bias;
    out.grad_scale = grad_scale;
    loss::lce_forward(dev, in, opt, out, workspace, workspace_bytes, stream);
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
    loss::lce_run(t, opt, stream);
  });
}

int qf_lce_scale_inplace(qf_device device, void* x, qf_dtype dtype, int64_t n, const float* scale,
                         void* stream) {
  return capi::guard([&] {
    loss::scale_inplace(to_device(device), x, to_dtype(dtype, "scale_inplace: dtype"), n, scale, stream);
  });
}

}  // extern "C"
