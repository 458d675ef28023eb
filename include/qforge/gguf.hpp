// GGUF files (llama.cpp's model format, version 3) and ggml's block
// quantizers. See docs/gguf.md.
//
//  - quantize_rows: ggml's reference quantizers (quantize_row_*_ref in
//    ggml-quants.c, no importance matrix), byte for byte: same float
//    operations in the same order, same nearest_int trick, same scale
//    searches (make_qx_quants, make_qkx2_quants). Rows are independent, so
//    they are split over threads without changing a byte.
//  - Writer: a GGUF v3 file written once, front to back: metadata and tensor
//    infos first, then each tensor's data in declaration order, so a caller
//    streams one tensor at a time. The bytes go to a temporary file beside the
//    destination; finish() fsyncs it and moves it into place, so the
//    destination is complete or absent.
#pragma once
#include "qforge/export.hpp"
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "qforge/qforge.h"

namespace qforge::gguf {

// ggml_type values (the numbers stored in the file).
enum class Type : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8,
  Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30,
};

// gguf_type values of metadata.
enum class ValueType : uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7,
  STRING = 8, ARRAY = 9, U64 = 10, I64 = 11, F64 = 12,
};

// Documented bounds (the writer refuses anything larger).
inline constexpr int64_t kMaxKeys = 1 << 20;
inline constexpr int64_t kMaxTensors = 1 << 20;
inline constexpr int64_t kMaxDims = 4;            // GGML_MAX_DIMS
inline constexpr size_t kMaxTensorName = 63;      // GGML_MAX_NAME - 1
inline constexpr size_t kMaxKeyBytes = 65535;
inline constexpr size_t kMaxStringBytes = size_t{1} << 30;
inline constexpr int64_t kMaxArrayLength = int64_t{1} << 31;
inline constexpr int kMaxThreads = 256;

QFORGE_API bool is_supported(uint32_t type);
QFORGE_API Type to_type(uint32_t type);          // throws InvalidArgument naming unsupported types
QFORGE_API const char* type_name(Type type);     // "q4_K", ... as ggml names them
QFORGE_API int64_t block_elements(Type type);    // elements per block (1 for f32/f16/bf16)
QFORGE_API int64_t block_bytes(Type type);       // bytes per block
// Bytes of one row of ncols elements; throws unless ncols is a multiple of the block.
QFORGE_API int64_t row_bytes(Type type, int64_t ncols);

// Encode nrows x ncols floats (row-major) as `type` into out (nrows *
// row_bytes bytes, checked against out_bytes). threads <= 0: all cores.
QFORGE_API void quantize_rows(Type type, const float* x, int64_t nrows, int64_t ncols, void* out,
                   int64_t out_bytes, int threads);

// One block row of the reference quantizers, single-threaded (the definition).
QFORGE_API void quantize_row_reference(Type type, const float* x, int64_t n, void* out);

// llama-quantize's per-tensor type choice (llama_tensor_get_type in
// src/llama-quant.cpp, no imatrix, no overrides) for the dense architectures
// qforge exports (llama, mistral, qwen2, qwen3). ftype is the mix:
// Q4_0, Q8_0, Q4_K (= Q4_K_M), Q5_K (= Q5_K_M), Q6_K, F16, BF16. Tensors are
// given in file order (counters advance in that order, as in llama.cpp);
// n_dims[i] and ne0[i] (row length) describe tensor i; n_layer is the block
// count; is_70b marks llama.cpp's LLM_TYPE_70B (80 layers, grouped KV).
// Returns the ggml type per tensor.
enum class Mix : uint32_t { F16 = 1, BF16 = 2, Q8_0 = 3, Q4_0 = 4, Q4_K_M = 5, Q5_K_M = 6, Q6_K = 7 };
QFORGE_API std::vector<Type> mix_types(Mix mix, const std::vector<std::string>& names, const std::vector<int32_t>& n_dims,
                            const std::vector<int64_t>& ne0, int n_layer, bool is_70b);

// convert_hf_to_gguf.py --mmproj's per-tensor types for the vision encoder +
// projector file (MmprojModel / SmolVLMModel, --outtype f16, bf16 or q8_0 = the
// mix F16, BF16, Q8_0; other mixes are refused): 1-D tensors, norms, non-weight
// tensors and the patch and position embeddings f32; every other weight the
// mix's type, f16 where its rows are not whole q8_0 blocks (gguf-py's
// QuantError fallback).
QFORGE_API std::vector<Type> mmproj_types(Mix mix, const std::vector<std::string>& names,
                                          const std::vector<int32_t>& n_dims, const std::vector<int64_t>& ne0);

class QFORGE_API Writer {
 public:
  // path: the destination; refused when it exists unless overwrite.
  Writer(std::string path, bool overwrite);
  ~Writer();  // removes the temporary file unless finish() succeeded
  Writer(const Writer&) = delete;
  Writer& operator=(const Writer&) = delete;

  void add_scalar(std::string_view key, ValueType type, const void* value);
  void add_string(std::string_view key, std::string_view value);
  void add_array(std::string_view key, ValueType elem, const void* data, int64_t n);
  void add_string_array(std::string_view key, const std::vector<std::string_view>& values);
  // ne: ggml order (ne[0] = row length, the innermost dimension).
  void add_tensor(std::string_view name, const std::vector<int64_t>& ne, Type type);

  // Data of the next tensor in declaration order: already encoded bytes...
  void write_tensor_bytes(const void* data, int64_t bytes);
  // ...or elements (fp32/fp16/bf16) encoded here as the declared type,
  // rows converted and written a bounded chunk at a time.
  void write_tensor(const void* src, qf_dtype src_dtype, int64_t numel, int threads);
  // All tensors written: flush, fsync, move into place. The writer is then done.
  void finish();

  int64_t tensors_written() const { return next_tensor_; }
  int64_t tensor_count() const { return static_cast<int64_t>(tensors_.size()); }

 private:
  struct TensorInfo {
    std::string name;
    std::vector<int64_t> ne;
    Type type;
    uint64_t offset;
    int64_t bytes;
  };
  void begin_key(std::string_view key, ValueType type);
  void write_header();
  void put(const void* data, size_t n);  // into the file, through a buffer
  void flush();
  void pad_to_alignment();
  void check_open(const char* what) const;

  std::string path_, tmp_path_;
  bool overwrite_;
  int fd_ = -1;
  bool header_written_ = false, finished_ = false;
  uint32_t alignment_ = 32;
  int64_t n_kv_ = 0;
  std::vector<std::string> keys_;
  std::string kv_;            // encoded metadata, written with the header
  std::vector<TensorInfo> tensors_;
  uint64_t data_size_ = 0;    // bytes of the data section so far (declared)
  int64_t next_tensor_ = 0;
  uint64_t file_pos_ = 0;
  std::string buf_;
};

}  // namespace qforge::gguf
