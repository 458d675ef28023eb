"""The C++ API links: a CMake project (tests/consumer) that does
find_package(qforge) against an installed qforge, links qforge::qforge, calls
the C++ chat engine, the C++ NF4 core and layer kernels and the C ABI, builds
and runs.

qforge is configured CPU-only in a temporary build directory (the library the
other tests load may be a wheel build, which installs no CMake package),
installed into a temporary prefix, and the consumer is built against it.
"""

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_S = 1800  # a cold CPU-only build of the library on two cores takes minutes


def _run(cmd, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_installed_package_links_cpp_and_c_api(tmp_path):
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed to build qforge (pip install cmake)"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    jobs = str(os.cpu_count() or 2)
    prefix = tmp_path / "prefix"
    _run([cmake, "-S", ROOT, "-B", tmp_path / "qforge", *generator, "-DQFORGE_CUDA=OFF",
          "-DQFORGE_BUILD_TESTS=OFF", "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_INSTALL_PREFIX={prefix}"])
    _run([cmake, "--build", tmp_path / "qforge", "-j", jobs])
    _run([cmake, "--install", tmp_path / "qforge"])

    _run([cmake, "-S", ROOT / "tests" / "consumer", "-B", tmp_path / "consumer", *generator,
          f"-DCMAKE_PREFIX_PATH={prefix}", "-DCMAKE_BUILD_TYPE=Release"])
    _run([cmake, "--build", tmp_path / "consumer", "-j", jobs])
    out = _run([tmp_path / "consumer" / "consumer"])
    assert "chat: <user>HI" in out
    assert "qf_nf4_packed_bytes(7): 4" in out
    assert "TemplateError caught: 1" in out
    assert "nf4 round trip: 1" in out
    assert "layer swiglu: 1" in out
