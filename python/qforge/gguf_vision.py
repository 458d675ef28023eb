"""The vision half of a GGUF export: the ``mmproj`` file that llama.cpp's mtmd
(llama-mtmd-cli, llama-server, LM Studio, Ollama) loads beside the language
model GGUF: the frozen vision encoder and projector of a vision-language base,
with the ``clip.*`` keys and tensor names that ``convert_hf_to_gguf.py
--mmproj`` writes. See docs/gguf.md.

One family: Idefics3 / SmolVLM (a SigLIP-style ViT, pixel-shuffle + linear
projector, a Llama language model; mtmd's projector type ``idefics3``). The
vision weights are never adapted (qforge.load keeps them frozen 16-bit), so
they are written from the base checkpoint as they are; the C++ writer
(src/gguf) converts them to the file's types and writes the file complete or
absent.
"""
from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import _lib
from ._files import read_json

__all__ = ["plan_mmproj", "write_mmproj", "mmproj_type", "MmprojPlan"]

# mmproj output type -> (qf_gguf_mmproj_types mix id, LlamaFileType for general.file_type)
_MMPROJ_TYPES = {"f16": (1, 1), "bf16": (2, 32), "q8_0": (3, 7)}
# Idefics3's HF names -> llama.cpp's (gguf-py's TensorNameMap for MODEL_ARCH.MMPROJ)
_IDEFICS3_GLOBAL = {
    "model.connector.modality_projection.proj": "mm.model.fc",
    "model.vision_model.embeddings.patch_embedding": "v.patch_embd",
    "model.vision_model.embeddings.position_embedding": "v.position_embd",
    "model.vision_model.post_layernorm": "v.post_ln",
}
_IDEFICS3_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2", "mlp.fc1": "ffn_up",
    "mlp.fc2": "ffn_down",
}
# convert_hf_to_gguf's SmolVLMModel: SmolVLM2's vision config omits these (transformers' defaults)
_SMOLVLM_VISION_DEFAULTS = {"hidden_size": 1152, "num_attention_heads": 16, "intermediate_size": 3072}

_mmproj_types = _lib.declare("qf_gguf_mmproj_types", ctypes.c_uint32, ctypes.c_char_p,
                             ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int32),
                             ctypes.POINTER(ctypes.c_int64), ctypes.c_int64, ctypes.POINTER(ctypes.c_uint32))


def mmproj_type(text_type: str) -> str:
    """The mmproj file's type for an export of `text_type`: the converter's --outtype when it is one
    (f16, bf16, q8_0); f16 for the 4-6 bit mixes, which llama-quantize never applies to an mmproj."""
    return text_type if text_type in _MMPROJ_TYPES else "f16"


def _mmproj_name(hf_name: str, where: Path) -> str:
    """The mmproj tensor name of an Idefics3 vision/projector weight; an unknown one is an error."""
    module, _, leaf = hf_name.rpartition(".")
    m = re.fullmatch(r"model\.vision_model\.encoder\.layers\.(\d+)\.(.+)", module)
    short = _IDEFICS3_LAYER.get(m.group(2)) if m else _IDEFICS3_GLOBAL.get(module)
    if short is None or leaf not in ("weight", "bias"):
        raise ValueError(f"{where}: vision tensor '{hf_name}' is not one qforge's mmproj export knows "
                         "(Idefics3 / SmolVLM vision tower and connector)")
    return f"v.blk.{m.group(1)}.{short}.{leaf}" if m else f"{short}.{leaf}"


def _preprocessor_config(base: Path) -> dict:
    """preprocessor_config.json merged with processor_config.json's image_processor, as the converter reads them."""
    cfg: dict = {}
    for name, section in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = base / name
        if path.is_file():
            doc = read_json(path, "the image processor's configuration")
            if not isinstance(doc, dict):
                raise ValueError(f"{path}: expected a JSON object")
            cfg.update(doc)
            if section and isinstance(doc.get(section), dict):
                cfg.update(doc[section])
    for key in ("image_mean", "image_std"):
        if not isinstance(cfg.get(key), list) or len(cfg[key]) != 3:
            raise ValueError(f"{base}: missing the image processor's {key} (three numbers) in "
                             "preprocessor_config.json / processor_config.json; the mmproj file needs it")
    return cfg


def _metadata(ckpt, file_type: int, total_params: int) -> list:
    """The mmproj keys in convert_hf_to_gguf's order (MmprojModel + SmolVLMModel.set_gguf_parameters),
    recorded with gguf-py's own GGUFWriter."""
    import gguf

    from .gguf import recorded_metadata

    raw, base = ckpt.raw_config, ckpt.path
    vision = dict(raw.get("vision_config") or {})
    if vision.get("model_type") == "smolvlm_vision":
        vision = {**_SMOLVLM_VISION_DEFAULTS, **vision}
    try:
        image_size, patch_size = int(vision["image_size"]), int(vision["patch_size"])
        width, ffn = int(vision["hidden_size"]), int(vision["intermediate_size"])
        blocks, heads = int(vision["num_hidden_layers"]), int(vision["num_attention_heads"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{base / 'config.json'}: vision_config lacks a valid {e}") from None
    pre = _preprocessor_config(base)

    rec = gguf.GGUFWriter(None, "clip")
    rec.add_type(gguf.GGUFType.MMPROJ)
    meta = gguf.Metadata.load(None, base, None, total_params)
    if meta.name is None:
        meta.name = base.name
    if meta.size_label is None and total_params > 0:
        meta.size_label = gguf.size_label(total_params, 0, 0, 0)
    meta.set_gguf_meta_model(rec)
    rec.add_file_type(file_type)
    rec.add_clip_has_vision_encoder(True)
    rec.add_vision_projection_dim(int(ckpt.config["hidden_size"]))
    rec.add_vision_image_size(image_size)
    rec.add_vision_patch_size(patch_size)
    rec.add_vision_embedding_length(width)
    rec.add_vision_feed_forward_length(ffn)
    rec.add_vision_block_count(blocks)
    rec.add_vision_head_count(heads)
    rec.add_vision_image_mean(pre["image_mean"])
    rec.add_vision_image_std(pre["image_std"])
    rec.add_clip_projector_type(gguf.VisionProjectorType.IDEFICS3)
    rec.add_vision_attention_layernorm_eps(vision.get("layer_norm_eps", 1e-5))
    rec.add_vision_projector_scale_factor(raw.get("scale_factor", 2))
    rec.add_vision_use_gelu(True)
    rec.add_vision_preproc_image_size((pre.get("size") or {}).get("longest_edge", image_size))
    rec.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return recorded_metadata(rec)


@dataclass
class MmprojPlan:
    """What write_mmproj writes: checked before the language model file is written."""
    ckpt: object
    qtype: str
    tensors: list  # (mmproj name, HF name, HF shape, ggml type) in the converter's order
    metadata: list


def plan_mmproj(ckpt, text_type: str, mmproj_type_name: Optional[str] = None) -> MmprojPlan:
    """Names, types and metadata of the mmproj file of `ckpt` (gguf.CheckpointReader of a vision-language
    base), in mmproj_type(text_type) unless mmproj_type_name is given. Raises ValueError naming the
    problem (not a vision-language model, a 4-bit base, an unknown vision tensor, missing config)."""
    import torch

    from .gguf import pack_strings

    qtype = mmproj_type_name or mmproj_type(text_type)
    if qtype not in _MMPROJ_TYPES:
        raise ValueError(f"unknown mmproj type {qtype!r}; choose one of {', '.join(_MMPROJ_TYPES)}")
    if not ckpt.vision_prefixes:
        raise ValueError(f"{ckpt.path}: {ckpt.raw_config['model_type']} is not a vision-language model qforge "
                         "exports a vision projector for (idefics3)")
    if ckpt.bnb:
        raise ValueError(f"{ckpt.path}: a bitsandbytes 4-bit checkpoint; the mmproj export reads the vision "
                         "tower from the 16-bit base model")
    plan = [(_mmproj_name(hf, ckpt.path / "config.json"), hf, ckpt.shape(hf)) for hf in ckpt.names()
            if ckpt.is_vision(hf)]
    if not plan:
        raise ValueError(f"{ckpt.path}: no vision tower tensors ({', '.join(ckpt.vision_prefixes)}) in the checkpoint")
    mix, file_type = _MMPROJ_TYPES[qtype]
    data, offsets = pack_strings([n.encode() for n, _, _ in plan])
    n_dims = (ctypes.c_int32 * len(plan))(*[len(s) for _, _, s in plan])
    ne0 = (ctypes.c_int64 * len(plan))(*[s[-1] for _, _, s in plan])
    ggml_types = (ctypes.c_uint32 * len(plan))()
    _lib.check(_mmproj_types(mix, data, offsets, n_dims, ne0, len(plan), ggml_types))
    total_params = sum(int(torch.Size(s).numel()) for _, _, s in plan)
    tensors = [(n, hf, s, int(t)) for (n, hf, s), t in zip(plan, ggml_types)]
    return MmprojPlan(ckpt, qtype, tensors, _metadata(ckpt, file_type, total_params))


def write_mmproj(plan: MmprojPlan, out: Path, overwrite: bool = False, threads: int = 0,
                 progress: bool = True) -> Path:
    """Write the planned mmproj GGUF at `out`, complete or absent (the C++ writer); returns out."""
    from .gguf import GGUFWriter, progress_bar

    bar = progress_bar(len(plan.tensors), f"export {out.name} (mmproj {plan.qtype})", progress)
    writer = GGUFWriter(out, overwrite)
    try:
        for key, value, vtype, sub in plan.metadata:
            writer.add(key, value, vtype, sub)
        for name, _, shape, ggml_type in plan.tensors:
            writer.add_tensor(name, shape, ggml_type)
        for name, hf, _, _ in plan.tensors:
            writer.write(plan.ckpt.get(hf), threads)
            bar(name)
        writer.finish()
    finally:
        writer.close()
        bar(None)
    return out
