"""What every bench writes beside its figures, in the same form: ``device``
(the machine the figures came from) and ``versions`` (of everything they
depend on). A results-writing bench puts ``**environment(packages)`` into its
result.

    from _record import environment   # bench/ is sys.path[0] when a bench runs
    result = dict(..., **environment(["transformers", "bitsandbytes"]))
"""
from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_INSTALLED = "not installed"
SUBPROCESS_TIMEOUT_S = 30  # git / nvidia-smi answer in well under a second


def _run(cmd: list[str]) -> str | None:
    """A command's stdout, or None when it is missing, fails or hangs."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device() -> dict:
    """The CPU (model, cores, load when the bench ran) and, when torch sees
    one, the GPU (name, SMs, memory, driver)."""
    out = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)}
    try:
        import torch
    except ImportError:
        return out
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = f"{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB"
        out["gpu_count"] = torch.cuda.device_count()
        out["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"])
    return out


def package_version(name: str) -> str:
    """The version the bench ran with: an imported module's __version__ (a
    package on PYTHONPATH shadows the installed one), else the installed
    distribution's (import or distribution name, read without importing it),
    else the module's once imported, else NOT_INSTALLED."""
    module = sys.modules.get(name)
    if module is not None and hasattr(module, "__version__"):
        return str(module.__version__)
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
    try:
        return str(getattr(__import__(name), "__version__"))
    except (ImportError, AttributeError):
        return NOT_INSTALLED


def versions(packages=()) -> dict:
    """Python, qforge (version and git commit), torch with its CUDA, and each of `packages`."""
    out = {"python": platform.python_version(), "qforge": package_version("qforge"),
           "qforge_git": _run(["git", "rev-parse", "--short", "HEAD"]), "torch": package_version("torch")}
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except ImportError:
        pass
    out.update({name: package_version(name) for name in packages})
    return out


def environment(packages=()) -> dict:
    """``device``, ``versions`` and ``date`` (UTC) for a bench's result."""
    return {"device": device(), "versions": versions(packages),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
