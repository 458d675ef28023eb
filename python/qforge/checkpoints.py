"""Training checkpoints on disk: ``<output>/checkpoints/step-N`` directories,
ordered by their step number (never as text: ``step-1000000`` is newer than
``step-999999``), checked for damage before a run resumes from one.

A checkpoint holds the adapter (PEFT files), ``optimizer.pt``, ``rng.pt``,
``scaler.pt`` (fp16 runs) and ``state.json``; one written under torchrun holds
``dcp/`` (torch.distributed.checkpoint: each rank's shards of the LoRA weights
and optimizer state) and ``rng-<rank>.pt`` instead of the two torch files. Resuming from one whose file is
unreadable, inconsistent or holds non-finite optimizer state raises
:class:`CheckpointDamaged`, naming the file and the newest earlier checkpoint
that is complete, with the command that resumes from it.
"""
from __future__ import annotations

import json
import math
import re
import zipfile
from pathlib import Path
from typing import Optional

import torch

__all__ = ["CheckpointDamaged", "checkpoint_step", "checkpoints", "latest_checkpoint", "checkpoint_problem",
           "verify_checkpoint", "load_checkpoint"]

_NAME = re.compile(r"step-(\d{1,18})")  # 18 digits: any step count an int64 holds
TORCH_FILES = ("optimizer.pt", "rng.pt")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class CheckpointDamaged(ValueError):
    """A checkpoint cannot be resumed from; the message names the file, what is
    wrong with it, and the previous complete checkpoint."""


def checkpoint_step(path: Path) -> Optional[int]:
    """N of a ``step-N`` directory name; None for anything else (temporary
    ``.step-N.tmp`` directories, set-aside ones, stray files)."""
    m = _NAME.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def checkpoints(output: Path) -> list[Path]:
    """Every ``step-N`` directory under ``output/checkpoints``, oldest step first."""
    root = Path(output) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(output: Path) -> Optional[Path]:
    """The checkpoint with the highest step that was renamed into place whole
    (it has its state.json)."""
    done = [p for p in checkpoints(output) if (p / "state.json").exists()]
    return done[-1] if done else None


def _read_state(path: Path) -> dict:
    f = path / "state.json"
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError("state.json: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"state.json: not valid JSON ({e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"state.json: expected a JSON object, got {type(state).__name__}")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step != checkpoint_step(path):
        raise ValueError(f"state.json: 'step' is {step!r}, the directory says {checkpoint_step(path)}")
    return state


def checkpoint_problem(path: Path) -> Optional[str]:
    """What is wrong with a checkpoint found without loading it into a model
    ("FILE: reason"), or None when it looks complete: state.json parses and
    names its step, every file is present, the torch files' archives pass
    their CRC checks and the adapter's safetensors header reads."""
    try:
        _read_state(path)
    except ValueError as e:
        return str(e)
    sharded = (path / "dcp").is_dir()
    torch_files = tuple(sorted(p.name for p in path.glob("rng-*.pt"))) if sharded else TORCH_FILES
    for name in ADAPTER_FILES + (("dcp/.metadata", "rng-0.pt") if sharded else TORCH_FILES):
        if not (path / name).is_file():
            return f"{name}: missing"
    for name in torch_files + (("scaler.pt",) if (path / "scaler.pt").exists() else ()):
        try:
            with zipfile.ZipFile(path / name) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            return f"{name}: not a readable torch file ({e})"
        if bad is not None:
            return f"{name}: corrupt (member {bad} fails its CRC check)"
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
            list(f.keys())
    except (SafetensorError, OSError) as e:
        return f"adapter_model.safetensors: not a readable safetensors file ({e})"
    return None


def _previous_complete(path: Path) -> Optional[Path]:
    step = checkpoint_step(path)
    earlier = [p for p in checkpoints(path.parent.parent) if checkpoint_step(p) < step]
    return next((p for p in reversed(earlier) if checkpoint_problem(p) is None), None)


def damaged(path: Path, problem: str) -> CheckpointDamaged:
    """The error for a checkpoint that cannot be resumed from."""
    path = Path(path)
    previous = _previous_complete(path)
    output = path.parent.parent
    if previous is None:
        advice = "there is no earlier complete checkpoint: start a new run (another --output)"
    else:
        advice = (f"the previous complete one is {previous.name}: resume from it with the same arguments and "
                  f"--resume-from {previous} (qforge train --output {output} --resume-from {previous})")
    return CheckpointDamaged(f"checkpoint {path.name} is damaged ({problem}); {advice}")


def _load_torch(path: Path, name: str, map_location=None):
    try:
        return torch.load(path / name, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{name}: missing") from None
    except Exception as e:  # torch.load reports a damaged archive as many exception types
        raise ValueError(f"{name}: cannot be read ({type(e).__name__}: {e})") from None


def _first_nonfinite(optimizer_state: dict) -> Optional[str]:
    for index, per_param in optimizer_state.get("state", {}).items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                return f"{key} of parameter {index}"
            if isinstance(value, float) and not math.isfinite(value):
                return f"{key} of parameter {index}"
    return None


def verify_checkpoint(path: Path) -> None:
    """CheckpointDamaged when checkpoint_problem finds something wrong: the cheap
    checks, before a run spends time loading its model."""
    problem = checkpoint_problem(Path(path))
    if problem is not None:
        raise damaged(path, problem)


def load_checkpoint(path: Path, model, optimizer, scaler, device, load_adapter, verified: bool = False) -> dict:
    """Restore model adapter, optimizer, scaler and torch RNG from checkpoint
    ``path`` (checked first by verify_checkpoint unless ``verified``); returns
    its state.json. Raises CheckpointDamaged naming the file when one cannot be
    read or does not fit this run."""
    path = Path(path)
    if not verified:
        verify_checkpoint(path)
    try:
        state = _read_state(path)
        if (path / "dcp").is_dir():
            _load_sharded(path, model, optimizer, scaler)
            return state
        try:
            load_adapter(model, path)
        except ValueError as e:
            raise ValueError(f"adapter: {e}") from None
        opt_state = _load_torch(path, "optimizer.pt", map_location=device)
        if not isinstance(opt_state, dict):
            raise ValueError(f"optimizer.pt: holds a {type(opt_state).__name__}, not an optimizer state")
        where = _first_nonfinite(opt_state)
        if where is not None:
            raise ValueError(f"optimizer.pt: holds non-finite values ({where}); the run that wrote it had "
                             "diverged, and training on from it gives NaN")
        try:
            optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise ValueError(f"optimizer.pt: does not fit this run's LoRA parameters ({e})") from None
        _restore_scaler_and_rng(path, scaler, "rng.pt")
    except ValueError as e:
        raise damaged(path, str(e)) from None
    return state


def _load_sharded(path: Path, model, optimizer, scaler) -> None:
    """A checkpoint of a torchrun run: LoRA weights and optimizer state through
    torch.distributed.checkpoint (any number of ranks, or one process), this
    rank's RNG state (rank 0's on a rank the writing run did not have)."""
    import torch.distributed as dist

    from .distributed import load_sharded

    try:
        load_sharded(path / "dcp", model, optimizer)
    except (RuntimeError, KeyError) as e:  # DCP reports a missing or mismatched entry as these
        raise ValueError(f"dcp: does not fit this run's LoRA parameters ({type(e).__name__}: {e})") from None
    rank = dist.get_rank() if dist.is_initialized() else 0
    _restore_scaler_and_rng(path, scaler, f"rng-{rank}.pt" if (path / f"rng-{rank}.pt").exists() else "rng-0.pt")


def _restore_scaler_and_rng(path: Path, scaler, rng_name: str) -> None:
    """The fp16 loss scaler's state (when the run has one and the checkpoint
    saved one) and the torch RNG state from file ``rng_name``; ValueError
    naming the file when one does not hold what it should."""
    if scaler is not None and scaler.is_enabled() and (path / "scaler.pt").exists():
        try:
            scaler.load_state_dict(_load_torch(path, "scaler.pt"))
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise ValueError(f"scaler.pt: {e}") from None
    rng = _load_torch(path, rng_name)
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
        raise ValueError(f"{rng_name}: holds {type(rng).__name__} "
                         f"{getattr(rng, 'dtype', '')}, not a torch RNG state (uint8 tensor)")
    try:
        torch.set_rng_state(rng)
    except RuntimeError as e:
        raise ValueError(f"{rng_name}: not a torch RNG state ({e})") from None
