"""coorddet: CoordConv for torchvision's detectors (Liu et al. 2018, arXiv 1807.03247).

    from coorddet import AddCoords, CoordConv2d, inject_coordconv, build_model

Names are imported lazily so that the command lines can report a mistake before torch loads.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AddCoords": "coorddet.coordconv",
    "CoordConv2d": "coorddet.coordconv",
    "inject_coordconv": "coorddet.inject",
    "DEFAULT_SITES": "coorddet.inject",
    "SITES": "coorddet.inject",
    "build_model": "coorddet.models",
    "UserError": "coorddet.errors",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'coorddet' has no attribute {name!r}")
