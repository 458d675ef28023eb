"""qforge: fast, memory-lean QLoRA fine-tuning; a C++/CUDA core with a thin PyTorch layer."""
from ._lib import version as _core_version

__version__ = _core_version()
