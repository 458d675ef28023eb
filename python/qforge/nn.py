"""QLoRA modules: a frozen NF4 linear layer (bitsandbytes' storage layout) with an
optional LoRA adapter, as a drop-in for ``torch.nn.Linear`` inside transformers'
model classes.

Storage (what FSDP2 and torch.compile see): ``weight`` is one frozen
``qforge.nf4_weight.NF4Weight`` Parameter, an ``(out, in)`` tensor of the
original dtype whose storage is the packed 4-bit codes and their statistics as
uint8 (bitsandbytes' layout) plus a few fp32 constants. Packed bits are never
held in a float tensor; FSDP2 shards the uint8 codes per decoder layer through
the tensor's ``fsdp_pre_all_gather`` / ``fsdp_post_all_gather`` hooks, and
``MixedPrecisionPolicy`` never casts them.

Compute: the dequantized weight never outlives one use. Forward dequantizes into
a reused per-(device, dtype) workspace, multiplies, and drops it; backward
dequantizes again for ``grad_input = grad_output @ W``. Under torch.compile the
same code calls the registered op ``torch.ops.qforge.dequantize_nf4`` (with a fake
kernel), so a decoder layer traces with ``fullgraph=True``. The LoRA path is plain
torch matmuls (a fused C++ LoRA kernel would go behind the same interface).
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import nf4
from .ops import nf4 as nf4_ops
from .nf4_weight import NF4Weight

__all__ = ["NF4Linear", "LoraConfig", "DEFAULT_TARGETS", "add_lora", "attach_lora", "finish_lora", "lora_parameters",
           "replace_linears", "dequantized_weight", "workspace_bytes", "dequantize_stacked"]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------ workspace
class _Workspace:
    """One flat buffer per (device, dtype), grown to the largest weight seen and
    reused by every NF4 layer for its dequantized weight."""

    def __init__(self):
        self.buffers: dict[tuple, Tensor] = {}

    def get(self, shape, dtype: torch.dtype, device: torch.device) -> Tensor:
        n = math.prod(shape)
        key = (device, dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < n:
            self.buffers.pop(key, None)  # release the smaller one first
            buf = torch.empty(n, dtype=dtype, device=device)
            self.buffers[key] = buf
        return buf[:n].view(shape)

    def clear(self) -> None:
        self.buffers.clear()


WORKSPACE = _Workspace()


def workspace_bytes() -> int:
    """Bytes held by the shared dequantization workspaces."""
    return sum(b.numel() * b.element_size() for b in WORKSPACE.buffers.values())


def dequantize_weight(packed, absmax, code, nested_absmax, nested_code, nested_offset, meta, dtype, use_workspace,
                      out: Optional[Tensor] = None):
    """The weight in `dtype`: into `out` when given, else into the shared workspace
    (use_workspace) or a new tensor."""
    blocksize, nested_blocksize, shape, float_absmax = meta
    if float_absmax:
        absmax = absmax.view(torch.float32)
    if out is not None and (tuple(out.shape) != tuple(shape) or out.dtype != dtype):
        raise ValueError(f"dequantize: out is {tuple(out.shape)} {out.dtype}, the weight {tuple(shape)} {dtype}")
    return nf4_ops.dequantize(packed, absmax, code, blocksize, nested_absmax, nested_code, nested_offset,
                              nested_blocksize, shape, dtype, out=out, workspace=WORKSPACE if use_workspace else None)


def dequantize_stacked(weights: list, rows: int, dtype: torch.dtype) -> Tensor:
    """NF4 weights of equal in_features dequantized one below the other into the shared workspace,
    as one [rows, in_features] matrix (rows >= their rows together; the rows after theirs are left
    for the caller to fill). Valid until the next dequantization into the workspace."""
    in_features = weights[0].shape[1]
    stacked = sum(w.shape[0] for w in weights)
    if any(w.shape[1] != in_features for w in weights) or rows < stacked:
        raise ValueError(f"dequantize_stacked: weights {[tuple(w.shape) for w in weights]} do not stack "
                         f"into {rows} rows")
    out = WORKSPACE.get((rows, in_features), dtype, weights[0].device)
    start = 0
    for w in weights:
        dequantize_weight(*w.storage_args(), dtype, False, out=out[start:start + w.shape[0]])
        start += w.shape[0]
    return out


class _NF4Matmul(torch.autograd.Function):
    """x @ dequant(W).T with W frozen: forward and backward each dequantize into
    the workspace; nothing but the packed storage is saved for backward."""

    @staticmethod
    def forward(ctx, x, packed, absmax, code, nested_absmax, nested_code, nested_offset, meta):
        w = dequantize_weight(packed, absmax, code, nested_absmax, nested_code, nested_offset, meta, x.dtype, True)
        storage = (packed, absmax, code, nested_absmax, nested_code, nested_offset)
        if torch.compiler.is_compiling():
            ctx.save_for_backward(*storage)
            ctx.storage = None
        else:
            # Held by reference, not saved: saved-tensor hooks (activation offloading with
            # save_on_cpu) would otherwise copy the frozen 4-bit weights to the host every step.
            ctx.storage = storage
        ctx.meta = meta
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        storage = ctx.storage if ctx.storage is not None else ctx.saved_tensors
        packed, absmax, code, nested_absmax, nested_code, nested_offset = storage
        w = dequantize_weight(packed, absmax, code, nested_absmax, nested_code, nested_offset, ctx.meta, grad.dtype, True)
        return (grad @ w,) + (None,) * 7


def _compute_dtype(x: Tensor, default: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.dtype.is_floating_point else default


# ------------------------------------------------------------------ the layer
class NF4Linear(nn.Module):
    """A frozen NF4 weight (+ optional frozen bias) with an optional LoRA adapter:
    ``y = x @ W.T + b + scaling * B(A(dropout(x)))``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, blocksize: int = 64,
                 nested: bool = True, nested_blocksize: int = 256, dtype: torch.dtype = torch.bfloat16,
                 device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.nested_blocksize = blocksize, nested_blocksize
        self.dtype = dtype  # the dtype the weight was quantized from (QuantState.dtype)
        n = in_features * out_features
        blocks = -(-n // blocksize)
        u8, f32 = dict(dtype=torch.uint8, device=device), dict(dtype=torch.float32, device=device)
        nested_stats = (torch.zeros(-(-blocks // nested_blocksize), **f32), torch.zeros(256, **f32),
                        torch.zeros(1, **f32)) if nested else (None, None, None)
        self.weight = nn.Parameter(NF4Weight(torch.zeros((n + 1) // 2, **u8),
                                             torch.zeros(blocks * (1 if nested else 4), **u8),
                                             torch.zeros(16, **f32), *nested_stats, (out_features, in_features),
                                             dtype, blocksize, nested_blocksize), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.r = 0
        self.lora_A = self.lora_B = None
        self.lora_dropout = None
        self.scaling = 0.0

    # ---------------------------------------------------------- construction
    @classmethod
    def from_quantized(cls, packed: Tensor, state, bias: Optional[Tensor] = None) -> "NF4Linear":
        """From bitsandbytes-layout storage (a qforge or bitsandbytes QuantState)."""
        shape = tuple(state.shape)
        if len(shape) != 2:
            raise ValueError(f"NF4 linear weight must be 2-D, got shape {shape}")
        out_f, in_f = shape
        nested = state.state2 is not None
        m = cls(in_f, out_f, bias=bias is not None, blocksize=state.blocksize, nested=nested,
                nested_blocksize=state.state2.blocksize if nested else 256, dtype=state.dtype, device="meta")
        dev = packed.device
        absmax = state.absmax.contiguous()
        f32 = lambda t: t.to(dev, torch.float32).contiguous()  # noqa: E731
        stats = (f32(state.state2.absmax), f32(state.state2.code), f32(state.offset).reshape(1)) if nested \
            else (None, None, None)
        m.weight = nn.Parameter(NF4Weight(nf4.codes_as_uint8(packed).reshape(-1).contiguous(),
                                          absmax.reshape(-1) if nested else absmax.float().reshape(-1).view(torch.uint8),
                                          f32(state.code), *stats, shape, state.dtype, state.blocksize,
                                          m.nested_blocksize), requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().to(dev), requires_grad=False)
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, compress_statistics: bool = True,
                    device=None) -> "NF4Linear":
        """Quantize a float ``nn.Linear`` (on ``device``, default its own) with qforge's quantizer."""
        return cls.from_weight(linear.weight, linear.bias, blocksize, compress_statistics, device)

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Optional[Tensor] = None, blocksize: int = 64,
                    compress_statistics: bool = True, device=None, dtype: Optional[torch.dtype] = None) -> "NF4Linear":
        w = weight.detach()
        if device is not None:
            w = w.to(device)
        if dtype is not None:
            w = w.to(dtype)
        packed, state = nf4.quantize(w.contiguous(), blocksize=blocksize, compress_statistics=compress_statistics)
        b = None if bias is None else bias.detach().to(w.device, w.dtype)
        return cls.from_quantized(packed, state, b)

    # ---------------------------------------------------------- views
    @property
    def float_absmax(self) -> bool:
        """Whether the absmax is stored as fp32 (not double-quantized)."""
        return not self.weight.double_quant

    def quant_state(self) -> nf4.QuantState:
        """The weight's QuantState (bitsandbytes' fields), sharing this module's tensors."""
        w = self.weight
        state = nf4.QuantState(
            absmax=w.absmax if w.double_quant else w.absmax.view(torch.float32),
            shape=(self.out_features, self.in_features), dtype=self.dtype, blocksize=self.blocksize,
            code=w.quant_map)
        if w.double_quant:
            state.offset = w.nested_offset.reshape(())
            state.state2 = nf4.NestedState(absmax=w.nested_absmax, code=w.nested_quant_map,
                                           blocksize=self.nested_blocksize)
        return state

    def packed_codes(self) -> Tensor:
        """The packed 4-bit codes as bitsandbytes stores them: uint8 ``(ceil(out*in/2), 1)``."""
        return self.weight.packed.reshape(-1, 1)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """A new tensor holding the dequantized weight (for merging and tests)."""
        return self.weight.dequantize(dtype or self.dtype)

    # ---------------------------------------------------------- LoRA
    def add_lora(self, r: int, lora_alpha: Optional[float] = None, lora_dropout: float = 0.0,
                 use_rslora: bool = False, dtype: torch.dtype = torch.float32, init: str = "default",
                 generator: Optional[torch.Generator] = None, *, alpha: Optional[float] = None,
                 dropout: Optional[float] = None) -> None:
        """Attach a LoRA adapter as PEFT initialises it: A kaiming-uniform(a=sqrt(5)), B zero.
        ``alpha`` and ``dropout`` are deprecated names of ``lora_alpha`` and ``lora_dropout``."""
        lora_alpha, lora_dropout = _peft_names("NF4Linear.add_lora", lora_alpha, lora_dropout, alpha, dropout, (None, 0.0))
        if lora_alpha is None:
            raise TypeError("NF4Linear.add_lora: lora_alpha is required")
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        dev = self.weight.device
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=dtype)
        with torch.no_grad():
            if generator is None:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            else:  # same distribution, drawn from `generator` (reproducible model building)
                bound = 1.0 / math.sqrt(self.in_features)
                a = torch.rand(self.lora_A.weight.shape, generator=generator, dtype=torch.float32)
                self.lora_A.weight.copy_((a * 2 - 1) * bound)
            nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

    def lora_delta(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """scaling * B @ A, the weight update the adapter represents."""
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return delta.to(dtype or self.dtype)

    # ---------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        cd = _compute_dtype(x, self.dtype)
        h = x.to(cd)
        out = _NF4Matmul.apply(h, *self.weight.storage_args()) if not self.weight.is_meta else None
        if out is None:
            raise RuntimeError("NF4Linear: weights are on the meta device (not loaded)")
        if self.bias is not None:
            out = out + self.bias.to(cd)
        if self.lora_A is not None:
            a_dtype = self.lora_A.weight.dtype
            lx = self.lora_dropout(x if torch.is_autocast_enabled(x.device.type) else x.to(a_dtype))
            out = out + (self.lora_B(self.lora_A(lx)) * self.scaling).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
             f"nf4 blocksize={self.blocksize}, double_quant={not self.float_absmax}")
        return s + (f", lora r={self.r} scaling={self.scaling:g}" if self.r else "")


# ------------------------------------------------------------------ model-level helpers
def dequantized_weight(module: nn.Module, dtype: Optional[torch.dtype] = None) -> Tensor:
    if isinstance(module, NF4Linear):
        return module.dequantize(dtype)
    return module.weight.detach().to(dtype or module.weight.dtype)


def is_target_module(name: str, targets: Iterable[str]) -> bool:
    """Whether the module `name` is one of `targets`, matched as PEFT's target_modules match:
    the whole name, or its last part(s)."""
    leaf = name.rsplit(".", 1)[-1]
    return any(leaf == t or name == t or name.endswith("." + t) for t in targets)


def replace_linears(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS, blocksize: int = 64,
                    compress_statistics: bool = True, device=None, dtype: Optional[torch.dtype] = None) -> list[str]:
    """Quantize every ``nn.Linear`` whose name ends in one of ``targets`` to an
    ``NF4Linear`` in place, one layer at a time (each float weight is freed as soon
    as its replacement exists). Returns the replaced module names."""
    targets = tuple(targets)
    done = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and is_target_module(name, targets):
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            q = NF4Linear.from_weight(module.weight, module.bias, blocksize, compress_statistics, device, dtype)
            setattr(parent, leaf, q)
            done.append(name)
    return done


class LoraConfig(dict):
    """The adapter's settings, kept on the model as ``model.qforge_lora``."""


def _peft_names(where: str, lora_alpha, lora_dropout, alpha, dropout, defaults: tuple):
    """(lora_alpha, lora_dropout), PEFT's names, from either them or the deprecated
    ``alpha`` / ``dropout`` (which warn; both spellings with different values are an
    error). ``defaults``: the signature's (lora_alpha, lora_dropout)."""
    resolved = []
    for old, new, old_value, new_value, default in (("alpha", "lora_alpha", alpha, lora_alpha, defaults[0]),
                                                    ("dropout", "lora_dropout", dropout, lora_dropout, defaults[1])):
        if old_value is None:
            resolved.append(new_value)
            continue
        warnings.warn(f"{where}: `{old}` is deprecated, pass `{new}` (PEFT's name)", FutureWarning, stacklevel=3)
        if new_value is not None and new_value != default and new_value != old_value:
            raise TypeError(f"{where}: got both {new}={new_value!r} and its deprecated name {old}={old_value!r}")
        resolved.append(old_value)
    return tuple(resolved)


def add_lora(model: nn.Module, r: int = 16, lora_alpha: float = 16.0, lora_dropout: float = 0.0,
             target_modules: Iterable[str] = DEFAULT_TARGETS, use_rslora: bool = False,
             lora_dtype: torch.dtype = torch.float32, seed: Optional[int] = None,
             generator: Optional[torch.Generator] = None, *,
             alpha: Optional[float] = None, dropout: Optional[float] = None) -> nn.Module:
    """Attach LoRA adapters to the NF4 layers named by ``target_modules`` (PEFT's
    matching: a module whose name ends in a target); freezes every other
    parameter. Returns the model. Raises ValueError when nothing matches.
    ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules`` and ``use_rslora`` mean
    what they mean in ``peft.LoraConfig``; ``alpha`` and ``dropout`` are deprecated
    names of ``lora_alpha`` and ``lora_dropout``. ``generator`` (instead of
    ``seed``) draws the A matrices from a generator the caller keeps: adding LoRA
    layer by layer with one generator gives the same weights as adding it to the
    whole model at once."""
    lora_alpha, lora_dropout = _peft_names("add_lora", lora_alpha, lora_dropout, alpha, dropout, (16.0, 0.0))
    gen = generator if generator is not None else torch.Generator().manual_seed(seed) if seed is not None else None
    attach_lora(model, r, lora_alpha, lora_dropout, target_modules, use_rslora, lora_dtype, gen)
    return finish_lora(model, r, lora_alpha, lora_dropout, use_rslora)


def attach_lora(model: nn.Module, r: int = 16, lora_alpha: float = 16.0, lora_dropout: float = 0.0,
                target_modules: Iterable[str] = DEFAULT_TARGETS, use_rslora: bool = False,
                lora_dtype: torch.dtype = torch.float32, generator: Optional[torch.Generator] = None) -> nn.Module:
    """The module-by-module half of ``add_lora``: adapters on the NF4 layers named by
    ``target_modules``, nothing else touched (a sharded start attaches them layer by layer,
    then calls ``finish_lora`` once on the model). ValueError when nothing matches."""
    targets = list(target_modules)
    hit, plain = [], []
    frozen = tuple(getattr(model, "qforge_frozen_prefixes", ()))  # a vision tower stays frozen
    for name, module in model.named_modules():
        if not is_target_module(name, targets) or f"{name}.".startswith(frozen):
            continue
        if isinstance(module, NF4Linear):
            module.add_lora(r, lora_alpha, lora_dropout, use_rslora, lora_dtype, generator=generator)
            hit.append(name)
        elif isinstance(module, nn.Linear):
            plain.append(name)
    if plain:
        raise ValueError(f"add_lora: {len(plain)} target modules are not NF4 layers (e.g. {plain[0]!r}); "
                         "load the model with qforge.load(..., load_in_4bit=True) first")
    if not hit:
        raise ValueError(f"add_lora: no module matches target_modules {targets}")
    return model


def finish_lora(model: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                use_rslora: bool = False) -> nn.Module:
    """The model-wide half of ``add_lora`` for adapters already attached (e.g.
    layer by layer while loading): only LoRA weights train, no KV cache in
    training forwards, ``model.qforge_lora`` describes the adapter."""
    hit = [n for n, m in model.named_modules() if isinstance(m, NF4Linear) and m.lora_A is not None]
    if not hit:
        raise ValueError("finish_lora: the model has no LoRA adapter")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    # DistributedDataParallel broadcasts every parameter at start by concatenating them;
    # the NF4 weights are frozen and loaded alike on every rank, so it skips them
    model._ddp_params_and_buffers_to_ignore = sorted(
        n for n, p in model.named_parameters() if isinstance(p, NF4Weight))
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", None):
        # Training forwards must not build a KV cache: with one, transformers ignores
        # position_ids restarts and packed sequences would attend to each other.
        # generate() still caches (it follows generation_config.use_cache).
        config.use_cache = False
    found = sorted({n.rsplit(".", 1)[-1] for n in hit})
    # PEFT adapts every module whose name ends in a listed bare name: where a module of the same
    # name stays without LoRA (a frozen vision tower's q_proj), list the adapted modules' full
    # names instead, so PEFT loads the adapter onto exactly the modules that were trained
    hit_names = set(hit)
    if any(n.rsplit(".", 1)[-1] in found and n not in hit_names and isinstance(m, (nn.Linear, NF4Linear))
           for n, m in model.named_modules()):
        found = sorted(hit)
    model.qforge_lora = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=found,
                                   use_rslora=use_rslora)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter weights under the model's own module names (``...q_proj.lora_A.weight``)."""
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
