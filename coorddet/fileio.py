"""Atomic file writes: a reader (or a killed run) sees the old file or the new one, never half.

Every writer here writes once, into the hidden temp file ``.NAME.tmp`` beside the target (same
folder, so same disk: no second copy), then renames it over the target. On any failure the temp
file is removed, the target is left as it was, and an ``OSError`` names the target: the one
line :func:`coorddet.cli.report_errors` prints (``error: cannot write FILE: No space left on device``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO


class _Recorder(io.RawIOBase):
    """A writable file that remembers the ``OSError`` of a failed write.

    ``torch.save`` turns a failed write of its file object into a ``RuntimeError``; this keeps
    the real cause (``ENOSPC``, ``EFBIG``, ...) to re-raise.
    """

    def __init__(self, file: BinaryIO) -> None:
        super().__init__()
        self.file = file
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:  # type: ignore[override]
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise


def named(error: OSError, path: str | os.PathLike) -> OSError:
    """``error`` with ``path`` as its file name (``write`` failures come without one)."""
    return OSError(error.errno, error.strerror or str(error), os.fspath(path))


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write(file)`` into ``.NAME.tmp`` beside ``path``, fsync, rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    recorder = None
    try:
        with open(tmp, "wb") as file:
            recorder = _Recorder(file)
            write(recorder)  # type: ignore[arg-type]
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        cause = recorder.error if recorder is not None and recorder.error else error
        if isinstance(cause, OSError):
            raise named(cause, path) from None
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) atomically."""
    write_atomic(path, lambda file: file.write(text.encode()))


def write_json_atomic(path: Path, data: Any, *, allow_nan: bool = True) -> None:
    """``data`` as indented JSON, written atomically. ``allow_nan=False``: a NaN or infinity
    raises ``ValueError`` (write ``None``, JSON's ``null``, for undefined values)."""
    write_text_atomic(path, json.dumps(data, indent=2, allow_nan=allow_nan) + "\n")


def write_csv_atomic(path: Path, fieldnames: list[str], rows: Iterable[dict[str, Any]]) -> None:
    """A CSV file with a header and ``rows``, written atomically."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())
