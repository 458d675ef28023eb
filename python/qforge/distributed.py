"""Multi-process QLoRA on PyTorch's own distributed engine: torchrun starts the
processes, FSDP2 (``fully_shard`` per decoder layer, then the root) shards the
model, torch.distributed.checkpoint writes sharded checkpoints.

* ``init_from_env``: inside a torchrun process (``WORLD_SIZE`` > 1), join the
  process group (NCCL on CUDA, gloo on the CPU) with a collective timeout, so
  a dead or diverging rank stops the run with an error instead of hanging.
* ``shard_model``: FSDP2 over all ranks. The NF4 weights are ``NF4Weight``
  tensors (uint8 codes gathered through their FSDP2 hooks); LoRA weights keep
  fp32 masters and reduce gradients in fp32; embeddings, norms and ``lm_head``
  belong to the root unit, which FSDP2 unshards for the root's forward, so the
  fused linear + cross-entropy reads the whole ``lm_head`` there and full
  logits are never built.
* ``launch``: ``qforge train --nproc N`` re-runs itself under torchrun.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["DistContext", "init_from_env", "shard_model", "shard_module", "shard_root", "finish_sharding",
           "layer_sharder", "set_prefetch", "decoder_layers", "check_same_on_all_ranks", "launch", "choose_offload",
           "choose_keep_gathered", "DEFAULT_TIMEOUT_S"]

# Seconds any collective may wait for the other ranks before the run fails with
# an error (a dead rank, a rank stuck elsewhere); --dist-timeout overrides it.
DEFAULT_TIMEOUT_S = 600
MAX_PROCESSES = 1024  # the most processes `--nproc` launches on one node


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    mesh: Any

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def sum(self, value: float) -> float:
        """value summed over the ranks (a float64 all-reduce)."""
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return float(t.item())

    def gather(self, value: float) -> list[float]:
        """value from every rank, in rank order."""
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return [float(o.item()) for o in out]

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def exit_worker(code: int = 0) -> None:
    """End a torchrun worker once its process group is destroyed and its files are
    written. Interpreter teardown can still meet a gloo worker thread holding tensors
    and abort ("terminate called without an active exception", pytorch#190489), turning
    a finished run into a SIGABRT that torchrun reports as the whole job failing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def init_from_env(device: Optional[str] = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Optional[DistContext]:
    """Join torchrun's process group when this process is one of several
    (``WORLD_SIZE`` > 1); None for a single process. Each rank uses
    ``cuda:LOCAL_RANK`` when CUDA is there (and ``device`` is not cpu), else the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from ._lib import built_with_cuda

    if timeout_s <= 0:
        raise ValueError(f"the collective timeout must be positive, got {timeout_s} s")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = (device is None or device.startswith("cuda")) and torch.cuda.is_available() and built_with_cuda()
    if device is not None and device.startswith("cuda") and not cuda:
        raise ValueError(f"--device {device}: CUDA is not available to this process")
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible; "
                             "start at most one process per GPU")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        kw = dict(device_id=dev) if cuda else {}
        # gloo beside NCCL: with CPU offload, gradient clipping reduces CPU-resident shards
        dist.init_process_group("cuda:nccl,cpu:gloo" if cuda else "gloo", timeout=timedelta(seconds=timeout_s), **kw)
    mesh = init_device_mesh(dev.type, (world,))
    return DistContext(rank, world, local_rank, dev, mesh)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers model (also inside a PEFT wrapper): its
    ``GradientCheckpointingLayer`` modules, in order. ValueError when it has none."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no decoder layers (transformers GradientCheckpointingLayer "
                         "modules; expected a transformers *ForCausalLM such as a Llama-family one)")
    return layers


def shard_module(module: nn.Module, ctx: DistContext, offload: bool = False,
                 param_dtype: Optional[torch.dtype] = None, reduce_dtype: torch.dtype = torch.float32,
                 reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` one module (a decoder layer, or the root last) over all
    ranks. ``param_dtype`` None keeps the LoRA weights in their own (fp32
    master) dtype for compute; gradients are reduced in ``reduce_dtype``.
    ``offload`` keeps the sharded parameters, gradients and optimizer state in
    CPU memory (FSDP2's CPUOffloadPolicy). ``reshard_after_forward`` False keeps
    the gathered weights from forward to backward (less traffic, more memory)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    policy = CPUOffloadPolicy(pin_memory=ctx.device.type == "cuda") if offload else OffloadPolicy()
    fully_shard(module, mesh=ctx.mesh, offload_policy=policy, reshard_after_forward=reshard_after_forward,
                mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype))
    return module


MAX_PREFETCH = 8  # layers whose all-gathers may be in flight ahead of the one computing


def set_prefetch(layers: list, depth: int = 1) -> None:
    """Explicit prefetch between sharded decoder layers: the forward of layer i
    issues the all-gathers of layers i+1..i+depth, the backward of layer i those
    of layers i-1..i-depth. Without it FSDP2 overlaps a layer's all-gather with
    the previous layer's compute only when the CPU runs ahead of the GPU.
    ``depth`` 0 leaves FSDP2's defaults."""
    if not 0 <= depth <= MAX_PREFETCH:
        raise ValueError(f"prefetch depth must be between 0 and {MAX_PREFETCH}, got {depth}")
    if depth == 0:
        return
    for i, layer in enumerate(layers):
        ahead, behind = layers[i + 1:i + 1 + depth], layers[max(0, i - depth):i][::-1]
        if ahead:
            layer.set_modules_to_forward_prefetch(ahead)
        if behind:
            layer.set_modules_to_backward_prefetch(behind)


def shard_model(model: nn.Module, ctx: DistContext, offload: bool = False, prefetch: int = 1,
                **policy) -> nn.Module:
    """``shard_module`` on each decoder layer, then ``finish_sharding`` (the
    root, prefetch)."""
    for layer in decoder_layers(model):
        shard_module(layer, ctx, offload, **policy)
    return finish_sharding(model, ctx, offload, prefetch, **policy)


def finish_sharding(model: nn.Module, ctx: DistContext, offload: bool = False, prefetch: int = 1,
                    **policy) -> nn.Module:
    """After the decoder layers: ``shard_root`` and ``set_prefetch(layers, prefetch)``."""
    shard_root(model, ctx, offload, **policy)
    set_prefetch(decoder_layers(model), prefetch)
    return model


def layer_sharder(ctx: DistContext, offload: bool, lora: dict, seed: int, **policy):
    """The ``prepare_layer`` hook of ``qforge.load`` for a sharded start: each
    decoder layer, as soon as it is loaded, gets its LoRA adapter (``lora``:
    ``attach_lora``'s r, lora_alpha, lora_dropout, target_modules; A drawn from
    one generator seeded by ``seed``, so the adapter equals the one added to
    the whole model at once) and is sharded, so that this rank frees the rows it
    does not own before the next layer is read. Finish with ``nn.finish_lora``
    and ``finish_sharding`` on the model."""
    from .nn import attach_lora

    generator = torch.Generator().manual_seed(seed)

    def prepare(layer: nn.Module) -> None:
        attach_lora(layer, generator=generator, **lora)
        shard_module(layer, ctx, offload, **policy)

    return prepare


def shard_root(model: nn.Module, ctx: DistContext, offload: bool = False, **policy) -> nn.Module:
    """``shard_module`` on the root, last: kept gathered through backward unless
    ``offload`` (FSDP2 would otherwise gather embeddings and ``lm_head`` twice
    per step)."""
    return shard_module(model, ctx, offload, **{**policy, "reshard_after_forward": offload})


def check_same_on_all_ranks(ctx: DistContext, what: dict) -> None:
    """Raise ValueError naming every entry of ``what`` (strings, numbers) on which
    the ranks disagree: different data, arguments or versions would otherwise
    train different jobs or deadlock in mismatched collectives."""
    import torch.distributed as dist

    everyone: list = [None] * ctx.world
    dist.all_gather_object(everyone, what)
    differ = sorted(k for k in what if any(o.get(k) != what[k] for o in everyone))
    if differ:
        detail = "; ".join(f"{k}: " + ", ".join(f"rank {r}={o.get(k)!r}" for r, o in enumerate(everyone))
                           for k in differ[:4])
        raise ValueError(f"the {ctx.world} ranks disagree on {', '.join(differ)} ({detail})")


def choose_offload(mode: str, need_bytes: int, device: torch.device, world: int) -> tuple[bool, str]:
    """(offload?, why) for ``--offload auto|on|off``. auto offloads when this
    rank's share of the frozen model (``need_bytes`` / world) plus a 25% margin
    for activations does not fit in the GPU's free memory."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--offload must be auto, on or off, got {mode!r}")
    if mode != "auto":
        return mode == "on", f"--offload {mode}"
    if device.type != "cuda":
        return False, "auto: on the CPU there is no GPU memory to spare"
    free, _ = torch.cuda.mem_get_info(device)
    share = need_bytes / world
    gib = 2 ** 30
    if share * 1.25 > free:
        return True, (f"auto: this rank's share of the model ({share / gib:.1f} GiB) + 25% does not fit in the "
                      f"{free / gib:.1f} GiB free on {device}")
    return False, f"auto: this rank's share of the model ({share / gib:.1f} GiB) fits in {free / gib:.1f} GiB free"


def choose_keep_gathered(offload: bool, need_bytes: int, device: torch.device) -> tuple[bool, str]:
    """(keep the decoder layers gathered from forward to backward?, why). Keeping
    them saves the backward all-gathers (a third of the traffic and of FSDP2's
    per-layer work; on 2 x H200 at 8B shapes 1.36x -> 1.50x over one GPU) but
    holds the whole 4-bit model on every GPU by the end of the forward: only
    without offload, when the whole frozen model (``need_bytes``) + 25% fits in
    the free GPU memory."""
    if offload:
        return False, "layers resharded after forward (offload)"
    if device.type != "cuda":
        return False, "layers resharded after forward (no GPU)"
    free, _ = torch.cuda.mem_get_info(device)
    gib = 2 ** 30
    if need_bytes * 1.25 > free:
        return False, (f"layers resharded after forward: the whole 4-bit model ({need_bytes / gib:.1f} GiB) + 25% "
                       f"does not fit in {free / gib:.1f} GiB free")
    return True, f"layers kept gathered through backward ({need_bytes / gib:.1f} GiB fits in {free / gib:.1f} GiB free)"


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``qforge <argv>`` as ``nproc`` processes under torchrun on this node;
    returns torchrun's exit status (it stops every process when one fails)."""
    if not 1 <= nproc <= MAX_PROCESSES:
        raise ValueError(f"--nproc must be between 1 and {MAX_PROCESSES}, got {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "qforge", *argv]
    return subprocess.call(cmd)


# ------------------------------------------------------------------ state and checkpoints
def full_lora_state(model: nn.Module) -> dict:
    """The LoRA weights by module name, whole (a collective: every rank calls it;
    the result is the same on all)."""
    from .nn import lora_state_dict

    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach()
            for k, v in lora_state_dict(model).items()}


def save_sharded(path, model: nn.Module, opt) -> None:
    """The trainable weights and the optimizer state with torch.distributed.checkpoint
    (each rank writes its shards; works without a process group too)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def load_sharded(path, model: nn.Module, opt) -> None:
    """Inverse of save_sharded, on any number of ranks (DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    options = StateDictOptions(ignore_frozen_params=True, strict=False)  # strict would ask for frozen weights
    model_sd, optim_sd = get_state_dict(model, opt, options=options)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))  # raises when a key is absent from the checkpoint
    result = set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                            options=options)
    missing = [k for k in result.missing_keys if k in model_sd]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: the checkpoint does not fit this model (missing {missing[:3]}, "
                         f"unexpected {list(result.unexpected_keys)[:3]})")


class main_first:
    """Run the body on rank 0 first, then on the other ranks (files that rank 0
    writes and the others read); a plain block without a process group."""

    def __init__(self, ctx: Optional[DistContext]):
        self.ctx = ctx

    def __enter__(self):
        if self.ctx is not None and not self.ctx.main:
            self.ctx.barrier()

    def __exit__(self, *exc):
        if self.ctx is not None and self.ctx.main and exc[0] is None:
            self.ctx.barrier()
        return False
