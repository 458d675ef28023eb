"""torch.compile for training (`qforge train --compile`).

One process: the causal LM is compiled as one graph (``fullgraph=True``: a graph break is an
error, not a silent split) for the forward, and AOT autograd compiles its backward, gradient
checkpointing included. Under FSDP2 (torchrun) each decoder layer is compiled on its own, FSDP2's
hooks and the root's embeddings, norm and loss eager around the graphs (``compile_for_training``
says why). Packed rows change length every step, so the graphs are dynamic from the first call
(``dynamic=True``): the token dimension of the batch tensors, the number of documents
(``cu_seq_lens_q``'s length) and the integers that come with a batch (the longest document, the
number of trained tokens) are symbols, while parameter shapes stay static. Varied lengths then
do not recompile (marking only the tensor dimensions dynamic cost a second compilation, for the
integers). ``CompileWatch`` counts the compilations, sums the time spent compiling (forward graphs
and the lazily compiled backward) and keeps each recompilation's reason, which torch also logs
(its ``recompiles`` log is switched on, the rest of TORCH_LOGS left as it is). ``eager_modules()``
runs what was compiled eagerly again, for the generation that closes a run.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import torch

__all__ = ["CompileWatch", "compile_for_training", "eager_modules"]

# the logger torch's guards write recompilation reasons to (torch._logging's "recompiles" artifact)
_RECOMPILES_LOGGER = "torch._dynamo.guards.__recompiles"
MAX_KEPT_REASONS = 100  # a run that recompiles more than this has a problem the first ones show


class CompileWatch(logging.Handler):
    """Counts compilations and their time through torch._dynamo's compile callbacks; keeps the
    reasons of recompilations. ``close()`` (or leaving it as a context) unregisters everything."""

    def __init__(self, regions: Optional[str] = None):
        super().__init__(level=logging.DEBUG)
        self.regions = regions  # what compile_for_training compiled: "model" or "decoder layers"
        from torch._dynamo.callback import CallbackTrigger, callback_handler
        from torch._logging._internal import log_state

        self.compilations = 0  # Dynamo graphs (forward)
        self.backward_compilations = 0  # backward graphs AOT autograd compiled on first use
        self.seconds = 0.0
        self.recompile_reasons: list[str] = []
        self._started = None
        self._dynamo, self._lazy_backward = CallbackTrigger.DYNAMO, CallbackTrigger.LAZY_BACKWARD
        self._callbacks = callback_handler
        callback_handler.register_start_callback(self._start)
        callback_handler.register_end_callback(self._end)
        recompiles = logging.getLogger(_RECOMPILES_LOGGER)
        if not log_state.is_artifact_enabled("recompiles"):  # on, leaving the rest of TORCH_LOGS as it is
            log_state.enable_artifact("recompiles")
            recompiles.setLevel(logging.DEBUG)
            recompiles.propagate = True
        recompiles.addHandler(self)

    def _start(self, args):
        self._started = time.perf_counter()
        if args.callback_trigger == self._dynamo:
            self.compilations += 1
        elif args.callback_trigger == self._lazy_backward:
            self.backward_compilations += 1

    def _end(self, args):
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None

    def emit(self, record):
        if len(self.recompile_reasons) < MAX_KEPT_REASONS:
            self.recompile_reasons.append(record.getMessage())

    def summary(self) -> dict:
        return {"regions": self.regions, "compilations": self.compilations,
                "backward_compilations": self.backward_compilations, "compile_s": round(self.seconds, 2),
                "recompile_reasons": list(self.recompile_reasons)}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        logging.getLogger(_RECOMPILES_LOGGER).removeHandler(self)
        for callbacks, fn in ((self._callbacks.start_callbacks, self._start),
                              (self._callbacks.end_callbacks, self._end)):
            if fn in callbacks:
                callbacks.remove(fn)
        super().close()


def _fsdp_units(model: torch.nn.Module) -> list[str]:
    """The names of ``model``'s FSDP2 units (modules ``fully_shard`` was applied to; "" for the root)."""
    if not torch.distributed.is_available():  # a torch built without distributed has no FSDP2
        return []
    from torch.distributed.fsdp import FSDPModule

    return [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]


def _decoder_layers_outside_fsdp_hooks(model: torch.nn.Module, units: list[str]) -> list[torch.nn.Module]:
    """``model``'s decoder layers; ValueError when an FSDP2 unit lies inside one (its hooks would
    fall inside the layer's graph)."""
    from .distributed import decoder_layers

    layers = decoder_layers(model)
    names = {id(m): name for name, m in model.named_modules()}
    inside = [u for u in units if any(u.startswith(names[id(layer)] + ".") for layer in layers)]
    if inside:
        raise ValueError(f"compile_for_training compiles each decoder layer with FSDP2's hooks outside its graph; "
                         f"{', '.join(inside[:3])} inside a decoder layer is an FSDP2 unit of its own, whose hooks "
                         "would fall inside it. fully_shard whole decoder layers (and the root), as qforge.distributed "
                         "does")
    return layers


def compile_for_training(model: torch.nn.Module, backend: str = "inductor") -> CompileWatch:
    """Compiles ``model`` in place for training; returns the watch over its compilations (close it
    when the run ends). One process: the whole model as one graph (fullgraph=True). Sharded by
    FSDP2 (as under torchrun: ``fully_shard`` on each decoder layer, then the root): each decoder
    layer's ``forward`` as a graph of its own (fullgraph=True), FSDP2's hooks and the root's
    embeddings, norm and loss eager around them, as torchtitan compiles under FSDP2. Dynamo does
    not trace FSDP2's hooks (they are torch._dynamo.disable'd), so a whole-model graph would break
    at every layer, or need compiled autograd to trace them. The layers share one code object and
    so their compilations. ValueError for an FSDP2 unit inside a decoder layer."""
    units = _fsdp_units(model)
    layers = _decoder_layers_outside_fsdp_hooks(model, units) if units else None
    # transformers' checkpointing makes the embedding output require grad (by a hook calling
    # requires_grad_, which a compiled graph cannot return): reentrant checkpointing needs that,
    # the non-reentrant kind qforge uses does not
    model.disable_input_require_grads()
    watch = CompileWatch(regions="decoder layers" if units else "model")
    if layers is None:
        model.compile(fullgraph=True, dynamic=True, backend=backend)
    else:
        for layer in layers:
            # its bound forward, not Module.compile, which would trace _call_impl and FSDP2's hooks in it
            layer.forward = torch.compile(layer.forward, fullgraph=True, dynamic=True, backend=backend)
    return watch


def eager_modules():
    """A context in which what ``compile_for_training`` compiled (the whole model, or each decoder
    layer) runs as the eager modules. Generation after training has new shapes, no grad and a KV
    cache: through the training graphs it would recompile (costing compile time, and counting
    against the recompile limit) rather than reuse them. torch's "force_eager" stance skips every
    ``torch.compile`` inside it and leaves the compiled graphs in place for later."""
    return torch.compiler.set_stance("force_eager")
