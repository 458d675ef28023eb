"""Loading Llama-family causal LMs with NF4 linear layers.

``load(dir)`` builds transformers' own model class on the meta device, then
streams the checkpoint tensor by tensor: each projection weight of a 16-bit
checkpoint is quantized by qforge's quantizer as soon as it is read (the 16-bit
model never exists in memory at once); a bitsandbytes "bnb-4bit" checkpoint is
read directly. ``save_4bit`` writes that layout.
"""
from .loader import SUPPORTED_MODEL_TYPES, default_device, load, load_tokenizer, save_4bit

__all__ = ["load", "load_tokenizer", "save_4bit", "SUPPORTED_MODEL_TYPES", "default_device"]
