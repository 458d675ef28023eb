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


def convert_hf_to_gguf(model_dir: Path, outfile: Path, outtype: str, tokenizer_pre: str | None = None) -> Path:
    """Run llama.cpp's own converter (with its own gguf-py) on a Hugging Face
    directory. The converter names the BPE pre-tokenizer by hashing a test
    string's tokens against a table of published models, which a tokenizer
    trained by the tests is not in: `tokenizer_pre` then pins the name."""
    src = llama_cpp_source()
    runner = (
        "import sys, runpy\n"
        f"sys.path.insert(0, {str(src)!r})\n"
        f"sys.path.insert(1, {str(src / 'gguf-py')!r})\n"
        "from conversion.base import TextModel\n"
        + (f"TextModel.get_vocab_base_pre = lambda self, tokenizer: {tokenizer_pre!r}\n" if tokenizer_pre else "")
        + f"sys.argv = ['convert_hf_to_gguf.py', '--outtype', {outtype!r}, '--outfile', {str(outfile)!r}, "
        f"{str(model_dir)!r}]\n"
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
