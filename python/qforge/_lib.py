"""The one loader of libqforge (ctypes over the C ABI in include/qforge/qforge.h).

Every C entry returns a status; `check` turns a failure into a Python
exception carrying the core's message (ValueError for bad input, RuntimeError
for everything else). Other modules declare the signatures they use with
`declare` and call `lib.qf_*` directly.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

QF_OK, QF_ERR_INVALID_ARGUMENT, QF_ERR_RUNTIME, QF_ERR_OUT_OF_MEMORY = 0, 1, 2, 3
QF_FLOAT32, QF_FLOAT16, QF_BFLOAT16, QF_UINT8, QF_INT64, QF_INT32, QF_FLOAT64 = range(7)
QF_CPU, QF_CUDA = 0, 1


class QforgeError(RuntimeError):
    """A failure inside the C++ core that is not the caller's input."""


def _find_library() -> Path:
    override = os.environ.get("QFORGE_LIBRARY")
    if override:
        path = Path(override)
        if not path.is_file():
            raise ImportError(f"QFORGE_LIBRARY={override} does not name a file")
        return path
    here = Path(__file__).resolve().parent / "lib"
    for name in ("libqforge.so", "libqforge.dylib", "qforge.dll"):
        if (here / name).is_file():
            return here / name
    raise ImportError(
        f"libqforge not found in {here}; install the package with `pip install .` "
        "or point QFORGE_LIBRARY at a built libqforge.so"
    )


LIBRARY_PATH = _find_library()
lib = ctypes.CDLL(str(LIBRARY_PATH))
lib.qf_last_error.restype = ctypes.c_char_p
lib.qf_version.restype = ctypes.c_char_p


def declare(name: str, *argtypes, restype=ctypes.c_int):
    """Set the ctypes signature of lib.<name> and return the function."""
    fn = getattr(lib, name)
    fn.argtypes = list(argtypes)
    fn.restype = restype
    return fn


def check(status: int) -> None:
    """Raise the exception matching a C ABI status, with the core's message."""
    if status == QF_OK:
        return
    message = (lib.qf_last_error() or b"").decode("utf-8", "replace") or f"status {status}"
    if status == QF_ERR_INVALID_ARGUMENT:
        raise ValueError(message)
    if status == QF_ERR_OUT_OF_MEMORY:
        raise MemoryError(message)
    raise QforgeError(message)


declare("qf_built_with_cuda")
declare("qf_cuda_device_count")


def version() -> str:
    return lib.qf_version().decode()


def built_with_cuda() -> bool:
    return bool(lib.qf_built_with_cuda())
