// GGUF v3 writer (the layout of ggml's gguf.cpp / gguf-py's GGUFWriter):
//   "GGUF" u32 version=3, u64 n_tensors, u64 n_kv,
//   n_kv x (string key, u32 type, value), n_tensors x (string name, u32 n_dims,
//   u64 ne[n_dims], u32 ggml_type, u64 offset), zero padding to the alignment,
//   then each tensor's data, each padded to the alignment.
// Strings are u64 length + UTF-8 bytes; everything little-endian.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "core/half.hpp"
#include "qforge/error.hpp"
#include "qforge/gguf.hpp"

namespace qforge::gguf {
namespace {

constexpr size_t kBufferBytes = size_t{4} << 20;
// write_tensor converts at most this many input elements at a time.
constexpr int64_t kChunkElements = int64_t{1} << 24;

size_t value_size(ValueType t) {
  switch (t) {
    case ValueType::U8: case ValueType::I8: case ValueType::BOOL: return 1;
    case ValueType::U16: case ValueType::I16: return 2;
    case ValueType::U32: case ValueType::I32: case ValueType::F32: return 4;
    case ValueType::U64: case ValueType::I64: case ValueType::F64: return 8;
    default: return 0;  // string, array
  }
}

template <class T>
void append(std::string& s, T v) {
  s.append(reinterpret_cast<const char*>(&v), sizeof(T));
}
void append_string(std::string& s, std::string_view v) {
  append<uint64_t>(s, v.size());
  s.append(v.data(), v.size());
}

std::string os_error(const char* what, const std::string& path, int err) {
  std::string msg = std::string(what) + " " + path + ": " + std::strerror(err);
  if (err == ENOSPC || err == EFBIG || err == EDQUOT) msg += " (disk full or file size limit reached)";
  return msg;
}

bool exists(const std::string& path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0;
}

std::string parent_dir(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

}  // namespace

Writer::Writer(std::string path, bool overwrite) : path_(std::move(path)), overwrite_(overwrite) {
  QF_CHECK(!path_.empty(), "GGUF output path is empty");
  QF_CHECK(path_.find('\0') == std::string::npos, "GGUF output path contains a NUL byte");
  QF_CHECK(path_.back() != '/', "GGUF output path ", path_, " names a directory");
  QF_CHECK(overwrite_ || !exists(path_), path_, ": the output file already exists (pass overwrite to replace it)");
  struct stat st;
  const std::string dir = parent_dir(path_);
  QF_CHECK(::stat(dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode), path_, ": the directory ", dir, " does not exist");
  const std::string base = path_.substr(path_.rfind('/') == std::string::npos ? 0 : path_.rfind('/') + 1);
  tmp_path_ = (dir == "." && path_.find('/') == std::string::npos ? "" : dir + "/") + "." + base + ".tmp." +
              std::to_string(::getpid());
  fd_ = ::open(tmp_path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd_ < 0) throw RuntimeFailure(os_error("cannot create", tmp_path_, errno));
  buf_.reserve(kBufferBytes);
}

Writer::~Writer() {
  if (fd_ >= 0) ::close(fd_);
  if (!finished_ && !tmp_path_.empty()) ::unlink(tmp_path_.c_str());
}

void Writer::check_open(const char* what) const {
  QF_CHECK(!finished_, "GGUF writer: ", what, " after finish()");
  QF_CHECK(fd_ >= 0, "GGUF writer: ", what, " after a failed write (the file was discarded)");
}

void Writer::begin_key(std::string_view key, ValueType type) {
  check_open("adding metadata");
  QF_CHECK(!header_written_, "GGUF writer: metadata '", key, "' added after tensor data started");
  QF_CHECK(!key.empty() && key.size() <= kMaxKeyBytes, "GGUF metadata key must be 1..", kMaxKeyBytes,
           " bytes, got ", key.size());
  QF_CHECK(n_kv_ < kMaxKeys, "GGUF writer: more than ", kMaxKeys, " metadata keys");
  QF_CHECK(std::find(keys_.begin(), keys_.end(), key) == keys_.end(), "GGUF metadata key '", key,
           "' added twice");
  keys_.emplace_back(key);
  append_string(kv_, key);
  append<uint32_t>(kv_, static_cast<uint32_t>(type));
  ++n_kv_;
}

void Writer::add_scalar(std::string_view key, ValueType type, const void* value) {
  const size_t n = value_size(type);
  QF_CHECK(n > 0, "GGUF metadata '", key, "': value type ", static_cast<uint32_t>(type), " is not a scalar");
  QF_CHECK(value != nullptr, "GGUF metadata '", key, "': value is null");
  if (key == "general.alignment") {
    QF_CHECK(type == ValueType::U32, "general.alignment must be a uint32");
    uint32_t a;
    std::memcpy(&a, value, 4);
    QF_CHECK(a > 0 && (a & (a - 1)) == 0 && a <= (1u << 20), "general.alignment must be a power of two <= 2^20, got ", a);
    QF_CHECK(tensors_.empty(), "general.alignment must be set before the first tensor is declared");
    alignment_ = a;
  }
  begin_key(key, type);
  kv_.append(static_cast<const char*>(value), n);
}

void Writer::add_string(std::string_view key, std::string_view value) {
  QF_CHECK(value.size() <= kMaxStringBytes, "GGUF metadata '", key, "': string of ", value.size(),
           " bytes exceeds ", kMaxStringBytes);
  begin_key(key, ValueType::STRING);
  append_string(kv_, value);
}

void Writer::add_array(std::string_view key, ValueType elem, const void* data, int64_t n) {
  const size_t size = value_size(elem);
  QF_CHECK(size > 0, "GGUF metadata '", key, "': array element type ", static_cast<uint32_t>(elem),
           " is not a scalar (use add_string_array for strings)");
  QF_CHECK(n >= 0 && n <= kMaxArrayLength, "GGUF metadata '", key, "': array length ", n, " outside 0..",
           kMaxArrayLength);
  QF_CHECK(n == 0 || data != nullptr, "GGUF metadata '", key, "': array data is null");
  begin_key(key, ValueType::ARRAY);
  append<uint32_t>(kv_, static_cast<uint32_t>(elem));
  append<uint64_t>(kv_, static_cast<uint64_t>(n));
  kv_.append(static_cast<const char*>(data), size * static_cast<size_t>(n));
}

void Writer::add_string_array(std::string_view key, const std::vector<std::string_view>& values) {
  QF_CHECK(static_cast<int64_t>(values.size()) <= kMaxArrayLength, "GGUF metadata '", key, "': ", values.size(),
           " strings exceed ", kMaxArrayLength);
  for (const auto& v : values)
    QF_CHECK(v.size() <= kMaxStringBytes, "GGUF metadata '", key, "': a string of ", v.size(), " bytes");
  begin_key(key, ValueType::ARRAY);
  append<uint32_t>(kv_, static_cast<uint32_t>(ValueType::STRING));
  append<uint64_t>(kv_, values.size());
  for (const auto& v : values) append_string(kv_, v);
}

void Writer::add_tensor(std::string_view name, const std::vector<int64_t>& ne, Type type) {
  check_open("declaring a tensor");
  QF_CHECK(!header_written_, "GGUF writer: tensor '", name, "' declared after tensor data started");
  QF_CHECK(!name.empty() && name.size() <= kMaxTensorName, "GGUF tensor name '", name, "' must be 1..",
           kMaxTensorName, " bytes (llama.cpp's GGML_MAX_NAME)");
  QF_CHECK(!ne.empty() && static_cast<int64_t>(ne.size()) <= kMaxDims, "GGUF tensor '", name, "': ", ne.size(),
           " dimensions (1..", kMaxDims, ")");
  QF_CHECK(static_cast<int64_t>(tensors_.size()) < kMaxTensors, "GGUF writer: more than ", kMaxTensors, " tensors");
  for (const auto& t : tensors_) QF_CHECK(t.name != name, "GGUF tensor '", name, "' declared twice");
  int64_t rows = 1;
  for (size_t d = 0; d < ne.size(); ++d) {
    QF_CHECK(ne[d] > 0, "GGUF tensor '", name, "': dimension ", d, " is ", ne[d]);
    if (d > 0) {
      QF_CHECK(rows <= (int64_t{1} << 48) / ne[d], "GGUF tensor '", name, "' is too large");
      rows *= ne[d];
    }
  }
  const int64_t rb = row_bytes(type, ne[0]);
  QF_CHECK(rows <= (int64_t{1} << 48) / rb, "GGUF tensor '", name, "' is too large");
  const int64_t bytes = rows * rb;
  tensors_.push_back({std::string(name), ne, type, data_size_, bytes});
  data_size_ += (static_cast<uint64_t>(bytes) + alignment_ - 1) / alignment_ * alignment_;
}

void Writer::put(const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    if (buf_.size() == kBufferBytes) flush();
    const size_t take = std::min(n, kBufferBytes - buf_.size());
    buf_.append(p, take);
    p += take;
    n -= take;
    file_pos_ += take;
  }
}

void Writer::flush() {
  size_t done = 0;
  while (done < buf_.size()) {
    const ssize_t w = ::write(fd_, buf_.data() + done, buf_.size() - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      const int err = w < 0 ? errno : ENOSPC;
      ::close(fd_);
      fd_ = -1;
      ::unlink(tmp_path_.c_str());
      throw RuntimeFailure(os_error("cannot write", tmp_path_, err));
    }
    done += static_cast<size_t>(w);
  }
  buf_.clear();
}

void Writer::pad_to_alignment() {
  static const char zeros[64] = {};
  while (file_pos_ % alignment_ != 0) {
    const size_t n = std::min<uint64_t>(sizeof zeros, alignment_ - file_pos_ % alignment_);
    put(zeros, n);
  }
}

void Writer::write_header() {
  put("GGUF", 4);
  const uint32_t version = 3;
  const uint64_t n_tensors = tensors_.size(), n_kv = static_cast<uint64_t>(n_kv_);
  put(&version, 4);
  put(&n_tensors, 8);
  put(&n_kv, 8);
  put(kv_.data(), kv_.size());
  std::string().swap(kv_);
  std::string info;
  for (const auto& t : tensors_) {
    info.clear();
    append_string(info, t.name);
    append<uint32_t>(info, static_cast<uint32_t>(t.ne.size()));
    for (int64_t d : t.ne) append<uint64_t>(info, static_cast<uint64_t>(d));
    append<uint32_t>(info, static_cast<uint32_t>(t.type));
    append<uint64_t>(info, t.offset);
    put(info.data(), info.size());
  }
  pad_to_alignment();
  header_written_ = true;
}

void Writer::write_tensor_bytes(const void* data, int64_t bytes) {
  check_open("writing tensor data");
  QF_CHECK(next_tensor_ < tensor_count(), "GGUF writer: all ", tensor_count(), " declared tensors are written");
  const TensorInfo& t = tensors_[static_cast<size_t>(next_tensor_)];
  QF_CHECK(bytes == t.bytes, "GGUF tensor '", t.name, "' (", type_name(t.type), "): got ", bytes, " bytes, expected ",
           t.bytes);
  QF_CHECK(bytes == 0 || data != nullptr, "GGUF tensor '", t.name, "': data is null");
  if (!header_written_) write_header();
  put(data, static_cast<size_t>(bytes));
  pad_to_alignment();
  ++next_tensor_;
}

void Writer::write_tensor(const void* src, qf_dtype src_dtype, int64_t numel, int threads) {
  check_open("writing tensor data");
  QF_CHECK(next_tensor_ < tensor_count(), "GGUF writer: all ", tensor_count(), " declared tensors are written");
  QF_CHECK(src_dtype == QF_FLOAT32 || src_dtype == QF_FLOAT16 || src_dtype == QF_BFLOAT16,
           "GGUF tensor data must be fp32, fp16 or bf16 (qf_dtype ", static_cast<int>(src_dtype), ")");
  const TensorInfo& t = tensors_[static_cast<size_t>(next_tensor_)];
  int64_t expected = 1;
  for (int64_t d : t.ne) expected *= d;
  QF_CHECK(numel == expected, "GGUF tensor '", t.name, "': got ", numel, " elements, its shape holds ", expected);
  QF_CHECK(src != nullptr, "GGUF tensor '", t.name, "': data is null");
  if (!header_written_) write_header();
  const int64_t ncols = t.ne[0], nrows = numel / ncols;
  const int64_t rb = row_bytes(t.type, ncols);
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElements / ncols);
  std::vector<float> rows_f32;
  std::vector<uint8_t> encoded(static_cast<size_t>(std::min(rows_per_chunk, nrows) * rb));
  for (int64_t r0 = 0; r0 < nrows; r0 += rows_per_chunk) {
    const int64_t n = std::min(rows_per_chunk, nrows - r0);
    const float* x;
    if (src_dtype == QF_FLOAT32) {
      x = static_cast<const float*>(src) + r0 * ncols;
    } else {
      rows_f32.resize(static_cast<size_t>(n * ncols));
      const auto* h = static_cast<const uint16_t*>(src) + r0 * ncols;
      for (int64_t i = 0; i < n * ncols; ++i)
        rows_f32[static_cast<size_t>(i)] = src_dtype == QF_FLOAT16 ? half_to_float(h[i]) : bf16_to_float(h[i]);
      x = rows_f32.data();
    }
    quantize_rows(t.type, x, n, ncols, encoded.data(), static_cast<int64_t>(encoded.size()), threads);
    put(encoded.data(), static_cast<size_t>(n * rb));
  }
  pad_to_alignment();
  ++next_tensor_;
}

void Writer::finish() {
  check_open("finish");
  QF_CHECK(next_tensor_ == tensor_count(), "GGUF writer: ", tensor_count() - next_tensor_, " of ", tensor_count(),
           " declared tensors were not written (next: '",
           next_tensor_ < tensor_count() ? tensors_[static_cast<size_t>(next_tensor_)].name : std::string(), "')");
  if (!header_written_) write_header();
  flush();
  auto fail = [&](const char* what, const std::string& p) {
    const int err = errno;
    ::close(fd_);
    fd_ = -1;
    ::unlink(tmp_path_.c_str());
    throw RuntimeFailure(os_error(what, p, err));
  };
  if (::fsync(fd_) != 0) fail("cannot fsync", tmp_path_);
  if (::close(fd_) != 0) {
    fd_ = -1;
    fail("cannot close", tmp_path_);
  }
  fd_ = -1;
  if (overwrite_) {
    if (::rename(tmp_path_.c_str(), path_.c_str()) != 0) fail("cannot rename into", path_);
  } else {
    // link() refuses an existing name atomically: a file that appeared meanwhile is never replaced
    if (::link(tmp_path_.c_str(), path_.c_str()) != 0) {
      const int err = errno;
      ::unlink(tmp_path_.c_str());
      if (err == EEXIST) throw InvalidArgument(path_ + ": the output file already exists (created during the export)");
      throw RuntimeFailure(os_error("cannot create", path_, err));
    }
    ::unlink(tmp_path_.c_str());
  }
  finished_ = true;
  const int dfd = ::open(parent_dir(path_).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace qforge::gguf
