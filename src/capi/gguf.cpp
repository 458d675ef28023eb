// C ABI for GGUF export: translates arguments to qforge::gguf and nothing else.
#include <string>
#include <vector>

#include "guard.hpp"
#include "qforge/gguf.hpp"

using qforge::capi::guard;
namespace gguf = qforge::gguf;

struct qf_gguf_writer {
  gguf::Writer writer;
};

namespace {
gguf::Writer& writer_of(qf_gguf_writer* w) {
  QF_CHECK(w != nullptr, "GGUF writer handle is null");
  return w->writer;
}
std::string_view key_of(const char* key) {
  QF_CHECK(key != nullptr, "GGUF metadata key is null");
  return key;
}
}  // namespace

extern "C" {

int qf_gguf_writer_open(const char* path, int overwrite, qf_gguf_writer** out) {
  return guard([&] {
    QF_CHECK(path != nullptr && out != nullptr, "qf_gguf_writer_open: null path or output");
    *out = nullptr;
    *out = new qf_gguf_writer{gguf::Writer(path, overwrite != 0)};
  });
}

void qf_gguf_writer_free(qf_gguf_writer* w) { delete w; }

int qf_gguf_add_scalar(qf_gguf_writer* w, const char* key, uint32_t value_type, const void* value) {
  return guard([&] { writer_of(w).add_scalar(key_of(key), static_cast<gguf::ValueType>(value_type), value); });
}

int qf_gguf_add_string(qf_gguf_writer* w, const char* key, const char* value, size_t len) {
  return guard([&] {
    QF_CHECK(value != nullptr || len == 0, "GGUF metadata string is null");
    writer_of(w).add_string(key_of(key), std::string_view(value ? value : "", len));
  });
}

int qf_gguf_add_array(qf_gguf_writer* w, const char* key, uint32_t elem_type, const void* data, int64_t n) {
  return guard([&] { writer_of(w).add_array(key_of(key), static_cast<gguf::ValueType>(elem_type), data, n); });
}

int qf_gguf_add_string_array(qf_gguf_writer* w, const char* key, const char* data, const int64_t* offsets,
                             int64_t n) {
  return guard([&] {
    gguf::Writer& wr = writer_of(w);
    QF_CHECK(n >= 0 && n <= gguf::kMaxArrayLength, "GGUF string array length ", n, " outside 0..",
             gguf::kMaxArrayLength);
    QF_CHECK(offsets != nullptr && (data != nullptr || offsets[n] == 0), "GGUF string array: null data or offsets");
    std::vector<std::string_view> values;
    values.reserve(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      QF_CHECK(offsets[i] >= 0 && offsets[i] <= offsets[i + 1], "GGUF string array: offsets[", i, "..", i + 1,
               "] = ", offsets[i], ", ", offsets[i + 1], " are not increasing");
      values.emplace_back(data + offsets[i], static_cast<size_t>(offsets[i + 1] - offsets[i]));
    }
    wr.add_string_array(key_of(key), values);
  });
}

int qf_gguf_add_tensor(qf_gguf_writer* w, const char* name, const int64_t* ne, int32_t n_dims, uint32_t ggml_type) {
  return guard([&] {
    QF_CHECK(name != nullptr && ne != nullptr, "qf_gguf_add_tensor: null name or shape");
    QF_CHECK(n_dims >= 1 && n_dims <= gguf::kMaxDims, "GGUF tensor '", name, "': ", n_dims, " dimensions (1..",
             gguf::kMaxDims, ")");
    writer_of(w).add_tensor(name, std::vector<int64_t>(ne, ne + n_dims), gguf::to_type(ggml_type));
  });
}

int qf_gguf_write_tensor(qf_gguf_writer* w, const void* src, qf_dtype src_dtype, int64_t numel, int threads) {
  return guard([&] { writer_of(w).write_tensor(src, src_dtype, numel, threads); });
}

int qf_gguf_write_tensor_bytes(qf_gguf_writer* w, const void* data, int64_t bytes) {
  return guard([&] { writer_of(w).write_tensor_bytes(data, bytes); });
}

int qf_gguf_finish(qf_gguf_writer* w) {
  return guard([&] { writer_of(w).finish(); });
}

int qf_gguf_row_bytes(uint32_t ggml_type, int64_t ncols, int64_t* bytes) {
  return guard([&] {
    QF_CHECK(bytes != nullptr, "qf_gguf_row_bytes: output is null");
    *bytes = gguf::row_bytes(gguf::to_type(ggml_type), ncols);
  });
}

int qf_gguf_quantize(uint32_t ggml_type, const float* x, int64_t nrows, int64_t ncols, void* out, int64_t out_bytes,
                     int threads) {
  return guard([&] { gguf::quantize_rows(gguf::to_type(ggml_type), x, nrows, ncols, out, out_bytes, threads); });
}

namespace {

// The tensor list of qf_gguf_mix_types / qf_gguf_mmproj_types: n names as concatenated
// UTF-8 with n + 1 increasing offsets; throws naming `fn` on a bad argument.
std::vector<std::string> tensor_names(const char* fn, uint32_t mix, const char* names, const int64_t* name_offsets,
                                      const int32_t* n_dims, const int64_t* ne0, int64_t n, const uint32_t* out) {
  QF_CHECK(mix >= 1 && mix <= 7, "unknown quantization mix ", mix);
  QF_CHECK(n >= 0 && n <= gguf::kMaxTensors, "tensor count ", n, " outside 0..", gguf::kMaxTensors);
  QF_CHECK(n == 0 || (names && name_offsets && n_dims && ne0 && out), fn, ": null argument");
  std::vector<std::string> name_list;
  for (int64_t i = 0; i < n; ++i) {
    QF_CHECK(name_offsets[i] >= 0 && name_offsets[i] <= name_offsets[i + 1], fn, ": name offsets ", i,
             " not increasing");
    name_list.emplace_back(names + name_offsets[i], static_cast<size_t>(name_offsets[i + 1] - name_offsets[i]));
  }
  return name_list;
}

void copy_types(const std::vector<gguf::Type>& types, uint32_t* out) {
  for (size_t i = 0; i < types.size(); ++i) out[i] = static_cast<uint32_t>(types[i]);
}

}  // namespace

int qf_gguf_mix_types(uint32_t mix, const char* names, const int64_t* name_offsets, const int32_t* n_dims,
                      const int64_t* ne0, int64_t n, int32_t n_layer, int32_t is_70b, uint32_t* out_types) {
  return guard([&] {
    auto name_list = tensor_names("qf_gguf_mix_types", mix, names, name_offsets, n_dims, ne0, n, out_types);
    copy_types(gguf::mix_types(static_cast<gguf::Mix>(mix), name_list, std::vector<int32_t>(n_dims, n_dims + n),
                               std::vector<int64_t>(ne0, ne0 + n), n_layer, is_70b != 0),
               out_types);
  });
}

int qf_gguf_mmproj_types(uint32_t mix, const char* names, const int64_t* name_offsets, const int32_t* n_dims,
                         const int64_t* ne0, int64_t n, uint32_t* out_types) {
  return guard([&] {
    auto name_list = tensor_names("qf_gguf_mmproj_types", mix, names, name_offsets, n_dims, ne0, n, out_types);
    copy_types(gguf::mmproj_types(static_cast<gguf::Mix>(mix), name_list, std::vector<int32_t>(n_dims, n_dims + n),
                                  std::vector<int64_t>(ne0, ne0 + n)),
               out_types);
  });
}

}
