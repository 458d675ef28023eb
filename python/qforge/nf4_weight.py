"""``NF4Weight``: a frozen NF4 weight as one tensor, in the style of torchao's
``NF4Tensor``. To autograd, ``nn.Module`` and FSDP2 it is a ``(out, in)`` tensor
of the dtype the weight was quantized from (so ``nn.Parameter`` and FSDP2 treat
it as a floating-point parameter on every torch version); its storage is only
the 4-bit codes and their statistics, in bitsandbytes' layout:

  * ``packed``: uint8 ``[ceil(out*in/2)]``, two codes per byte;
  * ``absmax``: uint8 per block of ``blocksize`` weights (8-bit codes when
    double-quantized, else the 4 raw bytes of each fp32 absmax);
  * replicated constants: ``quant_map`` (16 fp32) and, when double-quantized,
    ``nested_absmax`` (fp32, one per ``nested_blocksize`` blocks of the whole
    weight), ``nested_quant_map`` (256 fp32), ``nested_offset`` (1 fp32).

FSDP2 shards it along dim 0 (rows): each rank keeps the codes and absmax codes
of its rows, as uint8; the constants stay whole on every rank (1/16384 of the
weight or less). ``fsdp_pre_all_gather`` hands FSDP2 the two uint8 tensors and
``fsdp_post_all_gather`` rebuilds the whole weight from the gathered bytes, so
only codes and statistics cross the wire and ``MixedPrecisionPolicy`` never
casts them (there is no 16-bit storage to cast). Sharding needs rows that split
evenly over the ranks and row boundaries on block boundaries (``in`` a multiple
of ``blocksize``): every Llama-family projection qualifies; anything else is
refused with an error naming the shape.

No arithmetic is defined on it: ``dequantize()`` gives a dense tensor and
``qforge.nn.NF4Linear`` multiplies without ever keeping one. The supported
aten ops are those that move, slice, view, copy and compare storage
(what ``nn.Module.to``, ``state_dict``, DTensor and FSDP2 use); any other op
raises ``NotImplementedError`` naming it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["NF4Weight"]

aten = torch.ops.aten
_CONSTANTS = ("quant_map", "nested_absmax", "nested_quant_map", "nested_offset")
_OPS: dict = {}


def _implements(*ops):
    def register(fn):
        for op in ops:
            _OPS[op] = fn
        return fn
    return register


class NF4Weight(Tensor):
    packed: Tensor
    absmax: Tensor
    quant_map: Tensor
    nested_absmax: Optional[Tensor]
    nested_quant_map: Optional[Tensor]
    nested_offset: Optional[Tensor]

    @staticmethod
    def __new__(cls, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset,
                shape, dtype, blocksize, nested_blocksize):
        return Tensor._make_wrapper_subclass(cls, torch.Size(shape), dtype=dtype, device=packed.device,
                                             requires_grad=False)

    def __init__(self, packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset,
                 shape, dtype, blocksize, nested_blocksize):
        n = math.prod(shape)
        if packed.dtype != torch.uint8 or absmax.dtype != torch.uint8:
            raise ValueError(f"NF4Weight: packed codes and absmax must be uint8, got {packed.dtype}, {absmax.dtype}")
        if packed.dim() != 1 or packed.numel() != (n + 1) // 2:
            raise ValueError(f"NF4Weight: {tuple(packed.shape)} packed bytes for shape {tuple(shape)}, "
                             f"expected [{(n + 1) // 2}]")
        blocks = -(-n // blocksize)
        per_block = 1 if nested_absmax is not None else 4
        if absmax.dim() != 1 or absmax.numel() != blocks * per_block:
            raise ValueError(f"NF4Weight: absmax holds {absmax.numel()} bytes for {blocks} blocks of "
                             f"{blocksize}, expected {blocks * per_block}")
        self.packed, self.absmax, self.quant_map = packed, absmax, quant_map
        self.nested_absmax, self.nested_quant_map, self.nested_offset = nested_absmax, nested_quant_map, nested_offset
        self.blocksize, self.nested_blocksize = int(blocksize), int(nested_blocksize)

    # ------------------------------------------------------------ views
    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def constants(self) -> tuple:
        return tuple(getattr(self, k) for k in _CONSTANTS)

    def storage_args(self):
        """(packed, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, meta)
        for the dequantize kernel; meta = (blocksize, nested_blocksize, shape, float absmax)."""
        meta = (self.blocksize, self.nested_blocksize, tuple(self.shape), not self.double_quant)
        return (self.packed, self.absmax) + self.constants() + (meta,)

    def _rewrap(self, packed, absmax, shape=None, constants=None, dtype=None) -> "NF4Weight":
        return NF4Weight(packed, absmax, *(constants if constants is not None else self.constants()),
                         self.shape if shape is None else shape, dtype or self.dtype, self.blocksize,
                         self.nested_blocksize)

    def __repr__(self, *, tensor_contents=None):
        return (f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant})")

    # ------------------------------------------------------------ torch.compile / DTensor
    def __tensor_flatten__(self):
        names = ["packed", "absmax"] + [k for k in _CONSTANTS if getattr(self, k) is not None]
        return names, (tuple(self.shape), self.dtype, self.blocksize, self.nested_blocksize)

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        shape, dtype, blocksize, nested_blocksize = ctx
        return NF4Weight(inner["packed"], inner["absmax"], *(inner.get(k) for k in _CONSTANTS),
                         outer_size if outer_size is not None else shape, dtype, blocksize, nested_blocksize)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        fn = _OPS.get(func)
        if fn is None:
            raise NotImplementedError(f"NF4Weight does not support {func} (it stores 4-bit codes; use "
                                      "dequantize() for a dense tensor)")
        return fn(func, args, kwargs or {})

    # ------------------------------------------------------------ FSDP2 extension
    def fsdp_pre_all_gather(self, mesh, outer_size=None, outer_stride=None, module=None, mp_policy=None):
        """The bytes FSDP2 all-gathers: this rank's codes and absmax codes (uint8,
        never cast by the mixed-precision policy); the constants travel as metadata."""
        shape = tuple(outer_size) if outer_size is not None else None
        return (self.packed, self.absmax), (self.constants(), self.blocksize, self.nested_blocksize, self.dtype,
                                            shape)

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        packed, absmax = outputs
        constants, blocksize, nested_blocksize, dtype, shape = metadata
        if out is not None:  # later all-gathers: FSDP2 refills the buffers of the first one in place
            for mine, gathered in ((out.packed, packed), (out.absmax, absmax)):
                if mine.data_ptr() != gathered.data_ptr():
                    mine.copy_(gathered)
            return None
        if shape is None:  # FSDP2's one-argument hook: the gathered rows, whole
            raise RuntimeError("NF4Weight: FSDP2 did not pass the unsharded shape to fsdp_pre_all_gather")
        return NF4Weight(packed, absmax, *constants, shape, dtype, blocksize, nested_blocksize), (packed, absmax)

    # ------------------------------------------------------------ dense
    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """A new dense tensor of this weight (``dtype`` default: its own)."""
        from .nn import dequantize_weight

        return dequantize_weight(*self.storage_args(), dtype or self.dtype, False)


# ---------------------------------------------------------------- row ranges
def _byte_ranges(w: NF4Weight, start: int, stop: int) -> tuple[slice, slice]:
    """The packed-code and absmax byte ranges of logical dim-0 entries [start, stop)."""
    row = math.prod(w.shape[1:]) if w.dim() > 1 else 1
    first, last = start * row, stop * row
    n = w.numel()
    for e in (first, last):
        if e != n and e % w.blocksize:
            raise ValueError(f"NF4Weight {tuple(w.shape)}: rows [{start}, {stop}) do not start and end on "
                             f"blocks of {w.blocksize} weights; a sharded NF4 weight needs in_features "
                             f"divisible by the blocksize")
    per_block = 1 if w.double_quant else 4
    return (slice(first // 2, (last + 1) // 2),
            slice(first // w.blocksize * per_block, -(-last // w.blocksize) * per_block))


def _rows(w: NF4Weight, start: int, stop: int) -> NF4Weight:
    codes, blocks = _byte_ranges(w, start, stop)
    return w._rewrap(w.packed[codes], w.absmax[blocks], (stop - start,) + tuple(w.shape[1:]))


@_implements(aten.split.Tensor)
def _split(func, args, kwargs):
    w, size = args[0], args[1]
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
    if dim % max(1, w.dim()) != 0:
        raise ValueError(f"NF4Weight: only dim 0 (rows) can be split, got dim {dim}")
    rows = w.shape[0]
    if rows % size:
        raise ValueError(f"NF4Weight {tuple(w.shape)}: {rows} rows do not split evenly into parts of {size}; "
                         "FSDP2 sharding of an NF4 weight needs out_features divisible by the world size")
    return [_rows(w, s, s + size) for s in range(0, rows, size)]


@_implements(aten.slice.Tensor)
def _slice(func, args, kwargs):
    w = args[0]
    dim, start, end, step = (list(args[1:]) + [0, None, None, 1][len(args) - 1:])[:4]
    dim, start, end, step = kwargs.get("dim", dim), kwargs.get("start", start), kwargs.get("end", end), \
        kwargs.get("step", step)
    if dim % max(1, w.dim()) != 0 or step != 1:
        raise ValueError(f"NF4Weight: only contiguous row slices (dim 0, step 1), got dim {dim} step {step}")
    rows = w.shape[0]
    start, end = max(0, min(start or 0, rows)), rows if end is None else max(0, min(end, rows))
    return _rows(w, start, max(start, end))


@_implements(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(func, args, kwargs):
    w, size = args[0], list(args[1])
    if -1 in size:
        known = math.prod(s for s in size if s != -1)
        size[size.index(-1)] = w.numel() // max(1, known)
    if math.prod(size) != w.numel():
        raise ValueError(f"NF4Weight: cannot view {tuple(w.shape)} as {tuple(size)}")
    return w._rewrap(w.packed, w.absmax, tuple(size))


@_implements(aten.as_strided.default)
def _as_strided(func, args, kwargs):
    w, size, stride = args[0], tuple(args[1]), tuple(args[2])
    offset = args[3] if len(args) > 3 else kwargs.get("storage_offset", 0)
    contiguous = tuple(torch.empty(size, device="meta").stride())
    if offset or stride != contiguous or math.prod(size) != w.numel():
        raise ValueError(f"NF4Weight: only a contiguous view of the whole weight, got size {size} stride {stride}")
    return w._rewrap(w.packed, w.absmax, size)


@_implements(aten.detach.default, aten.alias.default)
def _alias(func, args, kwargs):
    w = args[0]
    return w._rewrap(w.packed, w.absmax)


@_implements(aten.clone.default)
def _clone(func, args, kwargs):
    w = args[0]
    return w._rewrap(w.packed.clone(), w.absmax.clone(),
                     constants=tuple(None if c is None else c.clone() for c in w.constants()))


def _moved(w: NF4Weight, fn) -> NF4Weight:
    return w._rewrap(fn(w.packed), fn(w.absmax), constants=tuple(None if c is None else fn(c) for c in w.constants()))


@_implements(aten._to_copy.default)
def _to_copy(func, args, kwargs):
    """Moves the storage; a new float dtype only relabels the weight (codes are never converted)."""
    w = args[0]
    dtype = kwargs.get("dtype") or w.dtype
    if not dtype.is_floating_point:
        raise ValueError(f"NF4Weight: cannot convert a 4-bit weight to {dtype}")
    device, non_blocking = kwargs.get("device") or w.device, kwargs.get("non_blocking", False)
    pin = kwargs.get("pin_memory", False)
    moved = _moved(w, lambda t: t.to(device, non_blocking=non_blocking).pin_memory() if pin
                   else t.to(device, non_blocking=non_blocking))
    return moved._rewrap(moved.packed, moved.absmax, dtype=dtype)


@_implements(aten._pin_memory.default)
def _pin(func, args, kwargs):
    return _moved(args[0], lambda t: t.pin_memory())


@_implements(aten.is_pinned.default)
def _is_pinned(func, args, kwargs):
    return args[0].packed.is_pinned()


def _empty_like_storage(w: NF4Weight, size, device, fill) -> NF4Weight:
    n = math.prod(size)
    per_block = 1 if w.double_quant else 4
    u8 = dict(dtype=torch.uint8, device=device or w.device)
    packed, absmax = fill(((n + 1) // 2,), **u8), fill((-(-n // w.blocksize) * per_block,), **u8)
    constants = tuple(None if c is None else c.to(device or w.device, copy=True) for c in w.constants())
    return w._rewrap(packed, absmax, tuple(size), constants)


@_implements(aten.new_zeros.default)
def _new_zeros(func, args, kwargs):
    return _empty_like_storage(args[0], args[1], kwargs.get("device"), torch.zeros)


@_implements(aten.new_empty.default)
def _new_empty(func, args, kwargs):
    return _empty_like_storage(args[0], args[1], kwargs.get("device"), torch.empty)


@_implements(aten.empty_like.default)
def _empty_like(func, args, kwargs):
    return _empty_like_storage(args[0], args[0].shape, kwargs.get("device"), torch.empty)


@_implements(aten.copy_.default)
def _copy(func, args, kwargs):
    dst, src = args[0], args[1]
    if not isinstance(src, NF4Weight) or src.shape != dst.shape or src.double_quant != dst.double_quant \
            or src.blocksize != dst.blocksize:
        raise ValueError(f"NF4Weight: copy_ needs an NF4 weight of the same shape and quantization "
                         f"into {tuple(dst.shape)}, got {type(src).__name__} {tuple(src.shape)}")
    dst.packed.copy_(src.packed)
    dst.absmax.copy_(src.absmax)
    for d, s in zip(dst.constants(), src.constants()):
        if d is not None and d.data_ptr() != s.data_ptr():
            d.copy_(s)
    return dst


@_implements(aten.equal.default)
def _equal(func, args, kwargs):
    a, b = args[0], args[1]
    if not isinstance(a, NF4Weight) or not isinstance(b, NF4Weight):
        return False
    same = a.shape == b.shape and a.blocksize == b.blocksize and a.double_quant == b.double_quant
    return same and all(torch.equal(x, y) for x, y in zip((a.packed, a.absmax) + a.constants(),
                                                           (b.packed, b.absmax) + b.constants())
                        if x is not None)
