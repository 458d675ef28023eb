// GGUF writer and ggml reference quantizers. The golden hashes are of the
// bytes that ggml's own quantize_row_*_ref (llama.cpp from the
// llama-cpp-python 0.3.36 sdist) writes for the same input; the Python tests
// compare against that library directly on random tensors.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "core/half.hpp"
#include "qforge/error.hpp"
#include "qforge/gguf.hpp"

namespace fs = std::filesystem;
using namespace qforge::gguf;

namespace {

// Exactly representable floats from a 64-bit LCG (tests/python builds the same input).
std::vector<float> lcg_input(int64_t n) {
  std::vector<float> out(static_cast<size_t>(n));
  uint64_t s = 0x9E3779B97F4A7C15ull;
  for (int64_t i = 0; i < n; ++i) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    float v = static_cast<float>(s >> 40) * std::ldexp(1.0f, -24) - 0.5f;
    if (i % 7 == 0) v = v * 8.0f;
    if ((i / 256) % 4 == 3) v = v * std::ldexp(1.0f, -10);
    out[static_cast<size_t>(i)] = v;
  }
  return out;
}

uint64_t fnv1a(const std::vector<uint8_t>& b) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (uint8_t c : b) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

std::vector<uint8_t> quantize(Type t, const std::vector<float>& x, int64_t nrows, int threads) {
  const int64_t ncols = static_cast<int64_t>(x.size()) / nrows;
  std::vector<uint8_t> out(static_cast<size_t>(nrows * row_bytes(t, ncols)));
  quantize_rows(t, x.data(), nrows, ncols, out.data(), static_cast<int64_t>(out.size()), threads);
  return out;
}

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

struct TempDir {
  fs::path path;
  TempDir() {
    char tmpl[] = "/tmp/qforge_gguf_XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~TempDir() { fs::remove_all(path); }
  size_t entries() const { return static_cast<size_t>(std::distance(fs::directory_iterator(path), {})); }
};

template <class T>
T read_at(const std::string& s, size_t& pos) {
  T v;
  std::memcpy(&v, s.data() + pos, sizeof(T));
  pos += sizeof(T);
  return v;
}
std::string read_str(const std::string& s, size_t& pos) {
  const auto n = read_at<uint64_t>(s, pos);
  std::string out = s.substr(pos, n);
  pos += n;
  return out;
}

}  // namespace

TEST(GgufQuantize, EqualsGgmlReferenceBytes) {
  const auto x = lcg_input(4 * 1024);
  const std::pair<Type, uint64_t> golden[] = {
      {Type::Q4_0, 0x644a4f98a9f31970ull}, {Type::Q5_0, 0x120d1615fe14e23full}, {Type::Q5_1, 0x6b0edb013350f60eull},
      {Type::Q8_0, 0x367f8820cbf137afull}, {Type::Q4_K, 0xa36e45b6d5c51ca1ull}, {Type::Q5_K, 0x38d06139f051406full},
      {Type::Q6_K, 0x2393f101f5f66a06ull},
  };
  for (const auto& [type, hash] : golden) {
    EXPECT_EQ(fnv1a(quantize(type, x, 4, 1)), hash) << type_name(type);
  }
}

TEST(GgufQuantize, ThreadsDoNotChangeBytes) {
  const auto x = lcg_input(256 * 1024);  // 256 rows: worth threads
  for (Type t : {Type::Q4_0, Type::Q8_0, Type::Q4_K, Type::Q5_K, Type::Q6_K, Type::F16, Type::BF16}) {
    EXPECT_EQ(quantize(t, x, 256, 1), quantize(t, x, 256, 7)) << type_name(t);
  }
}

TEST(GgufQuantize, Q8_0BlockByHand) {
  std::vector<float> x(32);
  for (int j = 0; j < 32; ++j) x[j] = static_cast<float>(j - 16);
  const auto q = quantize(Type::Q8_0, x, 1, 1);
  ASSERT_EQ(q.size(), 34u);
  uint16_t d;
  std::memcpy(&d, q.data(), 2);
  EXPECT_EQ(d, qforge::float_to_half(16.0f / 127));
  EXPECT_EQ(static_cast<int8_t>(q[2 + 0]), -127);   // -16 * 127/16
  EXPECT_EQ(static_cast<int8_t>(q[2 + 16]), 0);
  EXPECT_EQ(static_cast<int8_t>(q[2 + 17]), 8);     // 7.9375 rounds to 8
  EXPECT_EQ(static_cast<int8_t>(q[2 + 31]), 119);   // 15 * 7.9375 = 119.06
}

TEST(GgufQuantize, AllZeroBlocksAreZero) {
  const std::vector<float> x(512, 0.0f);
  for (Type t : {Type::Q4_0, Type::Q8_0, Type::Q4_K, Type::Q5_K, Type::Q6_K}) {
    const auto q = quantize(t, x, 2, 1);
    if (t == Type::Q4_0) {  // levels are offset by 8: zero is nibble 8
      EXPECT_EQ(q[2], 0x88) << type_name(t);
    } else if (t == Type::Q6_K) {
      EXPECT_EQ(fnv1a(q), fnv1a(std::vector<uint8_t>(q.size(), 0))) << type_name(t);
    }
    for (size_t b = 0; b < q.size(); b += static_cast<size_t>(block_bytes(t))) {
      uint16_t d;
      std::memcpy(&d, q.data() + b + (t == Type::Q6_K ? 208 : 0), 2);
      // q4_0's d is max / -8: ggml writes -0.0 for an all-zero block
      EXPECT_EQ(d, t == Type::Q4_0 ? 0x8000 : 0) << type_name(t);
    }
  }
}

TEST(GgufQuantize, BadInputIsRefused) {
  std::vector<float> x(100, 1.0f);
  std::vector<uint8_t> out(1000);
  EXPECT_THROW(quantize_rows(Type::Q4_K, x.data(), 1, 100, out.data(), 1000, 1), qforge::InvalidArgument);
  EXPECT_THROW(quantize_rows(Type::Q8_0, x.data(), 1, 96, out.data(), 10, 1), qforge::InvalidArgument);
  x[5] = std::numeric_limits<float>::quiet_NaN();
  try {
    quantize_rows(Type::Q8_0, x.data(), 1, 96, out.data(), 1000, 1);
    FAIL() << "NaN accepted";
  } catch (const qforge::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("not finite"), std::string::npos) << e.what();
  }
  EXPECT_THROW(to_type(10), qforge::InvalidArgument);  // q2_K: not written by qforge
  EXPECT_EQ(row_bytes(Type::Q6_K, 4096), 16 * 210);
  EXPECT_EQ(row_bytes(Type::BF16, 3), 6);
}

TEST(GgufMix, Q4KMFollowsLlamaQuantize) {
  // a 16-layer Llama in convert_hf_to_gguf's order
  std::vector<std::string> names{"token_embd.weight", "rope_freqs.weight"};
  const int n_layer = 16;
  for (int i = 0; i < n_layer; ++i) {
    for (const char* t : {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                          "ffn_down"})
      names.push_back("blk." + std::to_string(i) + "." + t + ".weight");
  }
  names.push_back("output_norm.weight");
  names.push_back("output.weight");
  std::vector<int32_t> dims;
  std::vector<int64_t> ne0;
  for (const auto& n : names) {
    const bool one_d = n.find("norm") != std::string::npos || n == "rope_freqs.weight";
    dims.push_back(one_d ? 1 : 2);
    ne0.push_back(n.find("ffn_down") != std::string::npos ? 1024 : 512);
  }
  const auto types = mix_types(Mix::Q4_K_M, names, dims, ne0, n_layer, false);
  auto type_of = [&](const std::string& n) {
    for (size_t i = 0; i < names.size(); ++i)
      if (names[i] == n) return types[i];
    ADD_FAILURE() << n;
    return Type::F32;
  };
  EXPECT_EQ(type_of("token_embd.weight"), Type::Q4_K);
  EXPECT_EQ(type_of("output.weight"), Type::Q6_K);
  EXPECT_EQ(type_of("rope_freqs.weight"), Type::F32);
  EXPECT_EQ(type_of("output_norm.weight"), Type::F32);
  // use_more_bits(i, 16): i < 2, i >= 14, or (i - 2) % 3 == 2
  for (int i = 0; i < n_layer; ++i) {
    const bool more = i < 2 || i >= 14 || (i - 2) % 3 == 2;
    const std::string b = "blk." + std::to_string(i) + ".";
    EXPECT_EQ(type_of(b + "attn_v.weight"), more ? Type::Q6_K : Type::Q4_K) << i;
    EXPECT_EQ(type_of(b + "ffn_down.weight"), more ? Type::Q6_K : Type::Q4_K) << i;
    EXPECT_EQ(type_of(b + "attn_q.weight"), Type::Q4_K);
    EXPECT_EQ(type_of(b + "attn_norm.weight"), Type::F32);
  }
  // 70B: the attn_v that stay q4_K become q5_K
  const auto t70 = mix_types(Mix::Q4_K_M, names, dims, ne0, n_layer, true);
  EXPECT_EQ(t70[2 + 9 * 2 + 3], Type::Q5_K);  // blk.2.attn_v
  // tied embeddings (no output.weight): token_embd takes the output's type
  names.pop_back();
  dims.pop_back();
  ne0.pop_back();
  EXPECT_EQ(mix_types(Mix::Q4_K_M, names, dims, ne0, n_layer, false)[0], Type::Q6_K);
  EXPECT_EQ(mix_types(Mix::Q8_0, names, dims, ne0, n_layer, false)[0], Type::Q8_0);
  // rows that are not a multiple of 256 fall back like llama.cpp's tensor_type_fallback
  std::vector<int64_t> narrow(ne0.size(), 96);
  const auto tn = mix_types(Mix::Q4_K_M, names, dims, narrow, n_layer, false);
  EXPECT_EQ(tn[0], Type::Q8_0);  // tied output: nx % 256 != 0 -> q8_0
  EXPECT_EQ(tn[2 + 1], Type::Q5_0);  // blk.0.attn_q: q4_K -> q5_0
  EXPECT_EQ(tn[2 + 3], Type::Q8_0);  // blk.0.attn_v: q6_K -> q8_0
  EXPECT_EQ(mix_types(Mix::Q5_K_M, names, dims, narrow, n_layer, false)[2 + 1], Type::Q5_1);
  std::vector<int64_t> odd(ne0.size(), 100);
  EXPECT_EQ(mix_types(Mix::Q4_K_M, names, dims, odd, n_layer, false)[2 + 1], Type::F16);
}

TEST(GgufMix, MmprojFollowsConvertHfToGguf) {
  // an Idefics3 vision encoder + projector as convert_hf_to_gguf.py --mmproj names them
  const std::vector<std::string> names{"mm.model.fc.weight",    "v.patch_embd.bias",      "v.patch_embd.weight",
                                       "v.position_embd.weight", "v.blk.0.ln1.weight",    "v.blk.0.ffn_up.bias",
                                       "v.blk.0.ffn_up.weight",  "v.blk.0.attn_q.weight", "v.post_ln.weight"};
  const std::vector<int32_t> dims{2, 1, 4, 2, 1, 1, 2, 2, 1};
  const std::vector<int64_t> ne0{192, 48, 16, 48, 48, 96, 64, 48, 48};
  const auto f16 = mmproj_types(Mix::F16, names, dims, ne0);
  const std::vector<Type> want16{Type::F16, Type::F32, Type::F32, Type::F32, Type::F32,
                                 Type::F32, Type::F16, Type::F16, Type::F32};
  EXPECT_EQ(f16, want16);
  EXPECT_EQ(mmproj_types(Mix::BF16, names, dims, ne0)[6], Type::BF16);
  const auto q8 = mmproj_types(Mix::Q8_0, names, dims, ne0);
  EXPECT_EQ(q8[0], Type::Q8_0);  // 192 = 6 blocks
  EXPECT_EQ(q8[6], Type::Q8_0);  // 64 = 2 blocks
  EXPECT_EQ(q8[7], Type::F16);   // 48: not whole blocks, gguf-py falls back to f16
  EXPECT_EQ(q8[2], Type::F32);
  EXPECT_THROW(mmproj_types(Mix::Q4_K_M, names, dims, ne0), qforge::InvalidArgument);
  EXPECT_THROW(mmproj_types(Mix::F16, names, {2}, ne0), qforge::InvalidArgument);
}

TEST(GgufWriter, LayoutAndValues) {
  TempDir dir;
  const fs::path out = dir.path / "m.gguf";
  const auto w0 = lcg_input(64 * 2);
  const std::vector<float> norm{1.0f, 2.0f, 3.0f};
  {
    Writer w(out.string(), false);
    const uint32_t u32 = 7;
    const float f32 = 0.5f;
    const uint8_t yes = 1;
    const int32_t ids[3] = {1, -2, 3};
    w.add_string("general.architecture", "llama");
    w.add_scalar("llama.block_count", ValueType::U32, &u32);
    w.add_scalar("llama.rope.freq_base", ValueType::F32, &f32);
    w.add_scalar("tokenizer.ggml.add_bos_token", ValueType::BOOL, &yes);
    w.add_array("tokenizer.ggml.token_type", ValueType::I32, ids, 3);
    w.add_string_array("tokenizer.ggml.tokens", {"a", "", "\xc4\xa0the"});
    EXPECT_THROW(w.add_string("general.architecture", "again"), qforge::InvalidArgument);
    w.add_tensor("blk.0.attn_q.weight", {64, 2}, Type::Q8_0);
    w.add_tensor("output_norm.weight", {3}, Type::F32);
    EXPECT_THROW(w.add_tensor("x", {100, 2}, Type::Q8_0), qforge::InvalidArgument);
    EXPECT_THROW(w.add_tensor(std::string(64, 'n'), {32}, Type::F32), qforge::InvalidArgument);
    EXPECT_THROW(w.finish(), qforge::InvalidArgument);  // nothing written yet
    w.write_tensor(w0.data(), QF_FLOAT32, 128, 1);
    EXPECT_THROW(w.write_tensor(norm.data(), QF_FLOAT32, 4, 1), qforge::InvalidArgument);  // wrong size
    w.write_tensor(norm.data(), QF_FLOAT32, 3, 1);
    EXPECT_FALSE(fs::exists(out));  // nothing under the final name before finish
    w.finish();
  }
  EXPECT_EQ(dir.entries(), 1u);  // no temporary file left
  const std::string s = read_file(out);
  size_t pos = 0;
  ASSERT_EQ(s.substr(0, 4), "GGUF");
  pos = 4;
  EXPECT_EQ(read_at<uint32_t>(s, pos), 3u);
  EXPECT_EQ(read_at<uint64_t>(s, pos), 2u);
  EXPECT_EQ(read_at<uint64_t>(s, pos), 6u);
  EXPECT_EQ(read_str(s, pos), "general.architecture");
  EXPECT_EQ(read_at<uint32_t>(s, pos), 8u);
  EXPECT_EQ(read_str(s, pos), "llama");
  EXPECT_EQ(read_str(s, pos), "llama.block_count");
  EXPECT_EQ(read_at<uint32_t>(s, pos), 4u);
  EXPECT_EQ(read_at<uint32_t>(s, pos), 7u);
  EXPECT_EQ(read_str(s, pos), "llama.rope.freq_base");
  EXPECT_EQ(read_at<uint32_t>(s, pos), 6u);
  EXPECT_EQ(read_at<float>(s, pos), 0.5f);
  EXPECT_EQ(read_str(s, pos), "tokenizer.ggml.add_bos_token");
  EXPECT_EQ(read_at<uint32_t>(s, pos), 7u);
  EXPECT_EQ(read_at<uint8_t>(s, pos), 1u);
  EXPECT_EQ(read_str(s, pos), "tokenizer.ggml.token_type");
  EXPECT_EQ(read_at<uint32_t>(s, pos), 9u);
  EXPECT_EQ(read_at<uint32_t>(s, pos), 5u);
  EXPECT_EQ(read_at<uint64_t>(s, pos), 3u);
  EXPECT_EQ(read_at<int32_t>(s, pos), 1);
  EXPECT_EQ(read_at<int32_t>(s, pos), -2);
  EXPECT_EQ(read_at<int32_t>(s, pos), 3);
  EXPECT_EQ(read_str(s, pos), "tokenizer.ggml.tokens");
  EXPECT_EQ(read_at<uint32_t>(s, pos), 9u);
  EXPECT_EQ(read_at<uint32_t>(s, pos), 8u);
  EXPECT_EQ(read_at<uint64_t>(s, pos), 3u);
  EXPECT_EQ(read_str(s, pos), "a");
  EXPECT_EQ(read_str(s, pos), "");
  EXPECT_EQ(read_str(s, pos), "\xc4\xa0the");
  EXPECT_EQ(read_str(s, pos), "blk.0.attn_q.weight");
  EXPECT_EQ(read_at<uint32_t>(s, pos), 2u);
  EXPECT_EQ(read_at<uint64_t>(s, pos), 64u);
  EXPECT_EQ(read_at<uint64_t>(s, pos), 2u);
  EXPECT_EQ(read_at<uint32_t>(s, pos), 8u);
  EXPECT_EQ(read_at<uint64_t>(s, pos), 0u);
  EXPECT_EQ(read_str(s, pos), "output_norm.weight");
  EXPECT_EQ(read_at<uint32_t>(s, pos), 1u);
  EXPECT_EQ(read_at<uint64_t>(s, pos), 3u);
  EXPECT_EQ(read_at<uint32_t>(s, pos), 0u);
  EXPECT_EQ(read_at<uint64_t>(s, pos), 160u);  // 4 q8_0 blocks = 136 bytes, padded to 32
  const size_t data = (pos + 31) / 32 * 32;
  EXPECT_EQ(s.substr(pos, data - pos), std::string(data - pos, '\0'));
  const auto q = quantize(Type::Q8_0, w0, 2, 1);
  EXPECT_EQ(s.substr(data, 136), std::string(q.begin(), q.end()));
  float back[3];
  std::memcpy(back, s.data() + data + 160, 12);
  EXPECT_EQ(back[2], 3.0f);
  EXPECT_EQ(s.size(), data + 160 + 32);
}

TEST(GgufWriter, CustomAlignmentAndHalfInput) {
  TempDir dir;
  const fs::path out = dir.path / "a.gguf";
  std::vector<uint16_t> bf(64);
  for (int i = 0; i < 64; ++i) bf[i] = qforge::float_to_bf16(static_cast<float>(i) / 8);
  {
    Writer w(out.string(), false);
    const uint32_t a = 64;
    w.add_scalar("general.alignment", ValueType::U32, &a);
    w.add_tensor("t", {64}, Type::F16);
    w.write_tensor(bf.data(), QF_BFLOAT16, 64, 1);
    w.finish();
  }
  const std::string s = read_file(out);
  EXPECT_EQ(s.size() % 64, 0u);
  uint16_t h;
  std::memcpy(&h, s.data() + s.size() - 128 + 2 * 9, 2);
  EXPECT_EQ(h, qforge::float_to_half(9.0f / 8));
  const uint32_t bad = 48;
  Writer w2((dir.path / "b.gguf").string(), false);
  EXPECT_THROW(w2.add_scalar("general.alignment", ValueType::U32, &bad), qforge::InvalidArgument);
}

TEST(GgufWriter, ExistingOutputIsRefusedUnlessOverwrite) {
  TempDir dir;
  const fs::path out = dir.path / "m.gguf";
  std::ofstream(out) << "keep me";
  try {
    Writer w(out.string(), false);
    FAIL() << "existing output accepted";
  } catch (const qforge::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("already exists"), std::string::npos) << e.what();
  }
  EXPECT_EQ(read_file(out), "keep me");
  {
    Writer w(out.string(), true);
    w.add_string("general.name", "x");
    w.finish();
  }
  EXPECT_EQ(read_file(out).substr(0, 4), "GGUF");
  EXPECT_THROW(Writer((dir.path / "missing" / "m.gguf").string(), false), qforge::InvalidArgument);
}

TEST(GgufWriter, AbandonedWriterLeavesNothing) {
  TempDir dir;
  {
    Writer w((dir.path / "m.gguf").string(), false);
    w.add_tensor("t", {32}, Type::F32);
    std::vector<float> x(32, 1.0f);
    w.write_tensor(x.data(), QF_FLOAT32, 32, 1);
    EXPECT_EQ(dir.entries(), 1u);  // the temporary file
  }
  EXPECT_EQ(dir.entries(), 0u);
}

TEST(GgufWriter, WriteErrorMidFileLeavesNothing) {
  // A child process with a 1 MiB file size limit (SIGXFSZ ignored, so write()
  // fails with EFBIG as on a full disk) writes a 16 MiB tensor.
  TempDir dir;
  const std::string out = (dir.path / "big.gguf").string();
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::signal(SIGXFSZ, SIG_IGN);
    struct rlimit lim {1 << 20, 1 << 20};
    ::setrlimit(RLIMIT_FSIZE, &lim);
    int code = 3;
    try {
      Writer w(out, false);
      w.add_tensor("t", {1024, 4096}, Type::F32);
      std::vector<float> x(1024 * 4096, 0.25f);
      w.write_tensor(x.data(), QF_FLOAT32, static_cast<int64_t>(x.size()), 1);
      w.finish();
      code = 1;  // succeeded: the limit did not bite
    } catch (const qforge::RuntimeFailure& e) {
      code = std::string(e.what()).find("file size limit") != std::string::npos ? 0 : 2;
    } catch (...) {
      code = 4;
    }
    ::_exit(code);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_EQ(dir.entries(), 0u);  // neither the output nor the temporary file
}
