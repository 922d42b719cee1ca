"""One writer per output folder: ``with hold_folder(out, error=UserError): ...`` or a one-line
refusal naming the process that holds it.

The lock is filelock's ``FileLock`` (``flock``) on the hidden file ``.NAME.lock`` beside the
folder (beside, not inside: it exists before the folder does, and outlives the folder being
replaced by a staged copy, deleted by ``--overwrite`` or removed by hand). The kernel drops a
flock when its holder ends in any way, SIGKILL and reboot included, so a lock file left behind
is free and is taken over without asking. The holder writes its pid and command into the file
(filelock opens it without truncating, so a refused contender leaves them) only to make the
refusal readable, and removes the file on release while it still holds it; filelock refuses an
inode removed before its flock succeeded, and :func:`hold_folder` then locks the path's new file.

Why filelock: it already does the flock, the forked children (DataLoader and pool workers drop
the inherited descriptor, so none keeps a dead parent's folder locked) and the removed-inode
check; it cannot name the holder in its refusal nor remove the file on release, which is all
this module adds. On a file system without flock (Lustre mounted without ``-o flock``, NFS
without its lock service: flock fails with ENOLCK, EOPNOTSUPP or ENOSYS) the folder is not
locked: one warning line on stderr says so and the tool runs. A package of its own because ``coorddet`` and ``data_gen`` never import each
other: ``coorddet.locking`` and ``data_gen.locking`` bind it to their ``UserError``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import filelock


def lock_path(folder: str | os.PathLike) -> Path:
    """``/abs/real/parent/.NAME.lock`` for ``folder`` (symlinks resolved: one lock per folder)."""
    real = Path(os.path.realpath(folder))
    return real.parent / f".{real.name or 'root'}.lock"


@contextlib.contextmanager
def hold_folder(
    folder: str | os.PathLike, *, error: type[Exception], flag: str = "--out"
) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (which need not exist yet) for the ``with`` block.

    Raises ``error`` (the caller's user-error type) naming the folder and the holder when
    another process, or another ``hold_folder`` of this one, has it; ``flag`` is the option the
    user would change. Creates the folder's parent if missing. Yields the lock file's path.
    """
    path = lock_path(folder)
    if not filelock.has_fcntl:  # Windows: no flock, so folders are not locked there
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(
        path, mode=0o644, blocking=False, fallback_to_soft=False, on_acquired=_write_holder
    )
    existed = path.exists()
    try:
        holder = _acquire(lock, path)
    except (OSError, NotImplementedError) as failure:
        if not _no_flock(failure):
            raise
        # A file system without flock (Lustre mounted without -o flock, NFS without its lock
        # service): run unlocked, and say so, rather than refuse to run at all.
        print(
            f"warning: {folder} is not locked against a second writer: {path.parent} does not "
            f"support flock ({_reason(failure)}); run one process per folder yourself",
            file=sys.stderr,
            flush=True,
        )
        try:
            yield path
        finally:
            if not existed:  # the lock file the failed attempt created
                with contextlib.suppress(OSError):
                    os.unlink(path)
        return
    if holder is not None:
        raise error(f"{folder} is in use by {holder}; wait for it or choose another {flag}")
    owner = os.getpid()
    try:
        yield path
    finally:
        if os.getpid() == owner:  # never from a forked child unwinding this frame
            with contextlib.suppress(OSError):
                os.unlink(path)  # while still locked: nobody else can be holding this inode
            lock.release()


def _acquire(lock: filelock.BaseFileLock, path: Path) -> str | None:
    """Take ``lock`` (on ``path``) without waiting: None once held, else who holds it."""
    while True:
        try:
            lock.acquire()
            return None
        except filelock.Timeout:
            holder = _holder(path)
            if holder is not None:
                return holder
            # its holder released and removed it meanwhile: lock the path's new file


_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _no_flock(failure: BaseException) -> bool:
    """Whether ``failure`` (or the error it was raised from) says flock is not supported."""
    while failure is not None:
        if isinstance(failure, NotImplementedError):
            return True
        if isinstance(failure, OSError) and failure.errno in _NO_FLOCK:
            return True
        failure = failure.__cause__ or failure.__context__
    return False


def _reason(failure: BaseException) -> str:
    cause = failure.__cause__ or failure.__context__
    if isinstance(failure, OSError) or not isinstance(cause, OSError):
        return getattr(failure, "strerror", None) or str(failure) or type(failure).__name__
    return cause.strerror or str(cause)


def _write_holder(fd: int) -> None:
    """filelock's ``on_acquired``: ``PID COMMAND`` into the freshly locked file."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {shlex.join(sys.argv) or sys.executable}\n".encode(), 0)


def _holder(path: Path) -> str | None:
    """``process PID (COMMAND)`` from the lock file, as its holder wrote it; None when the file
    is gone."""
    try:
        with open(path, "rb") as file:
            text = file.read(4096).decode(errors="replace").strip()
    except FileNotFoundError:
        return None
    except OSError:
        text = ""
    pid, _, command = text.partition(" ")
    if not pid.isdigit():
        return "another process"
    return f"process {pid} ({command})" if command else f"process {pid}"
