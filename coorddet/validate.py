"""Small value checks shared by the library: "an int but not a bool, at least k" and the like.

``bool`` is a subclass of ``int`` in Python, so ``isinstance(True, int)`` holds; every check
here refuses booleans where a number is expected (a YAML ``true`` is not a batch size). The
``check_*`` functions raise ``error`` (default ``ValueError``; ``coorddet.errors.UserError``
where the value comes from a user) with one message form: ``name=value is not valid; ...``.
No torch import: the command lines use this before slow imports.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def is_int(value: Any) -> bool:
    """An ``int`` and not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any, *, finite: bool = True) -> bool:
    """An ``int`` or ``float``, not a ``bool``; with ``finite``, not NaN or infinite."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return not finite or math.isfinite(value)


def check_int(
    name: str, value: Any, minimum: int = 1, *, error: type[Exception] = ValueError
) -> int:
    """``value`` if it is an int (not a bool) ``>= minimum``, else ``error`` naming ``name``."""
    if not is_int(value) or value < minimum:
        raise error(f"{name}={value!r} is not valid; expected an integer >= {minimum}")
    return value


def check_number(
    name: str,
    value: Any,
    low: float,
    high: float = math.inf,
    *,
    error: type[Exception] = ValueError,
) -> float:
    """``float(value)`` if it is a number (not a bool) in ``[low, high]``, else ``error``."""
    if not is_number(value, finite=False) or not low <= value <= high:
        raise error(f"{name}={value!r} is not valid; expected a number in [{low}, {high}]")
    return float(value)


def check_choice(
    name: str, value: Any, valid: Iterable[Any], *, error: type[Exception] = ValueError
) -> Any:
    """``value`` if it is one of ``valid``, else ``error`` listing the valid values."""
    valid = list(valid)
    if value not in valid:
        raise error(f"{name}={value!r} is not valid; valid values: {', '.join(map(str, valid))}")
    return value
