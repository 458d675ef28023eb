"""`qforge train`: chat JSONL -> LoRA adapter on a 4-bit model.

The loop: packed padding-free batches (``qforge.data``), the fused
linear-cross-entropy loss (``qforge.hf.patch_causal_lm``: full logits never
exist), AdamW on the LoRA weights, gradient accumulation normalised by the
number of trained tokens, linear warmup + cosine decay, bf16 autocast on CUDA,
optional activation checkpointing (optionally offloaded to CPU). It writes a
metrics JSONL, a loss-curve PNG, checkpoints that are complete or absent
(written to a temporary directory and renamed), and the final adapter in
PEFT's format. ``resume`` continues from the latest checkpoint bit for bit.

``prepare`` sets a run up (a ``TrainingRun``), ``train_step`` runs one optimizer
step of it, and ``train`` loops over the steps: progress bar, metrics,
checkpoints, the final adapter, the summary (and the default job's eval).

With neither a model nor data it runs the embedded default: a tiny random
Llama-architecture model and tokenizer built by code, and a built-in
tool-calling dataset.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from ._files import atomic_write_text, write_complete_or_absent
from .checkpoints import checkpoint_step, checkpoints, latest_checkpoint, load_checkpoint, verify_checkpoint
from .nn import DEFAULT_TARGETS

if TYPE_CHECKING:
    from .distributed import DistContext

__all__ = ["TrainArgs", "train", "prepare", "train_step", "TrainingRun", "StepResult", "latest_checkpoint", "DEFAULT_JOB",
           "NonFiniteTraining"]


@dataclass
class TrainArgs:
    model: Optional[str] = None  # a local HF directory; None: the embedded tiny model
    data: Optional[str] = None  # chat JSONL; None: the built-in tool-calling dataset
    output: Optional[str] = None  # None: qforge-runs/run-<time>
    max_seq_length: int = 2048
    tokens_per_batch: Optional[int] = None  # tokens per micro-batch (packed); default max_seq_length
    grad_accum: int = 1
    max_steps: Optional[int] = None
    epochs: float = 1.0
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_steps: Optional[int] = None  # default: 5% of the steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple = DEFAULT_TARGETS
    seed: int = 0
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: Optional[str] = None
    save_every: int = 0  # steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2
    resume: bool = False
    resume_from: Optional[str] = None  # a checkpoint directory to resume from (implies resume)
    log_every: int = 1
    gradient_checkpointing: Optional[bool] = None  # None: on for --model runs, off for the tiny default
    offload_activations: bool = False
    tile_tokens: Optional[int] = None  # MLPs and RMSNorms over token tiles (qforge.offload); None: untiled
    fused_layers: str = "auto"  # decoder layers with a hand-written backward (qforge.decoder): auto|on|off
    skip_long: bool = False
    progress: bool = True
    stop_after: Optional[int] = None  # stop (after checkpointing) at this step: tests and time-boxed runs
    loss: str = "fused"  # fused: qforge's C++/CUDA linear-cross-entropy; generic: chunked torch CE
    compile: bool = False  # torch.compile the whole model (fullgraph, dynamic lengths; qforge.compile)
    compile_backend: str = "inductor"
    # a step whose loss or gradient is NaN/Inf: "stop" the run before anything of it is
    # applied or saved, or "skip" it (no update; at most MAX_SKIPPED_IN_A_ROW in a row)
    on_nonfinite: str = "stop"
    offload: str = "auto"  # under torchrun: FSDP2 CPU offload of parameters, gradients, optimizer (auto|on|off)
    dist_timeout: float = 600.0  # seconds a collective waits for the other ranks before the run fails
    attention: str = "auto"  # auto|flash|flex|sdpa|documents: qforge.attention.use_for_training


MAX_SKIPPED_IN_A_ROW = 10  # more non-finite steps in a row than this is no transient: stop


class NonFiniteTraining(ValueError):
    """A step's loss or gradient was NaN or Inf; nothing of that step was applied or saved."""


# the embedded default job: sized to show a clearly falling loss in well under
# two minutes on two CPU cores
DEFAULT_JOB = dict(max_seq_length=1024, tokens_per_batch=1024, max_steps=100, lr=4e-3, warmup_steps=4,
                   lora_r=16, lora_alpha=32.0, save_every=25)


# ------------------------------------------------------------------ helpers
def lr_at(step: int, total: int, base: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup for `warmup` steps, then cosine decay to min_ratio * base (step is 0-based)."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except Exception:  # pragma: no cover - non-POSIX
        return float("nan")


def plot_losses(metrics_path: Path, png: Path) -> None:
    """The loss curve (raw and smoothed) as a PNG, complete or absent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r.get("loss") is not None]  # skipped (non-finite) steps have none
    if not rows:
        return
    steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
    smooth, s = [], None
    for v in losses:
        s = v if s is None else 0.9 * s + 0.1 * v
        smooth.append(s)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label="smoothed (EMA 0.9)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (assistant tokens)")
    ax.set_title("qforge train")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_complete_or_absent(png, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


class _Progress:
    def __init__(self, total: int, initial: int, enabled: bool, silent: bool = False):
        self.bar = None
        self.silent = silent  # ranks other than 0 of a distributed run print nothing
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="qforge train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def update(self, **post):
        if self.bar is not None:
            self.bar.set_postfix_str(" ".join(f"{k}={v}" for k, v in post.items()), refresh=False)
            self.bar.update(1)

    def write(self, text: str):
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif not self.silent:
            print(text, file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------ setup
def _prepare_default_model(output: Path, records, seed: int) -> Path:
    """Build (once per run directory) the tiny model + tokenizer as an HF directory."""
    from .chat import ChatTemplate, llama3_template
    from .data import render_texts
    from .models.tiny import write_default_model

    base = output / "base-model"
    if (base / "config.json").exists():
        return base
    texts = render_texts(records, ChatTemplate(llama3_template("3.1")), {"bos_token": "<|begin_of_text|>"})
    return write_default_model(base, texts, seed=seed)


def _resolve_output(args: TrainArgs) -> Path:
    if args.output:
        return Path(args.output)
    return Path("qforge-runs") / time.strftime("run-%Y%m%d-%H%M%S")


@dataclass
class TrainingRun:
    """A run as prepare() set it up: what train_step() and train()'s loop read, and the one
    counter train_step() keeps."""
    args: TrainArgs
    output: Path
    dctx: Optional[DistContext]  # None unless under torchrun
    world: int
    rank: int
    accum: int  # micro-batches per optimizer step, all ranks together
    device: torch.device
    dtype: torch.dtype
    model_dir: Path
    model_type: str
    tokenizer: Any
    template: Any  # qforge.chat.ChatTemplate
    examples: list
    batches: Any  # qforge.data.PackedBatches
    total_steps: int
    steps_per_epoch: int
    warmup_steps: int
    model: torch.nn.Module
    params: list
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Callable  # a context around each forward: bf16/fp16 autocast on CUDA, else none
    save_activations: Callable  # a context: saved activations to CPU (--offload-activations), where the layers do not
    takes_cu_seqlens: bool  # the packer's document boundaries go to qforge.attention as they are
    generate_attention: str  # transformers' attention implementation, restored for generation after training
    compile_watch: Any  # qforge.compile.CompileWatch with --compile, else None
    fingerprint: str  # what a resumed run must share with this one (_fingerprint)
    start_step: int = 0  # the resumed checkpoint's step
    nonfinite_in_a_row: int = 0  # steps skipped in a row for a NaN/Inf loss or gradient

    @property
    def metrics_path(self) -> Path:
        return self.output / "metrics.jsonl"


@dataclass
class StepResult:
    """One optimizer step, summed over its micro-batches and (under torchrun) the ranks."""
    lr: float
    loss: float
    grad_norm: float
    tokens: int  # of the step's packed batches
    trained_tokens: int  # of those, the ones with a label (assistant turns)
    epoch: int  # of this rank's last micro-batch
    skipped: Optional[str]  # what was NaN/Inf when the step was skipped (--on-nonfinite skip), else None


def prepare(args: TrainArgs) -> TrainingRun:
    """Everything before the first step: the process group (under torchrun), data, model
    directory, output and resume point checked before anything is written; then the
    tokenized and packed data, schedule, the 4-bit model with its LoRA adapters, its decoder
    layers set up (fused, checkpointed, offloaded, sharded, compiled), the optimizer, and
    the resumed checkpoint's state. The model is left in training mode, ready for train_step."""
    from . import decoder, distributed, hf
    from .attention import training_backend, use_for_training
    from .data import PackedBatches, template_for, tokenize_records
    from .models import default_device, load_tokenizer
    from .nn import lora_parameters

    if args.grad_accum < 1 or args.max_seq_length < 8:
        raise ValueError("grad_accum must be >= 1 and max_seq_length >= 8")
    dctx = distributed.init_from_env(args.device, args.dist_timeout)  # None unless under torchrun
    world, rank = (dctx.world, dctx.rank) if dctx else (1, 0)
    accum = args.grad_accum * world
    records, output, resume_from = _checked_inputs(args)

    device = dctx.device if dctx else torch.device(args.device) if args.device else default_device()
    checkpointing = args.gradient_checkpointing if args.gradient_checkpointing is not None else args.model is not None
    fused = decoder.wanted(args.fused_layers, device, checkpointing, args.compile, distributed=dctx is not None)[0]
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    training_backend(args.attention, device)  # a choice this device cannot train with: an error now
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    output.mkdir(parents=True, exist_ok=True)
    with distributed.main_first(dctx):
        model_dir = _prepare_default_model(output, records, args.seed) if args.model is None else Path(args.model)
    tokenizer = load_tokenizer(model_dir)
    model_type = json.loads((model_dir / "config.json").read_text())["model_type"]
    template = template_for(tokenizer, model_type, with_tools=any(r.get("tools") is not None for r in records))
    examples = tokenize_records(records, tokenizer, template, args.max_seq_length,
                                on_too_long="skip" if args.skip_long else "error")
    tokens_per_batch = args.tokens_per_batch or args.max_seq_length
    batches = PackedBatches(examples, tokens_per_batch, seed=args.seed)
    per_epoch = max(1, batches.batches_per_epoch // accum)
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * batches.batches_per_epoch / accum))
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, total_steps // 20)

    model, offload_params, sharding = _load_with_lora(args, model_dir, dtype, device, dctx)
    generate_attention = model.config._attn_implementation  # transformers' own, restored after training
    # the packer's boundaries go to qforge.attention as they are; fused layers (qforge.decoder) take
    # them from position_ids and would refuse the call with keywords they do not know
    takes_cu_seqlens = use_for_training(model, args.attention, device) and not fused
    hf.patch_causal_lm(model, args.loss)  # full logits never exist in training
    layers_offload = _set_up_decoder_layers(model, args, fused, checkpointing, rank)
    if dctx:  # FSDP2: the decoder layers are sharded, now the root
        distributed.finish_sharding(model, dctx, offload=offload_params)
        if dctx.main:
            print(f"qforge train: FSDP2 over {world} ranks, {sharding}", file=sys.stderr)
    compile_watch = None
    if args.compile:  # the whole model, one graph, its lengths dynamic (under FSDP2: each decoder layer)
        from .compile import compile_for_training

        compile_watch = compile_for_training(model, args.compile_backend)
        if dctx and dctx.main:
            print("qforge train: --compile under FSDP2 compiles each decoder layer, FSDP2's hooks outside the graphs",
                  file=sys.stderr)
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay)
    use_amp = device.type == "cuda" and dtype != torch.float32
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and dtype == torch.float16)  # fp16 only

    fingerprint = _fingerprint(examples, tokens_per_batch, args, accum)
    if dctx:
        distributed.check_same_on_all_ranks(dctx, {"data and batching": fingerprint, "torch": torch.__version__,
                                                   "arguments": json.dumps(asdict(args), default=str)})
    run = TrainingRun(
        args=args, output=output, dctx=dctx, world=world, rank=rank, accum=accum, device=device, dtype=dtype,
        model_dir=model_dir, model_type=model_type, tokenizer=tokenizer, template=template, examples=examples,
        batches=batches, total_steps=total_steps, steps_per_epoch=per_epoch, warmup_steps=warmup, model=model,
        params=params, opt=opt, scaler=scaler,
        autocast=(lambda: torch.autocast(device.type, dtype=dtype)) if use_amp else contextlib.nullcontext,
        save_activations=(lambda: torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda"))
        if args.offload_activations and not layers_offload else contextlib.nullcontext,
        takes_cu_seqlens=takes_cu_seqlens, generate_attention=generate_attention, compile_watch=compile_watch,
        fingerprint=fingerprint)
    run.start_step = _restore(run, resume_from)
    if rank == 0:
        atomic_write_text(output / "train_args.json", json.dumps({**asdict(args), "output": str(output),
                                                             "model": str(model_dir), "world_size": world},
                                                            indent=2, default=str))
    model.train()
    return run


def _checked_inputs(args: TrainArgs) -> tuple[list[dict], Path, Optional[Path]]:
    """(records, output directory, checkpoint to resume from): everything that can fail on bad
    input, checked before anything is written."""
    from .data import builtin_dataset, read_jsonl
    from .models.loader import read_config, weight_files

    records = read_jsonl(args.data) if args.data else builtin_dataset(seed=args.seed)
    if args.model is not None:
        read_config(Path(args.model))
        weight_files(Path(args.model))
    output = _resolve_output(args)
    if output.exists() and not output.is_dir():
        raise ValueError(f"{output}: exists and is not a directory")
    if args.compile and (args.offload_activations or args.tile_tokens):
        raise ValueError("--compile traces the whole model as one graph, which the hooks of --offload-activations "
                         "and the tiles of --tile-tokens do not go into; use one or the other")
    if args.on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {args.on_nonfinite!r}")
    return records, output, _resume_point(args, output)


def _load_with_lora(args: TrainArgs, model_dir: Path, dtype: torch.dtype, device: torch.device, dctx):
    """(model, offload_params, sharding): the 4-bit model with its LoRA adapters. Under torchrun
    each decoder layer gets its adapter and its FSDP2 shard as soon as it is loaded (sharded
    start); offload_params is FSDP2's CPU offload and `sharding` says what was chosen and why."""
    from . import distributed
    from .models import load
    from .models.loader import frozen_bytes
    from .nn import add_lora, finish_lora

    lora = dict(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                target_modules=args.target_modules)
    if dctx is None:
        model = load(model_dir, dtype=dtype, max_seq_length=args.max_seq_length, device=device)
        add_lora(model, seed=args.seed, **lora)
        return model, False, ""
    need = frozen_bytes(model_dir, dtype)
    offload_params, why = distributed.choose_offload(args.offload, need, device, dctx.world)
    keep, why_keep = distributed.choose_keep_gathered(offload_params, need, device)
    model = load(model_dir, dtype=dtype, max_seq_length=args.max_seq_length, device=device,
                 prepare_layer=distributed.layer_sharder(dctx, offload_params, lora, args.seed,
                                                         reshard_after_forward=not keep))
    finish_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout)
    return model, offload_params, f"CPU offload {'on' if offload_params else 'off'} ({why}), {why_keep}"


def _set_up_decoder_layers(model, args: TrainArgs, fused: bool, checkpointing: bool, rank: int) -> bool:
    """Fused layers, or activation checkpointing (with its offload and token tiles), or neither.
    Returns whether the layers now offload their saved activations themselves; where they do
    not, --offload-activations is torch's save_on_cpu around each forward."""
    from . import decoder
    from .offload import enable as offload_checkpoints, enable_checkpointing

    if fused:  # each layer saves x, h, o and the attention lse; backward re-runs only part of it
        status = decoder.enable(model, offload=args.offload_activations, tile_tokens=args.tile_tokens)
        if rank == 0:
            print(f"qforge train: {status}", file=sys.stderr)
        return args.offload_activations
    if checkpointing and (args.offload_activations or args.tile_tokens):
        # long context: each layer's checkpoint in pinned host memory, token-wise modules in tiles
        offload_checkpoints(model, offload=args.offload_activations, tile_tokens=args.tile_tokens)
        return args.offload_activations
    if checkpointing:
        return enable_checkpointing(model, offload=args.offload_activations)
    return False


def _restore(run: TrainingRun, resume_from: Optional[Path]) -> int:
    """The step to start from. Resuming: the checkpoint's adapter, optimizer, scaler and RNG
    restored, metrics.jsonl cut back to its step, newer checkpoints set aside (--resume-from).
    A new run: 0, and the metrics.jsonl of an earlier run that never checkpointed removed."""
    from .peft_io import load_adapter

    if resume_from is None:
        if run.metrics_path.exists() and run.rank == 0:
            run.metrics_path.unlink()  # a run that never checkpointed: nothing to keep consistent with
        return 0
    state = load_checkpoint(resume_from, run.model, run.opt, run.scaler, run.device, load_adapter, verified=True)
    if state.get("fingerprint", run.fingerprint) != run.fingerprint:
        raise ValueError(f"{resume_from}: the data or batching settings (tokens, batch size, grad_accum, seed, "
                         "LoRA shape) differ from the run that wrote this checkpoint; resuming would not "
                         "continue it. Use the original settings or a new --output")
    start = state["step"]
    kept_metrics = _metrics_up_to(run.metrics_path, start)  # drop lines past the checkpoint (a crash after it)
    if run.args.resume_from is not None and run.rank == 0:
        _set_aside_newer(run.output, resume_from)
    if kept_metrics is not None and run.rank == 0:
        atomic_write_text(run.metrics_path, "".join(line + "\n" for line in kept_metrics))
    return start


def train_step(run: TrainingRun, step: int) -> StepResult:
    """Optimizer step `step` (0-based): its learning rate; forward and backward of this rank's
    micro-batches, their gradients summed and normalised by the trained tokens of the whole
    global batch; clipping and the AdamW update. A NaN/Inf loss or gradient norm updates
    nothing: the step is skipped (--on-nonfinite skip) or NonFiniteTraining raised."""
    from .attention import packed_inputs

    args, dctx, world = run.args, run.dctx, run.world
    lr = lr_at(step, run.total_steps, args.lr, run.warmup_steps, args.min_lr_ratio)
    for g in run.opt.param_groups:
        g["lr"] = lr
    # this rank's share of the step's `accum` micro-batches: every world-th one
    micro = [run.batches.batch(step * run.accum + k * world + run.rank) for k in range(args.grad_accum)]
    n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    if dctx:
        n_items = int(dctx.sum(n_items))
    loss_sum, n_tokens = 0.0, 0
    for b in micro:
        inputs = {name: b[name].to(run.device) for name in ("input_ids", "position_ids", "labels")}
        if run.takes_cu_seqlens:  # document boundaries as they are: no T x T mask
            inputs.update(packed_inputs(b["cu_seqlens"], run.device))
        with run.autocast(), run.save_activations():
            out = run.model(**inputs, num_items_in_batch=n_items, use_cache=False)
        # FSDP2 averages gradients over the ranks; each rank's loss is already a share of the
        # global batch's (divided by all its tokens), so scale by the world size to sum them
        run.scaler.scale(out.loss * world if dctx else out.loss).backward()
        loss_sum += float(out.loss.detach())
        n_tokens += b["input_ids"].numel()
    if dctx:
        loss_sum, n_tokens = dctx.sum(loss_sum), int(dctx.sum(n_tokens))
    run.scaler.unscale_(run.opt)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, args.max_grad_norm))
    nonfinite = _nonfinite(loss_sum, grad_norm, run.scaler)
    if nonfinite is None:
        run.nonfinite_in_a_row = 0
        run.scaler.step(run.opt)
        run.scaler.update()
    else:
        run.nonfinite_in_a_row += 1
        if args.on_nonfinite == "stop" or run.nonfinite_in_a_row > MAX_SKIPPED_IN_A_ROW:
            raise NonFiniteTraining(_nonfinite_message(step + 1, nonfinite, run.output, args,
                                                       run.nonfinite_in_a_row))
        run.scaler.update()  # a no-op without fp16 loss scaling
    run.opt.zero_grad(set_to_none=True)
    return StepResult(lr=lr, loss=loss_sum, grad_norm=grad_norm, tokens=n_tokens, trained_tokens=n_items,
                      epoch=micro[-1]["epoch"], skipped=nonfinite)


def train(args: TrainArgs | None = None, **overrides) -> dict:
    """Run a training job; returns a summary dict (losses, steps, paths, speed)."""
    from . import distributed
    from .peft_io import save_adapter

    args = TrainArgs(**{**asdict(args or TrainArgs()), **overrides})
    run = prepare(args)
    model, device, rank, output, total_steps = run.model, run.device, run.rank, run.output, run.total_steps
    compile_watch = run.compile_watch
    n_params = sum(p.numel() for p in run.params)
    bar = _Progress(total_steps, run.start_step, args.progress and rank == 0, silent=rank != 0)
    bar.write(f"qforge train: {run.model_dir} ({run.model_type}, NF4 + LoRA r={args.lora_r}, {n_params:,} trainable) "
              f"on {device}, {run.dtype}; {len(run.examples)} conversations, {total_steps} steps "
              f"({run.steps_per_epoch} per epoch) -> {output}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses = []
    t_run = time.perf_counter()
    tokens_run = 0
    step = run.start_step
    stopped_early = False
    with open(run.metrics_path if rank == 0 else os.devnull, "a", encoding="utf-8") as mf, \
            compile_watch if compile_watch is not None else contextlib.nullcontext():
        for step in range(run.start_step, total_steps):
            t0 = time.perf_counter()
            try:
                result = train_step(run, step)
            except NonFiniteTraining:
                bar.close()
                raise
            if result.skipped is not None:
                bar.write(f"step {step + 1}: {result.skipped}; step skipped (--on-nonfinite skip)")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            tokens_run += result.tokens
            if result.skipped is None:
                losses.append(result.loss)
            row = _metrics_row(run, step, result, dt, t_run)
            if (step + 1) % args.log_every == 0 or step + 1 == total_steps:
                mf.write(json.dumps(row) + "\n")
                mf.flush()
            bar.update(loss=f"{result.loss:.4f}", tok_s=f"{result.tokens / dt:,.0f}", mem=f"{row['mem_gib']:.2f}GiB",
                       lr=f"{result.lr:.2e}", **({"compile": f"{compile_watch.seconds:.1f}s"} if compile_watch else {}))
            last = step + 1 == total_steps
            stop = args.stop_after is not None and step + 1 >= args.stop_after
            if (args.save_every and (step + 1) % args.save_every == 0) or last or stop:
                if rank == 0:
                    mf.flush()
                    os.fsync(mf.fileno())
                _save_checkpoint(output, step + 1, model, run.opt, args, save_adapter, run.fingerprint, run.scaler,
                                 run.dctx)
                if rank == 0:
                    plot_losses(run.metrics_path, output / "loss.png")
            if stop and not last:
                stopped_early = True
                break
    bar.close()
    model.set_attn_implementation(run.generate_attention)  # qforge.attention trains; generation needs a KV cache
    final = step + 1 if total_steps > run.start_step else run.start_step
    summary = {"output": str(output), "steps": final, "total_steps": total_steps, "losses": losses,
               "tokens_per_s": round(tokens_run / max(1e-9, time.perf_counter() - t_run), 1),
               "peak_mem_gib": round(_memory_gib(device), 3), "device": str(device), "stopped_early": stopped_early,
               "world_size": run.world,
               "metrics": str(run.metrics_path), "loss_png": str(output / "loss.png")}
    if compile_watch is not None:
        summary["compile"] = compile_watch.summary()
    if run.dctx:
        summary["peak_mem_gib_per_rank"] = [round(m, 3) for m in run.dctx.gather(_memory_gib(device))]
    lora_full = distributed.full_lora_state(model) if run.dctx and not stopped_early else None  # a collective
    if not stopped_early:
        summary["adapter"] = str(output / "adapter")
    if not stopped_early and rank == 0:
        _save_final_adapter(run, lora_full)
        atomic_write_text(output / "summary.json", json.dumps(summary, indent=2))
    if args.model is None and args.data is None and not stopped_early:
        # the default job ends with qforge eval's report on held-out built-in data
        from .compile import eager_modules
        from .data import builtin_dataset
        from .evaluate import evaluate_model, report_table

        # every rank generates (FSDP2 gathers the layers), through the eager modules with --compile;
        # rank 0 writes
        with eager_modules() if compile_watch is not None else contextlib.nullcontext():
            report = evaluate_model(model, run.tokenizer, run.template, builtin_dataset(8, seed=args.seed + 1),
                                    max_new_tokens=48)
        bar.write(report_table(report["metrics"], report["format"]))
        summary["eval"] = report["metrics"]
        if rank == 0:
            atomic_write_text(output / "eval.json", json.dumps(report, indent=2, ensure_ascii=False))
            atomic_write_text(output / "summary.json", json.dumps(summary, indent=2))
    model.qforge_train_summary = summary
    summary["model"] = model
    return summary


def _metrics_row(run: TrainingRun, step: int, result: StepResult, step_s: float, t_run: float) -> dict:
    """metrics.jsonl's row of step `step` (0-based), which took `step_s` seconds of a loop begun
    at perf_counter() `t_run`. Every rank calls it: under torchrun the memory figures are gathered."""
    applied = result.skipped is None
    row = {"step": step + 1, "loss": round(result.loss, 6) if applied else None, "lr": result.lr,
           "grad_norm": round(result.grad_norm, 6) if applied else None,
           "tokens": result.tokens, "trained_tokens": result.trained_tokens,
           "tokens_per_s": round(result.tokens / step_s, 1), "step_s": round(step_s, 4),
           "mem_gib": round(_memory_gib(run.device), 3), "epoch": result.epoch,
           "elapsed_s": round(time.perf_counter() - t_run, 2)}
    if not applied:
        row["skipped"] = result.skipped
    if run.compile_watch is not None:
        row["compilations"], row["compile_s"] = run.compile_watch.compilations, round(run.compile_watch.seconds, 2)
    if run.dctx:  # every rank's peak memory; the row's mem_gib is the largest
        row["mem_gib_per_rank"] = [round(m, 3) for m in run.dctx.gather(_memory_gib(run.device))]
        row["mem_gib"] = max(row["mem_gib_per_rank"])
    return row


def _save_final_adapter(run: TrainingRun, tensors: Optional[dict]) -> None:
    """<output>/adapter: the PEFT adapter and the tokenizer, built in .adapter.tmp and swapped in
    whole. `tensors`: the whole LoRA weights (gathered under torchrun), else the model's own."""
    from .peft_io import save_adapter

    output = run.output
    adapter_dir = output / "adapter"
    tmp = output / ".adapter.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_adapter(run.model, tmp, base_model_name_or_path=str(run.model_dir.resolve()), tensors=tensors)
    run.tokenizer.save_pretrained(str(tmp))
    if adapter_dir.exists():
        old = output / ".adapter.old"
        if old.exists():
            shutil.rmtree(old)
        adapter_dir.replace(old)
        tmp.replace(adapter_dir)
        shutil.rmtree(old)
    else:
        tmp.replace(adapter_dir)


def _fingerprint(examples, tokens_per_batch: int, args: TrainArgs, accum: int) -> str:
    """What a resumed run must share with the original to continue it bit for bit."""
    import hashlib

    h = hashlib.sha256()
    for e in examples:
        h.update(len(e.input_ids).to_bytes(4, "little"))
        h.update(b"".join(t.to_bytes(4, "little", signed=True) for t in e.input_ids))
        h.update(b"".join(t.to_bytes(4, "little", signed=True) for t in e.labels))
    h.update(json.dumps([tokens_per_batch, accum, args.seed, args.lora_r, args.lora_alpha,
                         sorted(args.target_modules)]).encode())
    return h.hexdigest()


def _resume_point(args: TrainArgs, output: Path) -> Optional[Path]:
    """The checkpoint to resume from, verified: --resume-from, else the latest one with --resume;
    None for a new run. ValueError where the arguments and `output` do not make one run."""
    if args.resume_from is not None:
        path = Path(args.resume_from)
        if not path.is_dir() or checkpoint_step(path) is None:
            raise ValueError(f"{path}: --resume-from needs a checkpoint directory (<output>/checkpoints/step-N)")
        verify_checkpoint(path)
        return path
    if not args.resume:
        if latest_checkpoint(output) is not None:
            raise ValueError(f"{output}: holds checkpoints of an earlier run; pass --resume to continue it "
                             "or choose another --output (nothing was overwritten)")
        return None
    path = latest_checkpoint(output)
    if path is None:
        if (output / "metrics.jsonl").exists():
            raise ValueError(f"{output}: --resume found no complete checkpoint to continue from")
        return None
    verify_checkpoint(path)
    return path


def _set_aside_newer(output: Path, resumed: Path) -> None:
    """Checkpoints of `output` newer than the one resumed from explicitly belong to the
    abandoned continuation (one of them damaged, typically): renamed to
    superseded-step-N, kept, and no longer seen by --resume or pruning."""
    step = checkpoint_step(resumed)
    for p in checkpoints(output):
        if checkpoint_step(p) > step:
            target = p.with_name(f"superseded-{p.name}")
            n = 1
            while target.exists() and n < 1000:
                target, n = p.with_name(f"superseded-{p.name}.{n}"), n + 1
            p.replace(target)
            print(f"qforge train: resuming from {resumed.name}; set the newer {p.name} aside as {target.name}",
                  file=sys.stderr)


def _metrics_up_to(metrics_path: Path, step: int) -> Optional[list[str]]:
    """metrics.jsonl's lines up to `step`; None when there is no file. A last line cut
    short by a crash is dropped; any other line that is not JSON is an error naming it."""
    if not metrics_path.exists():
        return None
    lines = [line for line in metrics_path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    kept = []
    for lineno, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            if lineno == len(lines):
                break
            raise ValueError(f"{metrics_path}:{lineno}: not valid JSON ({e})") from None
        if isinstance(row, dict) and isinstance(row.get("step", 0), int) and row.get("step", 0) <= step:
            kept.append(line)
    return kept


def _nonfinite(loss_sum: float, grad_norm: float, scaler) -> Optional[str]:
    """What is NaN/Inf in a step, or None. With fp16 loss scaling, inf gradients are
    the GradScaler's business (it skips such steps and lowers the scale)."""
    if not math.isfinite(loss_sum):
        return f"the loss is {loss_sum}"
    if not math.isfinite(grad_norm) and not scaler.is_enabled():
        return f"the gradient norm is {grad_norm}"
    return None


def _nonfinite_message(step: int, what: str, output: Path, args: TrainArgs, in_a_row: int) -> str:
    last = latest_checkpoint(output)
    where = f"the last checkpoint is {last}" if last is not None else "no checkpoint was written yet"
    if args.on_nonfinite == "skip":
        return (f"step {step}: {what}, the {in_a_row}th non-finite step in a row (more than "
                f"{MAX_SKIPPED_IN_A_ROW}); stopped before updating or saving anything; {where}")
    return (f"step {step}: {what}; stopped before updating the adapter or saving anything; {where}. "
            "Resume from it (perhaps with a lower --lr), or pass --on-nonfinite skip to skip such steps")


def _save_checkpoint(output: Path, step: int, model, opt, args: TrainArgs, save_adapter,
                     fingerprint: str = "", scaler=None, dctx=None) -> Path:
    """checkpoints/step-NNNNNN: adapter (PEFT files), optimizer, RNG and loop state;
    built in a hidden temporary directory and renamed into place, then older
    checkpoints beyond keep_checkpoints are removed. Under torchrun (``dctx``)
    the LoRA weights and optimizer state go to ``dcp/`` through
    torch.distributed.checkpoint (every rank its shards), RNG states to
    ``rng-<rank>.pt``, and rank 0 writes the whole adapter and renames."""
    from . import distributed

    root = output / "checkpoints"
    main = dctx is None or dctx.main
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    with distributed.main_first(dctx):  # rank 0 clears a leftover before anyone writes
        if main:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
    if dctx is not None:
        distributed.save_sharded(tmp / "dcp", model, opt)
        lora = distributed.full_lora_state(model)
        torch.save(torch.get_rng_state(), tmp / f"rng-{dctx.rank}.pt")
        dctx.barrier()  # every shard is on disk
        if not main:
            dctx.barrier()  # until rank 0 has renamed the checkpoint into place
            return final
        save_adapter(model, tmp, tensors=lora)
    else:
        save_adapter(model, tmp)
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        torch.save(torch.get_rng_state(), tmp / "rng.pt")
    if scaler is not None and scaler.is_enabled():
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    atomic_write_text(tmp / "state.json", json.dumps({"step": step, "time": time.time(), "fingerprint": fingerprint,
                                                 "args": asdict(args)}, indent=2, default=str))
    if final.exists():  # re-saving the same step (resumed run): swap
        shutil.rmtree(final)
    tmp.replace(final)
    for old in checkpoints(output)[:-max(1, args.keep_checkpoints)]:  # oldest steps first
        shutil.rmtree(old, ignore_errors=True)
    if dctx is not None:
        dctx.barrier()
    return final


# ------------------------------------------------------------------ command line
def add_cli(subparsers) -> None:
    """`qforge train`: registered by qforge.cli."""
    from .attention import ATTENTION_CHOICES

    p = subparsers.add_parser(
        "train", help="QLoRA fine-tuning: chat JSONL -> LoRA adapter (no arguments: the embedded default job)",
        description="Fine-tune a 4-bit Llama-family model with LoRA on chat-format JSONL. With neither --model "
                    "nor --data: a tiny random Llama model and a built-in tool-calling dataset.")
    a = p.add_argument
    a("--model", help="local Hugging Face model directory (16-bit safetensors or bnb-4bit)")
    a("--data", help="chat JSONL: one {\"messages\": [...], \"tools\": [...]} per line")
    a("--output", help="run directory (default qforge-runs/run-<time>)")
    a("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    a("--resume-from", metavar="CHECKPOINT", help="continue from this checkpoint directory (<output>/checkpoints/step-N); "
      "newer checkpoints in --output are set aside as superseded-step-N")
    a("--on-nonfinite", choices=("stop", "skip"),
      help="a step with a NaN/Inf loss or gradient: stop the run before saving (default) or skip the step")
    a("--max-seq-length", type=int)
    a("--tokens-per-batch", type=int, help="tokens per packed micro-batch (default max-seq-length)")
    a("--grad-accum", type=int)
    a("--max-steps", type=int)
    a("--epochs", type=float)
    a("--lr", type=float)
    a("--warmup-steps", type=int)
    a("--weight-decay", type=float)
    a("--max-grad-norm", type=float)
    a("--lora-r", type=int)
    a("--lora-alpha", type=float)
    a("--lora-dropout", type=float)
    a("--target-modules", nargs="+")
    a("--seed", type=int)
    a("--dtype", choices=("auto", "bfloat16", "float16", "float32"))
    a("--device", help="cpu or cuda[:i] (default: cuda if available)")
    a("--loss", choices=("fused", "generic"), help="fused C++/CUDA linear-CE (default) or chunked torch CE")
    a("--save-every", type=int, help="steps between checkpoints (0: only at the end)")
    a("--keep-checkpoints", type=int)
    a("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
      help="recompute each decoder layer in backward (default: on with --model, off for the tiny default)")
    a("--offload-activations", action="store_true", default=None,
      help="keep saved activations in CPU memory (with checkpointing: each layer's input, in pinned memory)")
    a("--tile-tokens", type=int, help="run MLPs and RMSNorms over tiles of this many tokens (long context)")
    a("--fused-layers", choices=("auto", "on", "off"),
      help="decoder layers with a hand-written backward that re-runs only part of the layer (qforge.decoder; "
           "auto: on CUDA with gradient checkpointing in one process; under torchrun only with on; "
           "not with --compile)")
    a("--skip-long", action="store_true", default=None, help="skip conversations longer than max-seq-length")
    a("--stop-after", type=int, help="checkpoint and stop at this step (resume later)")
    a("--compile", action="store_true", default=None,
      help="torch.compile the whole model (one graph, dynamic lengths; under torchrun each decoder layer, FSDP2's "
           "hooks outside); compile time shows in the progress bar")
    a("--attention", choices=ATTENTION_CHOICES,
      help="attention kernel: auto (default: flash where installed, else flex on CUDA; per document on CPU), "
           "flash, flex, documents (qforge.attention: packed rows as cu_seqlens, no T x T mask) or sdpa "
           "(transformers' SDPA with its T x T mask)")
    a("--no-progress", dest="progress", action="store_false", default=None)
    a("--nproc", type=int, help="processes (GPUs) on this node: re-runs this command under torchrun "
      "(same as `torchrun --nproc-per-node N -m qforge train ...`); --grad-accum is per process")
    a("--offload", choices=("auto", "on", "off"),
      help="under torchrun: FSDP2 CPU offload of parameters, gradients and optimizer state "
           "(auto: on when this rank's share of the model does not fit in free GPU memory)")
    a("--dist-timeout", type=float, help="seconds a collective waits for the other ranks before failing (600)")
    p.set_defaults(func=run_cli)


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def run_cli(ns) -> int:
    if ns.nproc is not None and "WORLD_SIZE" not in os.environ:
        from .distributed import launch

        argv = _without_nproc(sys.argv[1:])
        return launch(ns.nproc, argv if argv[:1] == ["train"] else ["train", *argv])
    keys = {f for f in TrainArgs.__dataclass_fields__}
    given = {k: v for k, v in vars(ns).items()
             if k in keys and v is not None and (v is not False or k in ("gradient_checkpointing", "progress"))}
    if "target_modules" in given:
        given["target_modules"] = tuple(given["target_modules"])
    base = dict(DEFAULT_JOB) if ns.model is None and ns.data is None else {}
    import torch.distributed as dist

    try:
        summary = train(TrainArgs(**{**base, **given}))
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no rank tears its group down while another still generates or writes
    finally:  # a process that leaves with its group alive aborts in the group's teardown
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .distributed import exit_worker

        if int(os.environ.get("RANK", "0")) == 0:
            _report(summary)
        exit_worker(0)  # everything is written; skip the teardown that can abort on gloo
    _report(summary)
    return 0


def _report(summary: dict) -> None:
    """The closing lines of `qforge train` (rank 0's, under torchrun)."""
    losses = summary["losses"]
    if losses:
        k = max(1, min(10, len(losses) // 5))
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        print(f"loss {first:.3f} -> {last:.3f} (mean of first/last {k} steps) over {summary['steps']} steps; "
              f"{summary['tokens_per_s']:,.0f} tokens/s; peak memory {summary['peak_mem_gib']:.2f} GiB")
    out = summary["output"]
    if summary.get("adapter"):
        print(f"adapter (PEFT format): {summary['adapter']}")
    else:
        print(f"stopped at step {summary['steps']} of {summary['total_steps']}; continue with "
              f"qforge train --output {out} --resume")
    print(f"metrics: {summary['metrics']}  loss curve: {summary['loss_png']}")
