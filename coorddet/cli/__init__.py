"""Shared command-line plumbing: one-line errors with exit code 2, no tracebacks."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from coorddet.errors import UserError
from coorddet.system import configure_memory

USER_ERROR_EXIT = 2


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` that reports a bad flag on a single line (no usage block), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USER_ERROR_EXIT, f"{self.prog}: error: {message}\n")


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)``; a :class:`UserError` becomes one line on stderr and exit code 2.

    Large CPU tensors use transparent huge pages and freed memory is reused
    (:func:`coorddet.system.configure_memory`).
    """
    configure_memory()
    try:
        return main(argv)
    except UserError as error:
        message = " ".join(str(error).split())  # one line, whatever the message held
        print(f"error: {message}", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
