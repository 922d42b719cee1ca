"""Atomic writers: on any failure the target is untouched, no temp file is left, and the
``OSError`` names the target (the real write call failing: a file-size limit gives EFBIG)."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import resource
from pathlib import Path

import pytest
import torch

from coorddet.fileio import write_atomic, write_json_atomic, write_text_atomic

pytestmark = pytest.mark.robustness


@contextlib.contextmanager
def file_size_limit(size: int):
    """Writes past ``size`` bytes fail with EFBIG (Python ignores SIGXFSZ) in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_writes_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    write_json_atomic(path, {"x": 1})
    write_text_atomic(path, "second\n")
    assert path.read_text() == "second\n" and sorted(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("kind", ["text", "torch.save"])
def test_a_failed_write_names_the_target_and_leaves_it_whole(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"old")
    big = {"weights": torch.zeros(100_000)}
    write = {
        "text": lambda file: file.write(b"x" * 100_000),
        "torch.save": lambda file: torch.save(big, file),  # its RuntimeError hides the cause
    }[kind]
    with file_size_limit(10_000), pytest.raises(OSError) as failed:
        write_atomic(path, write)
    assert failed.value.errno == errno.EFBIG and failed.value.filename == str(path)
    assert path.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [path]


def test_an_unwritable_folder_names_the_target(tmp_path: Path) -> None:
    path = tmp_path / "gone" / "metrics.json"
    with pytest.raises(FileNotFoundError) as failed:
        write_json_atomic(path, {})
    assert failed.value.filename == str(path)


def test_other_errors_pass_unchanged_and_clean_up(tmp_path: Path) -> None:
    def broken(file) -> None:
        file.write(b"half")
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        write_atomic(tmp_path / "x", broken)
    assert list(tmp_path.iterdir()) == []


def test_write_json_atomic_can_refuse_nan(tmp_path):
    write_json_atomic(tmp_path / "ok.json", {"map": None}, allow_nan=False)
    assert json.loads((tmp_path / "ok.json").read_text()) == {"map": None}
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "nan.json", {"map": math.nan}, allow_nan=False)
    assert not (tmp_path / "nan.json").exists()
