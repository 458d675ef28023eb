"""llama.cpp itself as the oracle of the GGUF tests, from the llama-cpp-python
source distribution on PyPI (its vendor/llama.cpp holds convert_hf_to_gguf.py,
gguf-py and ggml-quants.c).

Everything is cached outside the clone, keyed by version, under
$QFORGE_TEST_CACHE (default ~/.cache/qforge-test)/llama.cpp-<version>/:
  llama.cpp/                the unpacked vendor/llama.cpp (pip download, once)
  libggml_quants_ref.so     ggml-quants.c compiled alone (a few seconds)
so a fresh CI machine pays for the download and compile once.
Run `python tests/python/gguf_oracle.py` to prepare the cache ahead of the tests.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"

GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q4_K": 12, "q5_K": 13, "q6_K": 14,
              "bf16": 30}
# (elements, bytes) per block
BLOCKS = {"q4_0": (32, 18), "q5_0": (32, 22), "q5_1": (32, 24), "q8_0": (32, 34), "q4_K": (256, 144),
          "q5_K": (256, 176), "q6_K": (256, 210)}

# ggml-quants.c needs four symbols of ggml.c that the reference quantizers never call
_STUBS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>
void ggml_abort(const char * file, int line, const char * fmt, ...) { fprintf(stderr, "ggml_abort %s:%d\n", file, line); abort(); }
size_t ggml_row_size(int type, long long ne) { (void)type; (void)ne; abort(); }
const char * ggml_type_name(int type) { (void)type; return "?"; }
size_t ggml_type_size(int type) { (void)type; abort(); }
"""


def cache_dir() -> Path:
    root = Path(os.environ.get("QFORGE_TEST_CACHE", Path.home() / ".cache" / "qforge-test"))
    return root / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def llama_cpp_source() -> Path:
    """vendor/llama.cpp of the pinned llama-cpp-python sdist (downloaded and unpacked when missing)."""
    dest = cache_dir() / "llama.cpp"
    if (dest / "convert_hf_to_gguf.py").exists():
        return dest
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp],
                       check=True, stdout=subprocess.DEVNULL)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            tar.extractall(tmp, members=members, filter="data")
        shutil.move(str(Path(tmp) / prefix), str(dest))
    return dest


@lru_cache(maxsize=None)
def reference_quantizers() -> ctypes.CDLL:
    """ggml-quants.c as a shared library, built as ggml-base builds it (-O3, no -march)."""
    lib_path = cache_dir() / "libggml_quants_ref.so"
    if not lib_path.exists():
        ggml = llama_cpp_source() / "ggml"
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            stubs = Path(tmp) / "stubs.c"
            stubs.write_text(_STUBS)
            out = Path(tmp) / lib_path.name
            cc = os.environ.get("CC", "cc")
            subprocess.run([cc, "-O3", "-DNDEBUG", "-std=gnu11", "-fPIC", "-shared", f"-I{ggml}/include",
                            f"-I{ggml}/src", f"-I{ggml}/src/ggml-cpu", str(ggml / "src" / "ggml-quants.c"),
                            str(stubs), "-o", str(out), "-lm"], check=True)
            shutil.move(str(out), str(lib_path))
    lib = ctypes.CDLL(str(lib_path))
    for name in BLOCKS:
        fn = getattr(lib, f"quantize_row_{name}_ref")
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = None
    return lib


def reference_quantize(type_name: str, x) -> bytes:
    """ggml's quantize_row_<type>_ref over a float32 numpy array (any shape; rows of whole blocks)."""
    import numpy as np

    x = np.ascontiguousarray(x, dtype=np.float32)
    block, nbytes = BLOCKS[type_name]
    assert x.size % block == 0
    out = np.zeros(x.size // block * nbytes, dtype=np.uint8)
    getattr(reference_quantizers(), f"quantize_row_{type_name}_ref")(x.ctypes.data, out.ctypes.data, x.size)
    return out.tobytes()


def convert_hf_to_gguf(model_dir: Path, outfile: Path, outtype: str, tokenizer_pre: str | None = None,
                       mmproj: bool = False) -> Path:
    """Run llama.cpp's own converter (with its own gguf-py) on a Hugging Face
    directory. The converter names the BPE pre-tokenizer by hashing a test
    string's tokens against a table of published models, which a tokenizer
    trained by the tests is not in: `tokenizer_pre` then pins the name.
    mmproj: write the vision encoder + projector file instead (--mmproj)."""
    src = llama_cpp_source()
    extra = ", '--mmproj'" if mmproj else ""
    runner = (
        "import sys, runpy\n"
        f"sys.path.insert(0, {str(src)!r})\n"
        f"sys.path.insert(1, {str(src / 'gguf-py')!r})\n"
        "from conversion.base import TextModel\n"
        + (f"TextModel.get_vocab_base_pre = lambda self, tokenizer: {tokenizer_pre!r}\n" if tokenizer_pre else "")
        + f"sys.argv = ['convert_hf_to_gguf.py', '--outtype', {outtype!r}, '--outfile', {str(outfile)!r}, "
        f"{str(model_dir)!r}{extra}]\n"
        f"runpy.run_path({str(src / 'convert_hf_to_gguf.py')!r}, run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", runner], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{proc.stderr[-4000:]}")
    return outfile


def llama_cpp_python():
    """The llama_cpp Python package built from the pinned sdist (llama.cpp's CPU
    backend, portable flags, no tools) into the cache; about 10 minutes on 2
    cores the first time."""
    target = cache_dir() / "python"
    if not (target / "llama_cpp" / "__init__.py").exists():
        sdist = cache_dir() / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
        if not sdist.exists():
            with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
                subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                                f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp],
                               check=True, stdout=subprocess.DEVNULL)
                shutil.move(str(next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))), str(sdist))
        staging = cache_dir() / "python.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2"),
                   CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF "
                              "-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(staging), str(sdist)],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    import llama_cpp

    return llama_cpp


def libmtmd() -> Path:
    """libmtmd.so (llama.cpp's multimodal library, tools/mtmd) compiled from the
    cached vendor/llama.cpp against the llama_cpp package's libllama/libggml
    (the package is built without tools), cached beside them; a few minutes on
    2 cores the first time."""
    import re
    from concurrent.futures import ThreadPoolExecutor

    lib_dir = llama_cpp_python().__file__
    lib_dir = Path(lib_dir).parent / "lib"
    lib_path = lib_dir / "libmtmd.so"
    if lib_path.exists():
        return lib_path
    src = llama_cpp_source()
    mtmd = src / "tools" / "mtmd"
    block = re.search(r"add_library\(mtmd\s(.*?)\)", (mtmd / "CMakeLists.txt").read_text(), re.S).group(1)
    sources = [mtmd / f for f in block.split() if f.endswith(".cpp")]
    sources += [src / "vendor" / "hash" / f for f in ("hash.cpp", "xxhash/xxhash.c", "sha1/sha1.c",
                                                       "sha256/sha256.c")]
    cxx, cc = os.environ.get("CXX", "c++"), os.environ.get("CC", "cc")
    includes = [f"-I{d}" for d in (mtmd, src / "include", src / "ggml" / "include", src / "vendor",
                                   src / "vendor" / "hash")]
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        def compile_one(i_source):
            i, source = i_source
            obj = Path(tmp) / f"{i}.o"
            is_c = source.suffix == ".c" and source.name != "sha1.c"  # sha1.c is built as C++ (its namespace)
            cmd = ([cc, "-std=gnu11"] if is_c else [cxx, "-std=c++17"] + (["-x", "c++"] if source.suffix == ".c"
                                                                           else []))
            subprocess.run(cmd + ["-O2", "-DNDEBUG", "-fPIC", "-w", "-DLLAMA_SHARED", "-DLLAMA_BUILD", *includes,
                                  "-c", str(source), "-o", str(obj)], check=True)
            return obj

        jobs = int(os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2"))
        with ThreadPoolExecutor(jobs) as pool:
            objects = list(pool.map(compile_one, enumerate(sources)))
        out = Path(tmp) / lib_path.name
        subprocess.run([cxx, "-shared", "-o", str(out), *map(str, objects), f"-L{lib_dir}", "-lllama", "-lggml",
                        "-lggml-base", "-Wl,-rpath,$ORIGIN", "-lpthread"], check=True)
        shutil.move(str(out), str(lib_path))
    return lib_path


def mtmd_run(text_gguf: Path, mmproj: Path, image, prompt: str = "an image: <__media__> end",
             n_generate: int = 0):
    """llama.cpp's mtmd (libmtmd through llama_cpp.mtmd_cpp): load the language model and the
    mmproj file, tokenize `prompt` (its media marker replaced by one RGB image, uint8 H x W x 3,
    as mtmd lays it out for the model), encode each image chunk, and optionally generate
    n_generate tokens greedily after the whole prompt. Returns (chunks, generated): chunks a list
    of ("text", token ids) and ("image", n_tokens x n_embd float32 embeddings) in prompt order."""
    import numpy as np

    llama_cpp = llama_cpp_python()
    libmtmd()  # llama_cpp.mtmd_cpp loads it from the package's lib directory on import
    from llama_cpp import llama_cpp as api
    from llama_cpp import mtmd_cpp as mtmd

    llm = llama_cpp.Llama(model_path=str(text_gguf), n_ctx=256, n_batch=256, verbose=False, n_threads=1)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.print_timings, params.n_threads, params.warmup = False, False, 1, False
    ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llm.model, params)
    if not ctx:
        llm.close()
        raise RuntimeError(f"mtmd could not load {mmproj} with {text_gguf}")
    pixels = np.ascontiguousarray(image, dtype=np.uint8)
    bitmap = mtmd.mtmd_bitmap_init(pixels.shape[1], pixels.shape[0],
                                   (ctypes.c_uint8 * pixels.size).from_buffer(pixels))
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        text = prompt.replace("<__media__>", mtmd.mtmd_default_marker().decode()).encode()
        prompt_in = mtmd.mtmd_input_text()
        prompt_in.text, prompt_in.text_len, prompt_in.add_special, prompt_in.parse_special = text, len(text), False, True
        rc = mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(prompt_in), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
        if rc != 0:
            raise RuntimeError(f"mtmd_tokenize failed ({rc})")
        n_embd = llm.n_embd()
        out = []
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ids = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                out.append(("text", [ids[j] for j in range(n.value)]))
                continue
            if mtmd.mtmd_encode_chunk(ctx, chunk) != 0:
                raise RuntimeError("mtmd_encode_chunk failed")
            n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            embd = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n * n_embd,))
            out.append(("image", embd.reshape(n, n_embd).copy()))
        generated = []
        missing = [kind for kind, ids in out if kind == "text" and min(ids, default=0) < 0]
        if n_generate and missing:  # mtmd frames images with tokens the vocabulary lacks: decoding would abort
            raise RuntimeError(f"mtmd's prompt has tokens the vocabulary lacks: {out}")
        if n_generate:
            lctx, n_past = llm._ctx.ctx, api.llama_pos(0)
            if mtmd.mtmd_helper_eval_chunks(ctx, lctx, chunks, 0, 0, 256, True, ctypes.byref(n_past)) != 0:
                raise RuntimeError("mtmd_helper_eval_chunks failed")
            n_vocab = llm.n_vocab()
            for _ in range(n_generate):
                logits = np.ctypeslib.as_array(api.llama_get_logits_ith(lctx, -1), shape=(n_vocab,))
                token = int(np.argmax(logits))
                generated.append(token)
                if api.llama_decode(lctx, api.llama_batch_get_one((api.llama_token * 1)(token), 1)) != 0:
                    raise RuntimeError("llama_decode failed")
        return out, generated
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(ctx)
        llm.close()


def gguf_reader_module():
    """The sdist's gguf-py (the reader matching the converter's version)."""
    src = str(llama_cpp_source() / "gguf-py")
    if src not in sys.path:
        sys.path.insert(0, src)
    import gguf

    return gguf


if __name__ == "__main__":
    print(llama_cpp_source())
    print(reference_quantizers()._name)
    if "--llama-cpp-python" in sys.argv:
        print(llama_cpp_python().__file__)
    if "--mtmd" in sys.argv:
        print(libmtmd())
