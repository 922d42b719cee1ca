"""Box formats: COCO's ``[x, y, w, h]`` and torchvision's ``[x1, y1, x2, y2]``, in pixels.

The one place where boxes change format: reading COCO annotations (:mod:`coorddet.data`),
ground truth for the metrics (:mod:`coorddet.metrics`), and COCO results in and out
(:mod:`coorddet.predictions`). Both functions take a ``(..., 4)`` NumPy array or torch tensor
and return a new one of the same kind, dtype and shape; the arithmetic happens in that dtype
(``x2 = x + w``, ``w = x2 - x1``), so float32 boxes stay float32 and float64 results are
rounded only where the caller casts them.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

Boxes = TypeVar("Boxes", np.ndarray, torch.Tensor)


def xywh_to_xyxy(boxes: Boxes) -> Boxes:
    """``(..., 4)`` ``[x, y, w, h]`` -> ``(..., 4)`` ``[x1, y1, x2, y2]``."""
    corner, size = boxes[..., :2], boxes[..., 2:]
    return _join(boxes, corner, corner + size)


def xyxy_to_xywh(boxes: Boxes) -> Boxes:
    """``(..., 4)`` ``[x1, y1, x2, y2]`` -> ``(..., 4)`` ``[x, y, w, h]``."""
    corner, far = boxes[..., :2], boxes[..., 2:]
    return _join(boxes, corner, far - corner)


def _join(like: Boxes, first: Boxes, second: Boxes) -> Boxes:
    if isinstance(like, torch.Tensor):
        return torch.cat([first, second], dim=-1)
    return np.concatenate([first, second], axis=-1)
