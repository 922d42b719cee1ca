"""What a box's category means: the digit (``--labels digit``, the default) or where it lies
(``--labels position``, a task only absolute position can solve).

``position``: the canvas is split at ``size / 2`` on both axes into four regions, and a box's
category is the region holding its centre ``(x + w / 2, y + h / 2)`` (a box ``[x, y, w, h]``
covers pixels ``x .. x + w - 1``, so its centre is in continuous pixel coordinates):
``top-left`` (id 1), ``top-right`` (2), ``bottom-left`` (3), ``bottom-right`` (4). A box whose
centre lies within :data:`BOUNDARY_MARGIN` px of a split line (``|centre - size / 2| <= 2`` on
either axis) could go either way by a pixel, so it is a crowd annotation (``iscrowd: 1``):
neither trained on nor scored. Nothing in a digit's look tells its category.
"""

from __future__ import annotations

import numpy as np

LABELINGS = ("digit", "position")
POSITION_NAMES = ("top-left", "top-right", "bottom-left", "bottom-right")
BOUNDARY_MARGIN = 2.0  # px from a split line within which a box centre makes a crowd box


def categories(labels: str) -> list[dict]:
    """The COCO ``categories`` list for ``labels``."""
    if labels == "position":
        return [
            {"id": index + 1, "name": name, "supercategory": "region"}
            for index, name in enumerate(POSITION_NAMES)
        ]
    return [{"id": digit + 1, "name": str(digit), "supercategory": "digit"} for digit in range(10)]


def category_ids(
    labels: str, boxes: list[list[int]], digits: list[int], size: int
) -> tuple[list[int], list[int]]:
    """Category ids and ``iscrowd`` flags (0/1) of one canvas's boxes (``[x, y, w, h]`` pixels)
    of digits ``digits`` on a ``size`` x ``size`` canvas."""
    if labels != "position":
        return [digit + 1 for digit in digits], [0] * len(digits)
    if not boxes:
        return [], []
    xywh = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    centre_x = xywh[:, 0] + xywh[:, 2] / 2
    centre_y = xywh[:, 1] + xywh[:, 3] / 2
    half = size / 2
    ids = 1 + (centre_x >= half).astype(int) + 2 * (centre_y >= half).astype(int)
    near = (np.abs(centre_x - half) <= BOUNDARY_MARGIN) | (
        np.abs(centre_y - half) <= BOUNDARY_MARGIN
    )
    return ids.tolist(), near.astype(int).tolist()


def rule(labels: str) -> str | None:
    """The labelling rule in words, for ``dataset.json`` (None for digit labels)."""
    if labels != "position":
        return None
    names = ", ".join(f"{index + 1} = {name}" for index, name in enumerate(POSITION_NAMES))
    return (
        "category = the 2x2 region of the canvas (split at size / 2) holding the box centre "
        f"(x + w / 2, y + h / 2): {names}; a box whose centre lies within "
        f"{BOUNDARY_MARGIN:g} px of a split line (|centre - size / 2| <= {BOUNDARY_MARGIN:g} on "
        "either axis) is iscrowd 1: neither trained on nor scored"
    )
