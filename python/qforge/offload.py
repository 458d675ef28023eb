"""Long-context memory for training: each decoder layer's checkpoint kept in host memory, and
the token-wise modules (MLP, RMSNorms) computed in sequence tiles.

    from qforge import offload
    offload.enable(model)                          # checkpoints in pinned host memory, tiles
    offload.enable(model, offload=False)           # plain per-layer checkpointing, tiles
    offload.disable(model)

Gradient checkpointing keeps one tensor per decoder layer alive between forward and backward:
the layer's input hidden states (tokens x hidden). At 131,072 tokens of a Llama-3.1-8B that is
1 GiB a layer, 32 GiB in all, more than everything else on the GPU together. ``enable`` installs
a checkpoint function on every transformers ``GradientCheckpointingLayer`` that

* in forward, runs the layer without building its graph and copies its input to pinned host
  memory on a side stream (the copy overlaps the next layers' compute; at most
  ``MAX_INFLIGHT_COPIES`` layer inputs wait on the GPU for their copy, so GPU memory stays
  bounded whatever the layer count);
* in backward, waits for the layer's input to be back on the GPU, prefetches the previous
  layer's input on the side stream (so it arrives while this layer recomputes), recomputes the
  layer with the forward's autocast and RNG state, and backpropagates through it.

On the CPU the same code runs with real copies into separate host buffers (no streams), so the
mechanism is exercised by the CPU tests. Gradients and losses equal plain checkpointing's.

The tiling (``tile_tokens``): a Llama MLP at T tokens makes several T x intermediate tensors
(gate, up, their product, the LoRA branches), 3.5 GiB each at 131,072 tokens, and an RMSNorm
keeps fp32 copies of its T x hidden input for backward (2 GiB each at that length). Both work
token by token, so ``enable`` makes each decoder layer's MLP and every RMSNorm (the layers' and
the final one) run over tiles of at most ``tile_tokens`` tokens when the input has more than
that: forward keeps only the module's input, backward recomputes and backpropagates one tile at
a time. Nothing of size T x intermediate, and no fp32 T x hidden copy, outlives a tile.

Both mechanisms accumulate the LoRA gradients into ``.grad`` from inside backward (as reentrant
checkpointing does); they suit optimizers that read ``.grad`` after ``backward()``.
"""
from __future__ import annotations

import collections
import types
from typing import Optional

import torch
from torch import Tensor, nn

from .distributed import decoder_layers

__all__ = ["enable", "disable", "HostOffloader", "tiled_forward", "DEFAULT_TILE_TOKENS",
           "MAX_INFLIGHT_COPIES"]

# Tokens per tile: at Llama-3.1-8B's 14336 intermediate, one bf16 MLP tile tensor is 224 MiB,
# and the tile's GEMMs (8192 x 4096 x 14336) still run at full speed.
DEFAULT_TILE_TOKENS = 8192
# Layer inputs whose device-to-host copy may still be pending (each holds its GPU memory until
# its copy is done): two, so one copy runs while the next layer computes ("double-buffered").
MAX_INFLIGHT_COPIES = 2

# A zero-size leaf that requires grad, passed to the autograd Functions below so that their
# output requires grad even when no tensor input does (layer 0's input comes from a frozen
# embedding); its gradient is always None.
_GRAD_ANCHOR = torch.empty(0, requires_grad=True)


class _Saved:
    """One layer input: on the host after forward, back on the device during backward."""

    __slots__ = ("host", "device_copy", "ready", "prev", "shape", "dtype", "device")

    def __init__(self, t: Tensor, prev: Optional["_Saved"]):
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device
        self.host: Optional[Tensor] = None
        self.device_copy: Optional[Tensor] = None
        self.ready = None  # CUDA event: device_copy is complete
        self.prev = prev


class HostOffloader:
    """Moves tensors to host memory and back, in the order a layer stack needs them.

    ``save(t)`` starts copying ``t`` to the host and returns a handle; ``load(handle)`` returns
    the tensor on its device again (waiting for it) and starts bringing back the handle saved
    just before it, which backward needs next. Each handle is loaded at most once."""

    def __init__(self, max_inflight: int = MAX_INFLIGHT_COPIES):
        if max_inflight < 1:
            raise ValueError(f"HostOffloader: max_inflight must be >= 1, got {max_inflight}")
        self.max_inflight = max_inflight
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._pending: collections.deque = collections.deque()  # events of unfinished copies to host
        self._last: Optional[_Saved] = None
        self.bytes_to_host = 0  # counters, for tests and benchmarks
        self.bytes_to_device = 0

    def _stream(self, device: torch.device):
        s = self._streams.get(device)
        if s is None:
            s = self._streams[device] = torch.cuda.Stream(device)
        return s

    def save(self, t: Tensor) -> _Saved:
        entry = _Saved(t, self._last)
        self._last = entry
        self.bytes_to_host += t.numel() * t.element_size()
        if t.device.type != "cuda":
            entry.host = torch.empty(t.shape, dtype=t.dtype, device="cpu")
            entry.host.copy_(t)
            return entry
        main, side = torch.cuda.current_stream(t.device), self._stream(t.device)
        while len(self._pending) >= self.max_inflight:  # bound the inputs waiting for their copy
            main.wait_event(self._pending.popleft())
        entry.host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        side.wait_stream(main)  # t is complete
        with torch.cuda.stream(side):
            entry.host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        t.record_stream(side)  # the allocator keeps t's memory until the copy has read it
        self._pending.append(done)
        return entry

    def _fetch(self, entry: _Saved) -> None:
        if entry.device_copy is not None or entry.host is None:
            return
        self.bytes_to_device += entry.host.numel() * entry.host.element_size()
        if entry.device.type != "cuda":
            entry.device_copy = entry.host.to(entry.device, copy=True)
            entry.host = None
            return
        main, side = torch.cuda.current_stream(entry.device), self._stream(entry.device)
        out = torch.empty(entry.shape, dtype=entry.dtype, device=entry.device)
        side.wait_stream(main)  # out's memory is free on the main stream's timeline
        with torch.cuda.stream(side):
            out.copy_(entry.host, non_blocking=True)
            entry.ready = torch.cuda.Event()
            entry.ready.record(side)
        out.record_stream(side)
        entry.device_copy = out
        entry.host = None  # the pinned block returns to torch's host cache once the copy is done

    def prefetch(self, entry: _Saved) -> None:
        """Start bringing ``entry`` back to its device now (its ``load`` then waits less)."""
        self._fetch(entry)

    def load(self, entry: _Saved) -> Tensor:
        if entry.device_copy is None and entry.host is None:
            raise RuntimeError("HostOffloader: this tensor was already loaded (a checkpointed layer's "
                               "backward ran twice; use retain_graph=False checkpointing only once)")
        self._fetch(entry)
        out, entry.device_copy = entry.device_copy, None
        if entry.ready is not None:
            torch.cuda.current_stream(entry.device).wait_event(entry.ready)
            entry.ready = None
        prev, entry.prev = entry.prev, None
        if prev is not None:
            self._fetch(prev)  # arrives while this layer recomputes
        return out


def _autocast_state(device_type: str):
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast(device_type: str, dtype):
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else \
        torch.autocast(device_type, enabled=False)


def _save_rng(device: torch.device):
    """The RNG states a recompute must replay (dropout masks): the CPU's and the device's."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


class _replayed_rng:
    """Context: the RNG states of ``_save_rng`` restored, the caller's states back afterwards."""

    def __init__(self, state, device: torch.device):
        self.state, self.device = state, device
        self.fork = torch.random.fork_rng(devices=[device] if state[1] is not None else [],
                                          device_type=device.type)

    def __enter__(self):
        self.fork.__enter__()
        torch.set_rng_state(self.state[0])
        if self.state[1] is not None:
            torch.cuda.set_rng_state(self.state[1], self.device)

    def __exit__(self, *exc):
        return self.fork.__exit__(*exc)


class _OffloadedLayer(torch.autograd.Function):
    """One checkpointed layer: forward without a graph, input to the host; backward recomputes."""

    @staticmethod
    def forward(ctx, run, offloader, hidden, anchor, *args):
        ctx.run, ctx.offloader = run, offloader
        dev = hidden.device
        ctx.device_type = dev.type
        ctx.autocast = _autocast_state(dev.type)
        ctx.rng = _save_rng(dev)
        tensor_idx = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
        ctx.args = list(args)
        for i in tensor_idx:
            ctx.args[i] = None
        ctx.tensor_idx = tensor_idx
        ctx.save_for_backward(*[args[i] for i in tensor_idx])
        out = run(hidden, *args)
        ctx.saved = offloader.save(hidden)
        ctx.tuple_out = isinstance(out, tuple)
        return out

    @staticmethod
    def backward(ctx, *grads):
        hidden = ctx.offloader.load(ctx.saved)
        ctx.saved = None
        args = list(ctx.args)
        extra = ctx.saved_tensors
        for i, t in zip(ctx.tensor_idx, extra):
            args[i] = t.detach().requires_grad_(t.requires_grad)
        hidden = hidden.detach().requires_grad_(ctx.needs_input_grad[2])
        with _replayed_rng(ctx.rng, hidden.device), torch.enable_grad(), \
                _autocast(ctx.device_type, ctx.autocast):
            out = ctx.run(hidden, *args)
        outs = out if ctx.tuple_out else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads)
                 if isinstance(o, Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        arg_grads = [None] * len(args)
        for i in ctx.tensor_idx:
            arg_grads[i] = args[i].grad if args[i].requires_grad else None
        ctx.run = None
        return (None, None, hidden.grad if ctx.needs_input_grad[2] else None, None, *arg_grads)


def _checkpoint_function(offloader: HostOffloader):
    """The ``_gradient_checkpointing_func`` transformers calls as ``func(run, hidden, *args)``."""

    def checkpoint(run, hidden, *args, **kwargs):
        if kwargs:  # transformers passes keyword arguments bound into `run`
            raise TypeError(f"qforge offloaded checkpointing: unexpected keyword arguments {sorted(kwargs)}")
        if not torch.is_grad_enabled():
            return run(hidden, *args)
        return _OffloadedLayer.apply(run, offloader, hidden, _GRAD_ANCHOR, *args)

    return checkpoint


class _NoOffload(HostOffloader):
    """Keeps the checkpoint on its device (plain checkpointing through the same Function)."""

    def save(self, t: Tensor) -> _Saved:
        entry = _Saved(t, None)
        entry.device_copy = t
        return entry


# ------------------------------------------------------------------ token tiles
class _TokenTiles(torch.autograd.Function):
    """A token-wise module over tiles of tokens: forward keeps only the input; backward
    recomputes and backpropagates tile by tile."""

    @staticmethod
    def forward(ctx, run, tile, x, anchor):
        ctx.run, ctx.tile = run, tile
        ctx.device_type = x.device.type
        ctx.autocast = _autocast_state(x.device.type)
        ctx.rng = _save_rng(x.device)
        ctx.save_for_backward(x)
        return _run_tiles(run, x, tile)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[2]
        flat = x.reshape(-1, x.shape[-1])
        g = grad.reshape(-1, grad.shape[-1])
        gx = torch.empty_like(flat) if need_x else None
        with _replayed_rng(ctx.rng, x.device):  # tiles recomputed in forward's order: same masks
            for s in range(0, flat.shape[0], ctx.tile):
                xt = flat[s:s + ctx.tile].detach().requires_grad_(need_x)
                with torch.enable_grad(), _autocast(ctx.device_type, ctx.autocast):
                    out = ctx.run(xt)
                if out.requires_grad:
                    torch.autograd.backward(out, g[s:s + ctx.tile])
                if need_x:
                    gx[s:s + ctx.tile] = xt.grad if xt.grad is not None else 0
        return None, None, (gx.view_as(x) if need_x else None), None


def _run_tiles(run, x: Tensor, tile: int) -> Tensor:
    flat = x.reshape(-1, x.shape[-1])
    out = None
    for s in range(0, flat.shape[0], tile):
        o = run(flat[s:s + tile])
        if out is None:
            out = o.new_empty((flat.shape[0], o.shape[-1]))
        out[s:s + tile] = o
    return out.view(*x.shape[:-1], out.shape[-1])


def tiled_forward(self, x: Tensor) -> Tensor:
    """A token-wise module's forward over tiles of ``self._qforge_tile`` tokens (installed by
    ``enable``); inputs of at most one tile run untiled."""
    run, tile = self._qforge_untiled_forward, self._qforge_tile
    if x.shape[:-1].numel() <= tile:
        return run(x)
    if not torch.is_grad_enabled():
        return _run_tiles(run, x, tile)
    return _TokenTiles.apply(run, tile, x, _GRAD_ANCHOR)


def _token_wise_modules(model: nn.Module, layers: list[nn.Module]) -> list[nn.Module]:
    """The decoder layers' MLPs and every RMSNorm (class name ending in RMSNorm)."""
    found = [layer.mlp for layer in layers if isinstance(getattr(layer, "mlp", None), nn.Module)]
    found += [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    return found


def _untile(module: nn.Module) -> None:
    if getattr(module, "_qforge_untiled_forward", None) is not None:
        module.forward = module._qforge_untiled_forward
        module._qforge_untiled_forward = None


# ------------------------------------------------------------------ model-level switches
def enable(model: nn.Module, offload: bool = True, tile_tokens: Optional[int] = DEFAULT_TILE_TOKENS,
           max_inflight: int = MAX_INFLIGHT_COPIES) -> HostOffloader:
    """Turn on per-layer gradient checkpointing with the checkpoints in host memory (``offload``)
    and the MLPs and RMSNorms in tiles of ``tile_tokens`` tokens (None: untiled). Works on a transformers
    model (or a PEFT wrapper) whose decoder layers are ``GradientCheckpointingLayer``s. Returns
    the offloader (its byte counters say what moved)."""
    if tile_tokens is not None and (not isinstance(tile_tokens, int) or tile_tokens < 1):
        raise ValueError(f"offload.enable: tile_tokens must be a positive int or None, got {tile_tokens!r}")
    try:
        layers = decoder_layers(model)
    except ValueError as e:
        raise ValueError(f"offload.enable: {e}") from None
    enable_checkpointing(model)
    offloader = HostOffloader(max_inflight) if offload else _NoOffload(max_inflight)
    func = _checkpoint_function(offloader)
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = func
    for module in _token_wise_modules(model, layers):
        _untile(module)  # enable() again: start from the plain forward
        if tile_tokens is not None:
            module._qforge_untiled_forward = module.forward
            module._qforge_tile = int(tile_tokens)
            module.forward = types.MethodType(tiled_forward, module)
    model._qforge_offloader = offloader
    return offloader


def disable(model: nn.Module) -> nn.Module:
    """Undo :func:`enable`: the modules run untiled and gradient checkpointing is turned off."""
    for module in _token_wise_modules(model, decoder_layers(model)):
        _untile(module)
    if hasattr(model, "activation_checkpointing_disable"):  # transformers' name since 5.2x; the old one warns
        model.activation_checkpointing_disable()
    elif hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    model._qforge_offloader = None
    return model


def enable_checkpointing(model: nn.Module, offload: bool = False) -> bool:
    """transformers' own per-layer activation checkpointing (non-reentrant), through
    ``activation_checkpointing_enable`` where the installed transformers has it (the old
    ``gradient_checkpointing_enable`` warns that v6 removes it). ``offload``: that API also keeps
    the checkpointed inputs in host memory. Returns whether it does; a model with neither method
    is left as it is."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False}, offload=offload)
        return offload
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return False

