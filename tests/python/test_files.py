"""qforge._files: the one complete-or-absent writer behind every file qforge
saves (adapters, NF4 safetensors, JSON and text)."""
import os

import pytest
import torch
from safetensors.torch import load_file

from qforge import _files


def test_safetensors_written_with_metadata_and_no_temporary_left(tmp_path):
    path = tmp_path / "w.safetensors"
    _files.atomic_save_safetensors(path, {"a": torch.arange(6.0).reshape(2, 3)}, metadata={"format": "pt"})
    assert torch.equal(load_file(str(path))["a"], torch.arange(6.0).reshape(2, 3))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


@pytest.mark.parametrize("what", ["safetensors", "text"])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, what):
    path = tmp_path / "f"
    path.write_bytes(b"old")

    def dies_half_way(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt  # a signal mid-write

    with pytest.raises(KeyboardInterrupt):
        _files.write_complete_or_absent(path, dies_half_way)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
    # the real writers fail the same way: a tensor safetensors refuses, a write the disk refuses
    if what == "safetensors":
        with pytest.raises(Exception):
            _files.atomic_save_safetensors(path, {"a": torch.ones(4)[::2]})  # not contiguous
    else:
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
        with pytest.raises(OSError, match="No space"):
            _files.atomic_write_text(path, "new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_the_file_and_the_rename_are_flushed_to_disk(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def record(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    _files.atomic_write_text(tmp_path / "a.json", "{}")
    assert synced == [str((tmp_path / ".a.json.tmp").resolve()), str(tmp_path.resolve())]
    assert (tmp_path / "a.json").read_text() == "{}"
