"""qforge: fast, memory-lean QLoRA fine-tuning; a C++/CUDA core with a thin PyTorch layer."""
from ._lib import version as _core_version

__version__ = _core_version()

# The QLoRA front end, imported on first use (transformers is only needed then).
_LAZY = {
    "load": ("qforge.models", "load"),
    "load_tokenizer": ("qforge.models", "load_tokenizer"),
    "save_4bit": ("qforge.models", "save_4bit"),
    "add_lora": ("qforge.nn", "add_lora"),
    "save_adapter": ("qforge.peft_io", "save_adapter"),
    "load_adapter": ("qforge.peft_io", "load_adapter"),
    "merge_and_save": ("qforge.peft_io", "merge_and_save"),
    "export_gguf": ("qforge.gguf", "export_gguf"),
    "linear_cross_entropy": ("qforge.loss", "linear_cross_entropy"),
    "LinearCrossEntropyLoss": ("qforge.loss", "LinearCrossEntropyLoss"),
    "chunked_linear": ("qforge.loss", "chunked_linear"),
    "ChunkedLinearLoss": ("qforge.loss", "ChunkedLinearLoss"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'qforge' has no attribute {name!r}")
