// The tensor-level checks of the fused linear + cross-entropy: a torch op hands
// over shapes and strides, and nothing is read before every tensor's rank,
// sizes, layout, element type and device agree with the others. A wrong shape
// would otherwise read out of bounds; a non-contiguous view would be read as
// if it were contiguous and give a wrong loss.
#include <string>

#include "core/dtype_name.hpp"
#include "qforge/cuda_runtime.hpp"
#include "qforge/error.hpp"
#include "qforge/loss.hpp"
#include "qforge/qforge.h"

namespace qforge::loss {
namespace {

constexpr const char* kOp = "linear_cross_entropy";
// Elements of one tensor at most: keeps every byte count far from int64 overflow.
constexpr int64_t kMaxNumel = int64_t(1) << 48;

// "<open>a, b, c<close>": a shape or strides, for error messages.
std::string join(const int64_t* v, int n, const char* open, const char* close) {
  std::string s = open;
  for (int i = 0; i < n; ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + close;
}

std::string shape_of(const TensorRef& t) { return join(t.sizes, t.ndim, "[", "]"); }

std::string device_of(const TensorRef& t) {
  if (t.device == QF_CPU) return "cpu";
  if (t.device == QF_CUDA) return "cuda:" + std::to_string(t.device_index);
  return "a device other than cpu or cuda (qf_device " + std::to_string(t.device) + ")";
}

// Rank, sizes, row-major contiguity (dimensions of size 1 may have any stride,
// as torch's is_contiguous allows) and the element count bound.
void check_layout(const TensorRef& t, const char* name) {
  QF_CHECK(t.ndim <= kMaxDims, kOp, ": ", name, " has ", t.ndim, " dimensions, at most ", kMaxDims);
  int64_t numel = 1;
  for (int i = 0; i < t.ndim; ++i) {
    QF_CHECK(t.sizes[i] >= 0, kOp, ": ", name, " has a negative size ", t.sizes[i], " in dimension ", i);
    QF_CHECK(t.sizes[i] == 0 || numel <= kMaxNumel / t.sizes[i], kOp, ": ", name, " ", shape_of(t),
             " has more than 2^48 elements");
    numel *= t.sizes[i];
  }
  if (numel == 0) return;
  int64_t expected = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    QF_CHECK(t.sizes[i] == 1 || t.strides[i] == expected, kOp, ": ", name, " must be contiguous (shape ",
             shape_of(t), ", strides ", join(t.strides, t.ndim, "(", ")"), ")");
    expected *= t.sizes[i];
  }
  QF_CHECK(t.data != nullptr, kOp, ": ", name, " ", shape_of(t), " has no data (null pointer)");
}

int64_t numel_of(const TensorRef& t) {
  int64_t n = 1;
  for (int i = 0; i < t.ndim; ++i) n *= t.sizes[i];
  return n;
}

void require(const TensorRef& t, const char* name) {
  QF_CHECK(t.present(), kOp, ": ", name, " is required");
}

// t has exactly `dims` (given as a list of expected sizes) and element type `elem`.
void check_shape(const TensorRef& t, const char* name, std::initializer_list<int64_t> dims,
                 const char* meaning) {
  bool same = t.ndim == int(dims.size());
  int i = 0;
  for (int64_t d : dims) same = same && t.sizes[i++] == d;
  QF_CHECK(same, kOp, ": ", name, " must be ", meaning, " = ", join(dims.begin(), int(dims.size()), "[", "]"),
           ", got ", shape_of(t));
}

void check_elem(const TensorRef& t, const char* name, int elem, int other = -1) {
  QF_CHECK(t.elem == elem || t.elem == other, kOp, ": ", name, " must be ", qforge::dtype_name(elem),
           other >= 0 ? " or " : "", other >= 0 ? qforge::dtype_name(other) : "", ", got ",
           qforge::dtype_name(t.elem));
}

DType float_type(int elem) {
  switch (elem) {
    case QF_FLOAT32: return DType::F32;
    case QF_FLOAT16: return DType::F16;
    case QF_BFLOAT16: return DType::BF16;
    default: break;
  }
  QF_CHECK(false, kOp, ": hidden must be float32, float16 or bfloat16, got ", qforge::dtype_name(elem));
  return DType::F32;
}

}  // namespace

LceCall lce_bind(const LceTensors& t, const LceOptions& opt) {
  const std::pair<const TensorRef*, const char*> all[] = {
      {&t.hidden, "hidden"}, {&t.weight, "weight"}, {&t.bias, "bias"}, {&t.labels, "labels"},
      {&t.class_weight, "class_weight"}, {&t.loss, "loss"}, {&t.lse, "lse"},
      {&t.grad_hidden, "grad_hidden"}, {&t.grad_weight, "grad_weight"}, {&t.grad_bias, "grad_bias"},
      {&t.grad_scale, "grad_scale"}, {&t.workspace, "workspace"}};
  require(t.hidden, "hidden");
  require(t.weight, "weight");
  require(t.labels, "labels");
  require(t.loss, "loss");
  require(t.workspace, "workspace");
  for (const auto& [ref, name] : all) {
    if (!ref->present()) continue;
    QF_CHECK(ref->device == QF_CPU || ref->device == QF_CUDA, kOp, ": ", name, " is on ", device_of(*ref),
             "; qforge runs on cpu and cuda tensors");
    QF_CHECK(ref->device == t.hidden.device && (ref->device == QF_CPU || ref->device_index == t.hidden.device_index),
             kOp, ": ", name, " is on ", device_of(*ref), " but hidden is on ", device_of(t.hidden));
    check_layout(*ref, name);
  }
  QF_CHECK(t.hidden.ndim == 2, kOp, ": hidden must be 2-D [N, D] (flatten the leading dimensions), got ",
           shape_of(t.hidden));
  const DType dtype = float_type(t.hidden.elem);
  const int64_t N = t.hidden.sizes[0], D = t.hidden.sizes[1];
  QF_CHECK(t.weight.ndim == 2, kOp, ": weight must be 2-D [V, D], got ", shape_of(t.weight));
  const int64_t V = t.weight.sizes[0];
  QF_CHECK(t.weight.sizes[1] == D, kOp, ": hidden ", shape_of(t.hidden), " and weight ", shape_of(t.weight),
           " disagree on D (hidden's last dimension must equal weight's second)");
  check_elem(t.weight, "weight (hidden's dtype)", t.hidden.elem);
  check_shape(t.labels, "labels", {N}, "[N]");
  check_elem(t.labels, "labels", QF_INT64);
  if (t.bias.present()) {
    check_shape(t.bias, "bias", {V}, "[V]");
    check_elem(t.bias, "bias (hidden's dtype)", t.hidden.elem);
  }
  if (t.class_weight.present()) {
    check_shape(t.class_weight, "class_weight", {V}, "[V]");
    check_elem(t.class_weight, "class_weight", QF_FLOAT32);
  }
  check_elem(t.loss, "loss", QF_FLOAT32);
  if (opt.reduction == Reduction::None)
    check_shape(t.loss, "loss (reduction none)", {N}, "[N]");
  else
    QF_CHECK(numel_of(t.loss) == 1, kOp, ": loss (reduction mean/sum) must have one element, got ",
             shape_of(t.loss));
  if (t.lse.present()) {
    check_shape(t.lse, "lse", {N}, "[N]");
    check_elem(t.lse, "lse", QF_FLOAT32);
  }
  if (t.grad_hidden.present()) {
    check_shape(t.grad_hidden, "grad_hidden", {N, D}, "[N, D]");
    check_elem(t.grad_hidden, "grad_hidden (hidden's dtype)", t.hidden.elem);
  }
  if (t.grad_weight.present()) {
    check_shape(t.grad_weight, "grad_weight", {V, D}, "[V, D]");
    check_elem(t.grad_weight, "grad_weight", t.hidden.elem, QF_FLOAT32);
  }
  if (t.grad_bias.present()) {
    check_shape(t.grad_bias, "grad_bias", {V}, "[V]");
    check_elem(t.grad_bias, "grad_bias", QF_FLOAT32);
  }
  if (t.grad_scale.present()) {
    check_shape(t.grad_scale, "grad_scale", {N}, "[N]");
    check_elem(t.grad_scale, "grad_scale", QF_FLOAT32);
  }
  QF_CHECK(t.workspace.ndim == 1, kOp, ": workspace must be 1-D, got ", shape_of(t.workspace));
  check_elem(t.workspace, "workspace", QF_UINT8);

  LceCall call;
  call.device = t.hidden.device == QF_CUDA ? Device::CUDA : Device::CPU;
  call.device_index = t.hidden.device_index;
  if (call.device == Device::CUDA) {
    cuda::require_cuda(kOp);
    const int current = cuda::current_device();
    QF_CHECK(current == call.device_index, kOp, ": the tensors are on cuda:", call.device_index,
             " but the current CUDA device is cuda:", current);
  }
  call.in.hidden = t.hidden.data;
  call.in.weight = t.weight.data;
  call.in.bias = t.bias.present() ? t.bias.data : nullptr;
  call.in.dtype = dtype;
  call.in.N = N;
  call.in.D = D;
  call.in.V = V;
  call.in.labels = static_cast<const int64_t*>(t.labels.data);
  call.in.class_weight = t.class_weight.present() ? static_cast<const float*>(t.class_weight.data) : nullptr;
  call.out.loss = static_cast<float*>(const_cast<void*>(t.loss.data));
  auto optional_out = [](const TensorRef& r) { return r.present() ? const_cast<void*>(r.data) : nullptr; };
  call.out.lse = static_cast<float*>(optional_out(t.lse));
  call.out.grad_hidden = optional_out(t.grad_hidden);
  call.out.grad_weight = optional_out(t.grad_weight);
  call.out.grad_weight_dtype = t.grad_weight.present() ? float_type(t.grad_weight.elem) : dtype;
  call.out.grad_bias = static_cast<float*>(optional_out(t.grad_bias));
  call.out.grad_scale = t.grad_scale.present() ? static_cast<const float*>(t.grad_scale.data) : nullptr;
  call.workspace = const_cast<void*>(t.workspace.data);
  call.workspace_bytes = t.workspace.sizes[0];
  return call;
}

}  // namespace qforge::loss
