"""One writer per output folder: ``with hold_folder(out): ...`` or a one-line refusal.

The lock is ``fcntl.flock`` on the hidden file ``.NAME.lock`` beside the folder (beside, not
inside: it exists before the folder does, and outlives the folder being replaced by a staged
copy, deleted by ``--overwrite`` or removed by hand). The kernel drops a flock when its holder
ends in any way, SIGKILL and reboot included, so a lock file left behind is free and is taken
over without asking; the holder's pid and command in the file only make the refusal readable.
The holder removes the file on release; a process that locked a removed file sees that its
inode is no longer the path's and locks the new file instead.

``coorddet/locking.py`` and ``data_gen/locking.py`` are one file but for the ``UserError``
import (``data_gen`` and ``coorddet`` never import each other); ``tests/test_locking.py`` keeps
them so.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

from data_gen.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock, so folders are not locked there
    fcntl = None  # type: ignore[assignment]


def lock_path(folder: str | os.PathLike) -> Path:
    """``/abs/real/parent/.NAME.lock`` for ``folder`` (symlinks resolved: one lock per folder)."""
    real = Path(os.path.realpath(folder))
    return real.parent / f".{real.name or 'root'}.lock"


@contextlib.contextmanager
def hold_folder(folder: str | os.PathLike, *, flag: str = "--out") -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (which need not exist yet) for the ``with`` block.

    Raises :class:`UserError` naming the folder and the holder when another process has it;
    ``flag`` is the option the user would change. Creates the folder's parent if missing.
    """
    path = lock_path(folder)
    if fcntl is None:
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, folder, flag)
    owner = os.getpid()
    _held.add(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{owner} {shlex.join(sys.argv) or sys.executable}\n".encode())
        yield path
    finally:
        if os.getpid() == owner:  # never from a forked child unwinding this frame
            _held.discard(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)  # while still locked: nobody else can be holding this inode
            os.close(fd)


# A forked child (DataLoader or pool worker) shares the lock while it has the descriptor: it
# would keep the folder locked for seconds after its parent was SIGKILLed. Children drop it.
_held: set[int] = set()


def _close_in_child() -> None:
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def _acquire(path: Path, folder: str | os.PathLike, flag: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UserError(
                f"{folder} is in use by {holder}; wait for it or choose another {flag}"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.path.samestat(os.stat(path), os.fstat(fd)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder released and removed it meanwhile: lock the path's new file


def _holder(fd: int) -> str:
    """``process PID (COMMAND)`` from the lock file, as its holder wrote it."""
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    pid, _, command = text.partition(" ")
    if not pid.isdigit():
        return "another process"
    return f"process {pid} ({command})" if command else f"process {pid}"
