"""Instance masks as COCO RLEs: checked, converted, encoded and decoded in one place.

A COCO ``segmentation`` takes one of three forms: polygons ``[[x1, y1, x2, y2, ...], ...]``
(pixels), an uncompressed RLE ``{"size": [h, w], "counts": [int, ...]}`` or pycocotools'
compressed RLE ``{"size": [h, w], "counts": str}`` (what ``data_gen`` writes and predictions
carry). Run lengths count pixels in column-major order, starting with a run of zeros.

Every form read from a file is checked here before pycocotools touches it, so a malformed one
is :class:`coorddet.errors.UserError` naming where it came from, not a ``ValueError`` from
pycocotools' C code (older pycocotools versions' decoder trusted the counts and could write
past the mask).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from coorddet.errors import UserError
from coorddet.validate import is_int, is_number

RLE = dict[str, Any]  # {"size": [h, w], "counts": str}


def encode(masks: torch.Tensor | np.ndarray) -> list[RLE]:
    """``(N, H, W)`` bool or uint8 masks -> N compressed RLEs, JSON-ready (``counts`` a str)."""
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().to("cpu", torch.uint8).numpy()
    if len(masks) == 0:
        return []
    # pycocotools takes (H, W, N) uint8 in Fortran order: each mask column-major
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0), dtype=np.uint8))
    return [{"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")} for rle in rles]


def decode(counts: list[bytes], height: int, width: int) -> np.ndarray:
    """Checked compressed counts of one ``height x width`` image -> ``(N, H, W)`` uint8 masks."""
    if not counts:
        return np.zeros((0, height, width), dtype=np.uint8)
    rles = [{"size": [height, width], "counts": c} for c in counts]
    return np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1))


def mask_box(rle: RLE) -> list[float]:
    """A checked RLE's tight box ``[x, y, w, h]``, pixels (all zeros for an empty mask)."""
    return mask_utils.toBbox(rle).tolist()


def rle_counts(segmentation: Any, height: int, width: int, where: str) -> bytes:
    """The compressed RLE counts of any COCO ``segmentation`` form for a ``height x width``
    image, checked (polygons are rasterized and merged as ``COCO.annToRLE`` does)."""
    if not isinstance(segmentation, list):
        return check_rle(segmentation, where, size=(height, width))["counts"].encode("ascii")
    _check_polygons(segmentation, where)
    if not segmentation:
        return _empty_counts(height, width)
    return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))["counts"]


def check_segmentation(segmentation: Any, height: int, width: int, where: str) -> None:
    """UserError unless ``segmentation`` is a well-formed COCO segmentation of a
    ``height x width`` image (any of the three forms)."""
    if isinstance(segmentation, list):
        _check_polygons(segmentation, where)
    else:
        check_rle(segmentation, where, size=(height, width))


def check_rle(rle: Any, where: str, *, size: tuple[int, int] | None = None) -> RLE:
    """``rle`` (compressed or uncompressed) as a checked compressed RLE ``{"size", "counts"}``.

    ``size``: the ``(height, width)`` it must have (its image's); ``None``: any.
    """
    if not (isinstance(rle, dict) and "size" in rle and "counts" in rle):
        raise UserError(
            f"{where}: segmentation must be a COCO RLE {{'size': [h, w], 'counts': ...}}, "
            f"got {_short(rle)}"
        )
    shape = rle["size"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(is_int(v) for v in shape)):
        raise UserError(f"{where}: RLE 'size' must be [height, width], got {_short(shape)}")
    height, width = shape
    if size is not None and (height, width) != tuple(size):
        raise UserError(
            f"{where}: RLE size [{height}, {width}] is not its image's [{size[0]}, {size[1]}]"
        )
    if height < 1 or width < 1:
        raise UserError(f"{where}: RLE 'size' must be positive, got {shape}")
    counts = rle["counts"]
    if isinstance(counts, bytes):  # pycocotools' own RLEs (COCOeval converts polygons in place)
        counts = counts.decode("ascii", errors="replace")
    if isinstance(counts, list):  # uncompressed: plain run lengths
        if not all(is_int(c) and c >= 0 for c in counts) or sum(counts) != height * width:
            raise UserError(
                f"{where}: RLE counts must be run lengths >= 0 summing to {height} x {width}"
            )
        compressed = mask_utils.frPyObjects(dict(rle), height, width)["counts"].decode("ascii")
        return {"size": [height, width], "counts": compressed}
    if not isinstance(counts, str) or _run_lengths_total(counts) != height * width:
        raise UserError(
            f"{where}: RLE counts must be a pycocotools string of run lengths summing to "
            f"{height} x {width}, got {_short(counts)}"
        )
    return {"size": [height, width], "counts": counts}


def _run_lengths_total(counts: str) -> int | None:
    """The sum of the run lengths a compressed counts string holds (pycocotools' rleFrString),
    or ``None`` when it is malformed (a character outside '0'..'o', a cut run, a negative run)."""
    total, position, runs = 0, 0, []
    codes = counts.encode("ascii", errors="replace")
    while position < len(codes):
        value, shift, more = 0, 0, True
        while more:
            if position == len(codes) or not 48 <= codes[position] < 112 or shift > 60:
                return None
            code = codes[position] - 48
            value |= (code & 0x1F) << shift
            more = code & 0x20
            position += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]  # runs after the third are stored as differences
        if value < 0:
            return None
        runs.append(value)
        total += value
    return total


def _check_polygons(polygons: list, where: str) -> None:
    for polygon in polygons:
        if not (
            isinstance(polygon, list)
            and len(polygon) >= 6  # three points; pycocotools reads four numbers as a box
            and len(polygon) % 2 == 0
            and all(is_number(v) for v in polygon)
        ):
            raise UserError(
                f"{where}: each polygon must be a list of x, y pixel pairs, got {_short(polygon)}"
            )


def _empty_counts(height: int, width: int) -> bytes:
    return mask_utils.encode(np.zeros((height, width, 1), dtype=np.uint8, order="F"))[0]["counts"]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
