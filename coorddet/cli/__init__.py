"""Shared command-line plumbing: one-line errors, no tracebacks.

Exit code 2: a user mistake (:class:`UserError`: a bad flag, file or value, a folder in use).
Exit code 1: a fault (a write failed: no space, permission denied, read-only file system, a
folder removed meanwhile), reported as ``error: cannot write FILE: REASON``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from coorddet.errors import UserError
from coorddet.system import fix_threads

USER_ERROR_EXIT = 2
FAULT_EXIT = 1
_WORKER_TRACEBACK = "DataLoader worker process"  # torch's ExceptionWrapper.reraise message


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` that reports a bad flag on a single line (no usage block), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USER_ERROR_EXIT, f"{self.prog}: error: {message}\n")


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N``, the same in every command (:func:`threads_option` reads it)."""
    parser.add_argument(
        "--threads", type=int, metavar="N",
        help="torch threads per process for the whole run, as OMP_NUM_THREADS=N (default: the "
        "cores other processes leave free, re-checked every 2 s; a fixed count repeats a "
        "run's float rounding whatever the machine's load)",
    )  # fmt: skip


def add_trust_option(parser: argparse.ArgumentParser) -> None:
    """``--trust-checkpoint``, the same in every command that loads a checkpoint."""
    parser.add_argument(
        "--trust-checkpoint", action="store_true",
        help="allow checkpoints that hold Python objects (can run code when loaded); only for "
        "files you trust",
    )  # fmt: skip


def threads_option(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Apply ``--threads`` (:func:`coorddet.system.fix_threads`); a count below 1 is a usage
    error."""
    if args.threads is None:
        return
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    fix_threads(args.threads)


def report_errors(
    command: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None
) -> int:
    """Call ``command(argv)``; a :class:`UserError` becomes one line on stderr and exit code 2, an
    ``OSError`` (a failed write) one line and exit code 1, Ctrl-C ``interrupted`` and 130.

    Only errors: each command's ``main`` sets up the process
    (:func:`coorddet.system.configure_process`) before calling this.
    """
    try:
        return command(argv)
    except (UserError, OSError) as error:
        line, code = one_line(error)
        print(line, file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def one_line(error: BaseException) -> tuple[str, int]:
    """The line :func:`report_errors` prints for ``error`` and the exit code; ``("", 0)`` for errors that
    keep their traceback (programming errors)."""
    if isinstance(error, UserError):
        message = str(error)
        if _WORKER_TRACEBACK in message:  # raised in a DataLoader worker: torch re-raises it
            # with the worker's traceback as its message, whose last line is the original
            message = message.rsplit(f"{UserError.__name__}: ", 1)[-1]
        message = " ".join(message.split())  # one line, whatever the message held
        return f"error: {message}", USER_ERROR_EXIT
    if isinstance(error, OSError):
        return f"error: {describe_os_error(error)}", FAULT_EXIT
    return "", 0


def describe_os_error(error: OSError) -> str:
    """``cannot write FILE: REASON`` for the first ``OSError`` of a chain.

    The first: a failed save is often followed by a failed log flush while Lightning shuts
    down, and the flush's error has the first as its context.
    """
    while True:
        earlier = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if not isinstance(earlier, OSError):
            break
        error = earlier
    reason = error.strerror or str(error)
    return f"cannot write {error.filename}: {reason}" if error.filename else reason
