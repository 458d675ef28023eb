"""Small file helpers shared by the loaders and the trainer: writes that are
complete or absent, and JSON reads whose errors name the file."""
from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, flush it to disk, rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


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
