"""Small file helpers shared by the loaders and the trainer: writes that are
complete or absent, and JSON reads whose errors name the file."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (where the OS lets a directory be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_complete_or_absent(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which is then flushed
    to disk and renamed into place (and the rename flushed): `path` afterwards
    holds either its old content or all of the new, never part of it, even if
    the process or the machine dies. On any error the temporary file is removed
    and the error raised."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path`, complete or absent."""
    write_complete_or_absent(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_save_safetensors(path: Path, tensors: dict, metadata: Optional[dict] = None) -> None:
    """safetensors' save_file of `tensors` (CPU, contiguous) to `path`, complete or absent."""
    from safetensors.torch import save_file

    write_complete_or_absent(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_json(path: Path, what: str):
    """The JSON in `path`; ValueError naming the file when it is missing or not JSON.
    `what` says what the file's absence means ("not a PEFT adapter directory")."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: missing ({what})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
