"""Place digits on one canvas and compute tight boxes. Pure: a ``np.random.Generator`` in,
arrays out; no files.

The recipe (defaults reproduce the CoordConv paper's field-of-MNIST setup):

1. Draw the number of digits, then each digit from the pool and its height and width
   independently from ``digit_size`` (inclusive range, pixels).
2. Crop the digit's 28x28 image to its ink (pixels > :data:`INK_THRESHOLD`) and resize the
   crop to (height, width) with PIL bilinear resampling.
3. Paste it at a random position on a ``crop_from`` x ``crop_from`` field that is then
   centre-cropped to ``canvas_size`` (offset ``(crop_from - canvas_size) // 2``), so digits
   can be cut by the border. ``crop_from == 0`` means no field: every digit lies fully
   inside the canvas.
4. A digit keeping less than ``min_visible`` of its ink pixels after the crop is erased
   (never drawn, never annotated). Overlapping digits combine by clipped sum:
   ``canvas = min(sum of digit layers, 255)``.

Two kinds of boxes (``CanvasSpec.boxes``):

- ``visible`` (the default): the tight box of the digit's visible ink, below.
- ``placement``: the released CoordConv loader's ground truth (``field_of_mnist/loader.py``,
  ``generate_dataset``): the rectangle the resized digit was pasted into, shifted by the crop
  offset and *not* clipped, so it may lie partly or wholly outside the canvas. Every digit is
  kept and annotated, however little of it (or none) the crop leaves; ``min_visible`` does
  not apply. One difference from the loader: sizes and positions are whole pixels (h, w drawn
  uniformly from the integers of ``digit_size``), where the loader draws real numbers and
  pastes with a sub-pixel affine transform.

Visible boxes are the tight box of each digit's *visible* ink, computed on that digit's own layer
(so overlapping digits never merge boxes): ``[x, y, w, h]`` in pixels, ``x, y`` the
top-left ink pixel, ``w, h`` pixel counts (a one-pixel digit has ``w = h = 1``). Every
box edge row/column therefore contains a pixel > :data:`INK_THRESHOLD` of that digit, and
so of the final canvas.

Masks (``Canvas.masks``) are the same visible ink as pixels: a digit's own layer >
:data:`INK_THRESHOLD` inside the canvas. Digits are summed, never painted over each other, so
no digit hides another's ink and masks of overlapping digits overlap. A visible box is its
mask's tight box; a placement box keeps its rectangle while its mask is the ink the crop left
(empty for a digit wholly outside).

Regions (``--split-mode quadrant``): the canvas is split at ``canvas_size / 2``. For
``HELDOUT_QUADRANT`` (bottom-right) both the paste box centre and the visible box centre
lie strictly right of and below the split, also in pixel-index terms (``x + (w - 1) / 2``).
For ``THREE_QUADRANTS`` they lie strictly above or strictly left of it (``x + w / 2``),
inside the canvas: top-left, top-right or bottom-left, never bottom-right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from data_gen.errors import UserError

INK_THRESHOLD = 0  # ink = value > 0; fixed (PIL getbbox, used below, assumes it)
DIGIT_TRIES = 100  # random positions tried per digit before the canvas attempt fails
CANVAS_ATTEMPTS = 10  # fresh draws of the whole canvas before giving up
ANYWHERE, THREE_QUADRANTS, HELDOUT_QUADRANT = "anywhere", "three_quadrants", "heldout_quadrant"
VISIBLE, PLACEMENT = "visible", "placement"
BOX_KINDS = (VISIBLE, PLACEMENT)
_QUADRANT_HALVES = ((False, False), (True, False), (False, True))  # (x high, y high): TL, TR, BL


class PlacementError(UserError):
    """The digits do not fit under the requested constraints."""


@dataclass(frozen=True)
class CanvasSpec:
    """How to lay out one canvas; ranges are inclusive ``(low, high)``; sizes in pixels."""

    canvas_size: int = 64
    digits_per_image: tuple[int, int] = (5, 5)
    digit_size: tuple[int, int] = (15, 25)
    crop_from: int = 120
    max_iou: float = 1.0
    min_visible: float = 0.25
    region: str = ANYWHERE
    boxes: str = VISIBLE  # or PLACEMENT: the released loader's unclipped paste rectangles


@dataclass(frozen=True)
class Canvas:
    """One rendered canvas.

    ``image``: (S, S) uint8. ``boxes``: (K, 4) int64 ``[x, y, w, h]`` pixels: visible ink, or
    the unclipped paste rectangle (``CanvasSpec.boxes == PLACEMENT``).
    ``labels``: (K,) int64 digits 0..9. ``source_indices``: (K,) int64 rows of the source.
    ``masks``: (K, S, S) bool, each digit's visible ink (its own layer > ``INK_THRESHOLD``).
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    source_indices: np.ndarray
    masks: np.ndarray


class DigitBank:
    """Source digits ready to paste: each digit's ink crop as a PIL image, built lazily.

    ``images``: (N, H, W) uint8 white-on-black digits; ``labels``: (N,) int digits 0..9.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.ink = ink_boxes(images)
        self._crops: dict[int, Image.Image] = {}

    def crop(self, index: int) -> Image.Image:
        """The ink crop of digit ``index`` (mode "L")."""
        crop = self._crops.get(index)
        if crop is None:
            top, bottom, left, right = self.ink[index].tolist()
            pixels = np.ascontiguousarray(self.images[index, top:bottom, left:right])
            crop = self._crops[index] = Image.fromarray(pixels)
        return crop


def ink_boxes(images: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 digits -> (N, 4) int64 ``[top, bottom, left, right)`` of their ink.

    A digit without ink gets ``[0, 0, 0, 0]``.
    """
    ink = images > INK_THRESHOLD
    rows, cols = ink.any(axis=2), ink.any(axis=1)
    height, width = images.shape[1:]
    top, left = rows.argmax(axis=1), cols.argmax(axis=1)
    bottom = height - rows[:, ::-1].argmax(axis=1)
    right = width - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([top, bottom, left, right], axis=1).astype(np.int64)
    boxes[~rows.any(axis=1)] = 0
    return boxes


def render_canvas(
    rng: np.random.Generator, spec: CanvasSpec, *, bank: DigitBank, pool: np.ndarray
) -> Canvas:
    """Draw one canvas from the digits ``pool`` (source indices into ``bank``).

    Raises :class:`PlacementError` when ``CANVAS_ATTEMPTS`` fresh draws all fail to place
    some digit within ``DIGIT_TRIES`` positions.
    """
    for _ in range(CANVAS_ATTEMPTS):
        canvas = _attempt(rng, spec, bank, pool)
        if canvas is not None:
            return canvas
    lo, hi = spec.digit_size
    where = " in --split-mode quadrant" if spec.region != ANYWHERE else ""
    raise PlacementError(
        f"could not place {spec.digits_per_image[1]} digits of {lo}-{hi} px on a "
        f"{spec.canvas_size}x{spec.canvas_size} canvas (--crop-from {spec.crop_from}) with "
        f"--max-iou {spec.max_iou:g}{where} in {CANVAS_ATTEMPTS} attempts of {DIGIT_TRIES} "
        "tries per digit; lower --digits-per-image or --digit-size, or raise --max-iou"
    )


def _attempt(rng, spec: CanvasSpec, bank: DigitBank, pool: np.ndarray) -> Canvas | None:
    size = spec.canvas_size
    low, high = spec.digits_per_image
    count = low if low == high else int(rng.integers(low, high + 1))
    draws = rng.random((6, count))  # digit, height, width, then (quadrant, x, y) of try 1
    chosen = pool[(draws[0] * len(pool)).astype(np.int64)].tolist()
    span = spec.digit_size[1] - spec.digit_size[0] + 1
    heights = (spec.digit_size[0] + draws[1] * span).astype(np.int64).tolist()
    widths = (spec.digit_size[0] + draws[2] * span).astype(np.int64).tolist()
    first_tries = draws[3:].T.tolist()
    total = np.zeros((size, size), dtype=np.uint16)
    placement = spec.boxes == PLACEMENT
    kept_boxes: list[tuple[int, int, int, int]] = []
    kept_digits: list[int] = []
    kept_ink: list[tuple[int, int, np.ndarray] | None] = []  # (top, left, visible ink) per digit
    for index, height, width, first_try in zip(chosen, heights, widths, first_tries, strict=True):
        layer_image = layer = mask = None
        for attempt in range(DIGIT_TRIES):
            uniforms = first_try if attempt == 0 else rng.random(3).tolist()
            position = _sample_position(uniforms, spec, height, width)
            if position is None:
                continue
            x0, y0 = position
            window = _visible_window(x0, y0, height, width, size)
            cols0, cols1, rows0, rows1 = window
            outside = cols1 <= cols0 or rows1 <= rows0
            if outside and not placement:
                break  # entirely outside the canvas: erased
            if layer_image is None and not outside:
                layer_image = bank.crop(index).resize((width, height), Image.Resampling.BILINEAR)
            if placement:
                box = (x0, y0, width, height)  # the paste rectangle, kept whatever is visible
            elif window == (0, width, 0, height):  # fully visible: PIL finds the ink box
                ink = layer_image.getbbox()  # nonzero pixels, i.e. INK_THRESHOLD == 0
                if ink is None:
                    break
                box = (x0 + ink[0], y0 + ink[1], ink[2] - ink[0], ink[3] - ink[1])
            else:
                if mask is None:
                    layer = np.asarray(layer_image)
                    mask = layer > INK_THRESHOLD
                box = _visible_ink_box(mask, x0, y0, window, spec.min_visible)
                if box is None:
                    break  # too little ink left inside the canvas: erased
            if not _in_region(box, spec.region, size) or _too_close(box, kept_boxes, spec.max_iou):
                continue
            kept_boxes.append(box)
            kept_digits.append(index)
            if outside:  # placement boxes only: annotated, nothing to draw, no ink
                kept_ink.append(None)
                break
            if layer is None:
                layer = np.asarray(layer_image)
            visible = layer[rows0:rows1, cols0:cols1]
            total[y0 + rows0 : y0 + rows1, x0 + cols0 : x0 + cols1] += visible
            kept_ink.append((y0 + rows0, x0 + cols0, visible > INK_THRESHOLD))
            break
        else:
            return None
    kept = np.asarray(kept_digits, dtype=np.int64)
    return Canvas(
        image=np.minimum(total, 255).astype(np.uint8),
        boxes=np.asarray(kept_boxes, dtype=np.int64).reshape(-1, 4),
        labels=bank.labels[kept],
        source_indices=kept,
        masks=_ink_masks(kept_ink, size),
    )


def _ink_masks(kept_ink: list, size: int) -> np.ndarray:
    """(K, size, size) bool: each digit's visible ink placed on the canvas (None: no ink)."""
    masks = np.zeros((len(kept_ink), size, size), dtype=bool)
    for mask, ink in zip(masks, kept_ink, strict=True):
        if ink is not None:
            top, left, visible = ink
            mask[top : top + visible.shape[0], left : left + visible.shape[1]] = visible
    return masks


def _sample_position(uniforms, spec: CanvasSpec, height: int, width: int):
    """Top-left of the paste box in canvas coordinates from three U[0, 1) numbers
    (quadrant, x, y), or None if the region leaves no room for this digit."""
    size = spec.canvas_size
    field = spec.crop_from or size
    offset = (field - size) // 2
    u_quadrant, u_x, u_y = uniforms
    if spec.region == ANYWHERE:
        x_high = y_high = None
    elif spec.region == HELDOUT_QUADRANT:
        x_high = y_high = True
    else:
        x_high, y_high = _QUADRANT_HALVES[int(u_quadrant * 3)]
    x_lo, x_hi = _axis_range(size, offset, field, width, x_high)
    y_lo, y_hi = _axis_range(size, offset, field, height, y_high)
    if x_hi < x_lo or y_hi < y_lo:
        return None
    return x_lo + int(u_x * (x_hi - x_lo + 1)), y_lo + int(u_y * (y_hi - y_lo + 1))


def _axis_range(size: int, offset: int, field: int, extent: int, high: bool | None):
    """Inclusive range of the paste start along one axis (canvas coordinates)."""
    lo, hi = -offset, field - offset - extent  # the paste box stays on the field
    if high is False:  # centre x + extent/2 in [0, size/2)
        lo, hi = max(lo, -(extent // 2)), min(hi, (size - extent + 1) // 2 - 1)
    elif high is True:  # centre x + (extent-1)/2 > size/2 and x + extent/2 < size
        lo, hi = max(lo, (size - extent + 1) // 2 + 1), min(hi, size - extent // 2 - 1)
    return lo, hi


def _visible_window(x0: int, y0: int, height: int, width: int, size: int):
    """Part of the digit layer inside the canvas: (col0, col1, row0, row1), layer coords."""
    return max(0, -x0), min(width, size - x0), max(0, -y0), min(height, size - y0)


def _visible_ink_box(mask, x0, y0, window, min_visible):
    """Tight ``(x, y, w, h)`` canvas box of the visible ink, or None if the digit is erased."""
    cols0, cols1, rows0, rows1 = window
    visible = mask[rows0:rows1, cols0:cols1]
    ink_visible = int(np.count_nonzero(visible))
    if ink_visible == 0 or ink_visible < min_visible * int(np.count_nonzero(mask)):
        return None
    rows, cols = visible.any(axis=1), visible.any(axis=0)
    top, left = int(rows.argmax()), int(cols.argmax())
    bottom, right = len(rows) - int(rows[::-1].argmax()), len(cols) - int(cols[::-1].argmax())
    return (x0 + cols0 + left, y0 + rows0 + top, right - left, bottom - top)


def _in_region(box, region: str, size: int) -> bool:
    x, y, w, h = box
    if region == HELDOUT_QUADRANT:
        return 2 * x + w - 1 > size and 2 * y + h - 1 > size
    if region == THREE_QUADRANTS:
        return 2 * x + w < size or 2 * y + h < size
    return True


def _too_close(box, kept_boxes, max_iou: float) -> bool:
    if max_iou >= 1.0:
        return False
    x, y, w, h = box
    for kx, ky, kw, kh in kept_boxes:
        inter_w = min(x + w, kx + kw) - max(x, kx)
        inter_h = min(y + h, ky + kh) - max(y, ky)
        if inter_w > 0 and inter_h > 0:
            inter = inter_w * inter_h
            if inter > max_iou * (w * h + kw * kh - inter):
                return True
    return False
