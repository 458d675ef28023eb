/* qforge C ABI: the one boundary between the C++/CUDA core and everything else
 * (the Python package reaches it through ctypes, C programs link it directly).
 *
 * Rules every entry follows:
 *  - returns QF_OK (0) or an error status; never throws, never aborts;
 *    qf_last_error() then holds a message naming the problem (per thread);
 *  - takes raw pointers + element counts, so it can check sizes itself;
 *  - never allocates in a hot path: outputs and workspaces are the caller's;
 *  - device work runs on the caller's stream (a cudaStream_t passed as void*,
 *    NULL = the legacy default stream); CPU work ignores the stream.
 */
#ifndef QFORGE_QFORGE_H
#define QFORGE_QFORGE_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define QF_API __declspec(dllexport)
#else
#define QF_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- common */
enum {
  QF_OK = 0,
  QF_ERR_INVALID_ARGUMENT = 1, /* the caller's input is wrong: see qf_last_error() */
  QF_ERR_RUNTIME = 2,          /* CUDA / cuBLAS / OS failure */
  QF_ERR_OUT_OF_MEMORY = 3
};

typedef enum qf_dtype {
  QF_FLOAT32 = 0,
  QF_FLOAT16 = 1,
  QF_BFLOAT16 = 2,
  QF_UINT8 = 3,
  QF_INT64 = 4,
  QF_INT32 = 5,
  QF_FLOAT64 = 6
} qf_dtype;

typedef enum qf_device { QF_CPU = 0, QF_CUDA = 1 } qf_device;

QF_API const char* qf_version(void);
/* The message of the last failed call on this thread ("" after a success);
 * the pointer stays valid until the next qforge call on this thread. */
QF_API const char* qf_last_error(void);
QF_API int qf_built_with_cuda(void);
QF_API int qf_cuda_device_count(void);

/* ------------------------------------------------------------------- NF4
 * bitsandbytes' 4-bit storage (see docs/nf4.md): element i of the flattened
 * weight lives in byte i/2, high nibble for even i; block b = elements
 * [b*blocksize, (b+1)*blocksize) shares one absmax. The absmax is either
 * fp32 per block, or double-quantized: uint8 codes through a 256-entry map,
 * one fp32 nested absmax per nested_blocksize codes, plus one fp32 offset:
 *   absmax[b] = nested_code[q[b]] * nested_absmax[b / nested_blocksize] + offset
 * (multiply and add rounded separately, as bitsandbytes does).
 * All pointers of one call live on the same device. */
typedef struct qf_nf4_weights {
  const uint8_t* packed;        /* ceil(numel/2) bytes */
  int64_t packed_bytes;
  int64_t numel;                /* elements of the unpacked weight */
  int32_t blocksize;            /* 32, 64, ..., 4096 */
  const float* code;            /* the 16-entry quant_map */
  const void* absmax;           /* fp32 or uint8 per block */
  qf_dtype absmax_dtype;        /* QF_FLOAT32, or QF_UINT8 when double-quantized */
  int64_t absmax_len;           /* ceil(numel / blocksize) */
  /* double quantization only (absmax_dtype == QF_UINT8), NULL otherwise: */
  const float* nested_absmax;   /* ceil(absmax_len / nested_blocksize) */
  int64_t nested_absmax_len;
  const float* nested_code;     /* 256 entries */
  const float* nested_offset;   /* 1 entry */
  int32_t nested_blocksize;     /* bitsandbytes uses 256 */
} qf_nf4_weights;

/* Sizes a caller allocates for a weight of numel elements. */
QF_API int64_t qf_nf4_packed_bytes(int64_t numel);
QF_API int64_t qf_nf4_num_blocks(int64_t numel, int32_t blocksize);

/* QF_OK when w describes a consistent weight (sizes, blocksizes, pointers; no
 * data is read), else QF_ERR_INVALID_ARGUMENT naming what disagrees: the
 * check every qf_nf4_dequantize runs first, for loaders that check a
 * checkpoint before using it. */
QF_API int qf_nf4_validate(const qf_nf4_weights* w);

/* Dequantize w into out (numel elements of out_dtype: fp32/fp16/bf16).
 * On CUDA this is one kernel whatever the absmax form. */
QF_API int qf_nf4_dequantize(qf_device device, const qf_nf4_weights* w, void* out,
                             qf_dtype out_dtype, int64_t out_numel, void* stream);

/* Quantize x (numel elements, fp32/fp16/bf16) to NF4 with an fp32 absmax per
 * block, exactly as bitsandbytes' quantize_4bit(quant_type="nf4"). */
QF_API int qf_nf4_quantize(qf_device device, const void* x, qf_dtype x_dtype, int64_t numel,
                           int32_t blocksize, uint8_t* packed, int64_t packed_bytes,
                           float* absmax, int64_t absmax_len, void* stream);

/* 8-bit blockwise quantization of (x - *offset) through a 256-entry code, as
 * bitsandbytes' quantize_blockwise (used for the absmax of double quant).
 * offset may be NULL (no shift). */
QF_API int qf_quantize_blockwise_8bit(qf_device device, const float* x, int64_t n,
                                      const float* offset, const float* code256,
                                      int32_t blocksize, uint8_t* q, float* absmax,
                                      int64_t absmax_len, void* stream);

/* The default 256-entry signed dynamic map (bitsandbytes create_dynamic_map()). */
QF_API int qf_dynamic_map_8bit(float* out256);
/* The 16-entry NF4 map (bitsandbytes get_4bit_type("nf4")). */
QF_API int qf_nf4_code(float* out16);

/* ------------------------------------------------- linear + loss (src/loss) */
/* Fused chunked linear + cross-entropy (see include/qforge/loss.hpp for the
 * exact formulas): loss of softmax(hidden[N,D] @ weight[V,D]^T + bias) against
 * labels without materialising the N x V logits. Per chunk of `chunk_size`
 * tokens: GEMM -> logits, one fused pass -> LSE, loss and d loss / d logits in
 * place (fp32 arithmetic), GEMMs -> grad_hidden rows and grad_weight (+)=.
 * Gradients are computed when their output pointer is non-NULL, so a caller
 * can compute them in the forward pass and rescale in backward. */
enum { QF_REDUCTION_NONE = 0, QF_REDUCTION_MEAN = 1, QF_REDUCTION_SUM = 2 };

typedef struct qf_lce_options {
  int64_t ignore_index;  /* PyTorch: -100 */
  float label_smoothing; /* [0, 1] */
  float softcap;         /* 0: none; > 0: z = softcap * tanh(z / softcap) */
  float logit_scale;     /* logits are multiplied by this (before softcap) */
  float z_loss;          /* + z_loss * lse^2 per valid token */
  int32_t reduction;     /* QF_REDUCTION_* */
  int32_t validate;      /* CUDA: 1 = check labels first (one stream sync) and fail
                            with a message; 0 = out-of-range labels give NaN */
  int64_t chunk_size;    /* tokens per chunk; 0 = all at once */
} qf_lce_options;

/* Workspace bytes for qf_lce_forward (device memory on CUDA, 256-byte aligned). */
QF_API int qf_lce_workspace_bytes(qf_device device, int64_t n, int64_t d, int64_t v,
                                  qf_dtype dtype, int64_t chunk_size, int64_t* bytes);

/* The chunk_size whose workspace fits in budget_bytes: n when all fit, else
 * the largest 128 * 2^k that fits (below 128: the largest that fits; at least 1). */
QF_API int qf_lce_chunk_size(qf_device device, int64_t n, int64_t d, int64_t v, qf_dtype dtype,
                             int64_t budget_bytes, int64_t* chunk_size);

/* The QF_REDUCTION_* of PyTorch's name for it ("none", "mean", "sum");
 * QF_ERR_INVALID_ARGUMENT naming the choices for any other. */
QF_API int qf_lce_reduction(const char* name, int32_t* reduction);

/* hidden [n,d], weight [v,d], bias [v] or NULL: all of `dtype` (fp32/fp16/bf16);
 * labels [n] int64; class_weight [v] fp32 or NULL.
 * loss: 1 float (mean/sum) or n floats (none); lse: n floats or NULL.
 * grad_hidden [n,d] dtype, grad_weight [v,d] of grad_weight_dtype (dtype, or
 * QF_FLOAT32 to accumulate in fp32), grad_bias [v] fp32: each NULL = skip.
 * grad_scale: n floats multiplying each token's gradient (the upstream
 * gradient of reduction none), or NULL. */
QF_API int qf_lce_forward(qf_device device, const void* hidden, const void* weight,
                          const void* bias, qf_dtype dtype, int64_t n, int64_t d, int64_t v,
                          const int64_t* labels, const float* class_weight,
                          const qf_lce_options* options, float* loss, float* lse,
                          void* grad_hidden, void* grad_weight, qf_dtype grad_weight_dtype,
                          float* grad_bias, const float* grad_scale, void* workspace,
                          int64_t workspace_bytes, void* stream);

/* A tensor as a torch op hands it over: its data, element type, device and
 * layout (sizes and strides in elements, row-major contiguous expected).
 * ndim < 0 marks an optional tensor that is absent. */
#define QF_MAX_DIMS 8
typedef struct qf_tensor {
  const void* data;
  int32_t dtype;        /* qf_dtype */
  int32_t device;       /* qf_device */
  int32_t device_index; /* CUDA ordinal; 0 on the CPU */
  int32_t ndim;         /* 0..QF_MAX_DIMS, or < 0: absent */
  int64_t sizes[QF_MAX_DIMS];
  int64_t strides[QF_MAX_DIMS];
} qf_tensor;

/* Every tensor of one qf_lce_run call. Required: hidden [N,D], weight [V,D]
 * (same dtype: fp32/fp16/bf16), labels [N] int64, loss (fp32: [N] for
 * reduction none, else one element), workspace (uint8, at least
 * qf_lce_workspace_bytes). Optional (ndim < 0 = absent): bias [V] of
 * hidden's dtype, class_weight [V] fp32, lse [N] fp32, grad_hidden [N,D] of
 * hidden's dtype, grad_weight [V,D] of hidden's dtype or fp32, grad_bias [V]
 * fp32, grad_scale [N] fp32. All contiguous, all on one device (on CUDA the
 * current device). */
typedef struct qf_lce_tensors {
  qf_tensor hidden, weight, bias, labels, class_weight;
  qf_tensor loss, lse, grad_hidden, grad_weight, grad_bias, grad_scale, workspace;
} qf_lce_tensors;

/* qf_lce_forward on tensor descriptors: checks every shape, stride, dtype and
 * device against the others (and the labels' range on the CPU, or on CUDA
 * with options->validate) before touching any data; the entry behind the
 * torch ops qforge::linear_cross_entropy and its backward. */
QF_API int qf_lce_run(const qf_lce_tensors* tensors, const qf_lce_options* options, void* stream);

/* x[i] *= scale[0] in place (n elements of dtype fp32/fp16/bf16, fp32
 * arithmetic; scale is one fp32 on the same device as x): the backward
 * rescale of gradients computed in the forward pass by the upstream gradient,
 * without a host sync. */
QF_API int qf_lce_scale_inplace(qf_device device, void* x, qf_dtype dtype, int64_t n,
                                const float* scale, void* stream);

/* --------------------------------------------- layer kernels (src/layer) */
/* Fused RMSNorm, SwiGLU and rotary embeddings of a decoder layer, forward and
 * backward (formulas and rounding points: docs/layer_kernels.md). Tensors
 * are contiguous, fp32/fp16/bf16, all on `device`; arithmetic is fp32. An
 * output may be the very buffer of an input of its size (in place), never a
 * partial overlap. */

/* x, y [rows, dim] of x_dtype; weight [dim] of x_dtype or fp32; rstd [rows] fp32:
 *   rstd = 1 / sqrt(mean(x^2) + eps),  y = round(weight * round(x * rstd))
 * (round = to x_dtype, as Hugging Face's LlamaRMSNorm). */
QF_API int qf_rms_norm_forward(qf_device device, const void* x, qf_dtype x_dtype, const void* weight,
                               qf_dtype weight_dtype, int64_t rows, int64_t dim, float eps, void* y,
                               float* rstd, void* stream);

/* dx (like x) from dy (like x), x, weight and the forward's rstd; weight frozen. */
QF_API int qf_rms_norm_backward(qf_device device, const void* dy, const void* x, qf_dtype x_dtype,
                                const void* weight, qf_dtype weight_dtype, const float* rstd,
                                int64_t rows, int64_t dim, void* dx, void* stream);

/* out = round(round(silu(gate)) * up), n elements of dtype each. */
QF_API int qf_swiglu_forward(qf_device device, const void* gate, const void* up, qf_dtype dtype,
                             int64_t n, void* out, void* stream);

/* dgate = dout * up * silu'(gate), dup = dout * silu(gate); dgate may be
 * gate's buffer and dup up's (the in-place backward). */
QF_API int qf_swiglu_backward(qf_device device, const void* dout, const void* gate, const void* up,
                              qf_dtype dtype, int64_t n, void* dgate, void* dup, void* stream);

/* x, out [batch, seq, heads, head_dim] of dtype (out may be x); cos, sin
 * [cos_batch, seq, head_dim] of dtype or fp32, cos_batch 1 or batch.
 * backward = 0: out = x * cos + rotate_half(x) * sin (Hugging Face's
 * apply_rotary_pos_emb); backward = 1: its transpose, the gradient. */
QF_API int qf_rope(qf_device device, const void* x, void* out, qf_dtype dtype, int64_t batch,
                   int64_t seq, int64_t heads, int64_t head_dim, const void* cos, const void* sin,
                   qf_dtype cos_dtype, int64_t cos_batch, int backward, void* stream);

/* ------------------------------------------- chat templates (src/chat) */
/* A Jinja engine that renders Hugging Face chat templates byte-identically to
 * transformers' apply_chat_template, and tool-call parsers. Strings are UTF-8
 * (pointer + byte length). Results are qforge-owned qf_chat_buffer handles:
 * read them with qf_chat_buffer_data and release them with qf_chat_buffer_free.
 * Template errors return QF_ERR_INVALID_ARGUMENT with qf_last_error() =
 * "<Kind>: <message> (line L:C)", Kind being the jinja2/Python exception
 * (TemplateSyntaxError, TemplateError from raise_exception, UndefinedError,
 * SecurityError, TypeError, ...). */
typedef struct qf_chat_template qf_chat_template;
typedef struct qf_chat_buffer qf_chat_buffer;

/* Compile a template; *out receives a handle (free with qf_chat_template_free). */
QF_API int qf_chat_template_compile(const char* source, size_t source_len, qf_chat_template** out);
QF_API void qf_chat_template_free(qf_chat_template* tmpl);

/* The limits every later render/apply of tmpl runs under (docs/chat.md,
 * "Limits"; 0 keeps a limit as it is, negative is an error): max_steps (loop iterations, calls and
 * items walked), max_output_bytes (the output and any one string or list),
 * max_call_depth (nested macro calls and blocks), max_stack_bytes (native
 * stack of nested calls). Reaching one fails the render with a TemplateError
 * naming it. Not to be called while tmpl renders on another thread. */
QF_API int qf_chat_template_set_limits(qf_chat_template* tmpl, int64_t max_steps, int64_t max_output_bytes,
                                       int max_call_depth, int64_t max_stack_bytes);

/* apply_chat_template. request_json is one JSON object:
 *   {"messages": [...], "tools": [...]|null, "documents": [...]|null,
 *    "add_generation_prompt": bool, "continue_final_message": bool|"field",
 *    <any other key>: a template variable (bos_token, date_string, ...)}
 * now: seconds since the epoch (UTC) that strftime_now() formats, or -1 for
 * the local time now. *text receives the rendered text. When spans is not
 * NULL, the {% generation %} blocks' [start, end) offsets in code points
 * (Python string indices) are written as pairs into spans[0..2*spans_cap),
 * and *n_spans receives how many there are (may exceed spans_cap). */
QF_API int qf_chat_apply_template(const qf_chat_template* tmpl, const char* request_json, size_t request_len,
                                  int64_t now, qf_chat_buffer** text, int64_t* spans, size_t spans_cap,
                                  size_t* n_spans);

/* apply_chat_template over many conversations: shared_json is a request as
 * above whose "messages" is ignored (tools, kwargs, ... apply to all);
 * conversations_json is a JSON list of message lists (each conversation
 * parsed by the thread that renders it). threads <= 0: all cores; at most
 * 256 are used, and threads the system refuses to start are not an error
 * (the calling thread renders their share).
 * *texts receives the outputs concatenated; offsets (n + 1 entries, n =
 * number of conversations, caller-allocated) receives where each output
 * starts in it: byte offsets, or code point offsets when code_points != 0. */
QF_API int qf_chat_apply_batch(const qf_chat_template* tmpl, const char* shared_json, size_t shared_len,
                               const char* conversations_json, size_t conversations_len, int64_t now, int threads,
                               qf_chat_buffer** texts, int64_t* offsets, size_t offsets_len, int code_points);

/* Render with a JSON object of template variables, nothing added. */
QF_API int qf_chat_template_render(const qf_chat_template* tmpl, const char* context_json, size_t context_len,
                                   int64_t now, qf_chat_buffer** text);

/* Parse tool calls out of generated text. format: "auto" (told from the
 * text) or a family's name ("llama3", "hermes", "mistral", "deepseek", ...:
 * docs/chat.md lists them; qf_chat_tool_call_formats gives them all).
 * *result receives a JSON object
 *   {"content": str|null, "reasoning_content": str|null, "tool_calls":
 *    [{"type": "function", "function": {"name": str, "arguments": {...}}}],
 *    "stop": "eom"|"eot"|null, "error": str|null, "format": str}
 * Malformed calls never fail the call: the raw text becomes the content and
 * "error" says why. An unknown format is an error. */
QF_API int qf_chat_parse_tool_calls(const char* text, size_t text_len, const char* format, qf_chat_buffer** result);

/* The same, given the JSON list of tool schemas the model saw: a parameter
 * declared {"type": "string"} stays a string in formats that print values raw
 * (XML parameters, GLM, MiniMax). tools_json NULL: as qf_chat_parse_tool_calls. */
QF_API int qf_chat_parse_tool_calls_for_tools(const char* text, size_t text_len, const char* format,
                                              const char* tools_json, size_t tools_len, qf_chat_buffer** result);

/* The names of the tool-call formats, as a JSON list. */
QF_API int qf_chat_tool_call_formats(qf_chat_buffer** result);

/* The tokens that end a turn in some family (generation stops there), as a JSON list. */
QF_API int qf_chat_stop_tokens(qf_chat_buffer** result);

/* The tool-call format a chat template's model writes, told from the template
 * source ("auto" when no known family's markers are in it). */
QF_API int qf_chat_detect_tool_call_format(const char* source, size_t source_len, qf_chat_buffer** name);

/* Incremental tool-call parsing of streamed text: each feed returns (as
 * qf_chat_parse_tool_calls' JSON) the content, reasoning and calls complete
 * so far; finish returns the parse of the whole text. The streamed text may
 * be at most 8 MiB (kMaxToolCallTextBytes). tools_json: as in
 * qf_chat_parse_tool_calls_for_tools (NULL: none). */
typedef struct qf_chat_tool_stream qf_chat_tool_stream;
QF_API int qf_chat_tool_stream_new(const char* format, const char* tools_json, size_t tools_len,
                                   qf_chat_tool_stream** out);
QF_API int qf_chat_tool_stream_feed(qf_chat_tool_stream* stream, const char* chunk, size_t chunk_len,
                                    qf_chat_buffer** result);
QF_API int qf_chat_tool_stream_finish(const qf_chat_tool_stream* stream, qf_chat_buffer** result);
QF_API void qf_chat_tool_stream_free(qf_chat_tool_stream* stream);

/* json.dumps(json.loads(text), ensure_ascii, indent (<0: None; at most 64), sort_keys) with Python's exact output. */
QF_API int qf_chat_json_dumps(const char* json, size_t json_len, int ensure_ascii, int indent, int sort_keys,
                              qf_chat_buffer** result);

/* The official Llama 3.<minor> chat template (minor = 1, 2 or 3), NUL-terminated
 * static text; NULL for other versions. */
QF_API const char* qf_chat_llama3_template(int minor);

QF_API const char* qf_chat_buffer_data(const qf_chat_buffer* buf, size_t* len);
QF_API void qf_chat_buffer_free(qf_chat_buffer* buf);

/* ------------------------------------------------------ GGUF (src/gguf) */
/* GGUF v3 files as llama.cpp reads them, and ggml's reference quantizers
 * (see docs/gguf.md and include/qforge/gguf.hpp). ggml types: 0 f32, 1 f16,
 * 30 bf16, 2 q4_0, 6 q5_0, 7 q5_1, 8 q8_0, 12 q4_K, 13 q5_K, 14 q6_K.
 * Metadata value types: gguf's (0 u8 ... 12 f64; 8 string, 9 array).
 * A writer is used in order: metadata and tensor declarations, then each
 * declared tensor's data in declaration order, then qf_gguf_finish. Bytes go
 * to a temporary file beside `path` that qf_gguf_finish fsyncs and moves into
 * place; qf_gguf_writer_free without a successful finish deletes it, and so
 * does any failed write (disk full, file size limit): the destination is
 * complete or absent. An existing `path` is refused unless overwrite != 0. */
typedef struct qf_gguf_writer qf_gguf_writer;

QF_API int qf_gguf_writer_open(const char* path, int overwrite, qf_gguf_writer** out);
QF_API void qf_gguf_writer_free(qf_gguf_writer* writer);
/* key: NUL-terminated UTF-8. value: one element of value_type (a number or bool).
 * "general.alignment" (u32, a power of two) sets the data alignment (default 32). */
QF_API int qf_gguf_add_scalar(qf_gguf_writer* writer, const char* key, uint32_t value_type, const void* value);
QF_API int qf_gguf_add_string(qf_gguf_writer* writer, const char* key, const char* value, size_t len);
QF_API int qf_gguf_add_array(qf_gguf_writer* writer, const char* key, uint32_t elem_type, const void* data,
                             int64_t n);
/* n strings: string i is data[offsets[i] .. offsets[i+1]) (offsets has n + 1 entries). */
QF_API int qf_gguf_add_string_array(qf_gguf_writer* writer, const char* key, const char* data,
                                    const int64_t* offsets, int64_t n);
/* ne: n_dims sizes in ggml order (ne[0] = row length). */
QF_API int qf_gguf_add_tensor(qf_gguf_writer* writer, const char* name, const int64_t* ne, int32_t n_dims,
                              uint32_t ggml_type);
/* The next tensor's numel elements (fp32/fp16/bf16, row-major, host memory),
 * encoded as its declared type on `threads` threads (<= 0: all cores). */
QF_API int qf_gguf_write_tensor(qf_gguf_writer* writer, const void* src, qf_dtype src_dtype, int64_t numel,
                                int threads);
/* The next tensor's already encoded bytes. */
QF_API int qf_gguf_write_tensor_bytes(qf_gguf_writer* writer, const void* data, int64_t bytes);
QF_API int qf_gguf_finish(qf_gguf_writer* writer);

/* Bytes of one row of ncols elements of ggml_type (ncols a multiple of its block). */
QF_API int qf_gguf_row_bytes(uint32_t ggml_type, int64_t ncols, int64_t* bytes);
/* ggml's quantize_row_<type>_ref over nrows rows of ncols floats, byte for byte. */
QF_API int qf_gguf_quantize(uint32_t ggml_type, const float* x, int64_t nrows, int64_t ncols, void* out,
                            int64_t out_bytes, int threads);
/* llama-quantize's per-tensor types for a mix (1 f16, 2 bf16, 3 q8_0, 4 q4_0,
 * 5 q4_K_M, 6 q5_K_M, 7 q6_K) over n tensors in file order: names as
 * concatenated UTF-8 with n + 1 offsets, n_dims and row length ne0 each;
 * n_layer blocks; is_70b: llama.cpp's 70B model type. out_types: n ggml types. */
QF_API int qf_gguf_mix_types(uint32_t mix, const char* names, const int64_t* name_offsets, const int32_t* n_dims,
                             const int64_t* ne0, int64_t n, int32_t n_layer, int32_t is_70b, uint32_t* out_types);
/* convert_hf_to_gguf.py --mmproj's per-tensor types of a vision encoder +
 * projector file for mix 1 f16, 2 bf16 or 3 q8_0 (gguf::mmproj_types); the
 * other arguments as qf_gguf_mix_types. */
QF_API int qf_gguf_mmproj_types(uint32_t mix, const char* names, const int64_t* name_offsets, const int32_t* n_dims,
                                const int64_t* ne0, int64_t n, uint32_t* out_types);

#ifdef __cplusplus
}
#endif

#endif /* QFORGE_QFORGE_H */
