"""``with hold_folder(out): ...``: one data_gen per ``--out``, or a :class:`UserError` naming the
process that holds it.

The lock is :mod:`folderlock`, which ``coorddet`` shares (the two packages never import each
other); this module binds its refusal to data_gen's user-error type.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path

import folderlock
from data_gen.errors import UserError
from folderlock import lock_path

__all__ = ["hold_folder", "lock_path"]


def hold_folder(folder: str | os.PathLike, *, flag: str = "--out") -> AbstractContextManager[Path]:
    """:func:`folderlock.hold_folder`, refusing with :class:`UserError`."""
    return folderlock.hold_folder(folder, flag=flag, error=UserError)
