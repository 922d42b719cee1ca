"""data_gen.canvas: placement, tight boxes, overlap rule, regions; pure, no files."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from data_gen.canvas import (
    HELDOUT_QUADRANT,
    THREE_QUADRANTS,
    CanvasSpec,
    DigitBank,
    PlacementError,
    ink_boxes,
    render_canvas,
)
from data_gen.errors import UserError
from data_gen.sources import load_bundled


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    import os

    previous = os.environ.get("COORDDET_CACHE")
    os.environ["COORDDET_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        source = load_bundled()
    finally:
        if previous is None:
            del os.environ["COORDDET_CACHE"]
        else:
            os.environ["COORDDET_CACHE"] = previous
    return source, DigitBank(source.images, source.labels)


def _canvases(bank, pool, spec, count=200, seed=0):
    return [
        render_canvas(np.random.default_rng([seed, i]), spec, bank=bank, pool=pool)
        for i in range(count)
    ]


def _iou(a, b):
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_ink_boxes_find_the_ink_and_mark_blank_digits():
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    images[0, 5:9, 10:20] = 7
    images[0, 12, 3] = 1
    assert ink_boxes(images).tolist() == [[5, 13, 3, 20], [0, 0, 0, 0]]


SPECS = {
    "paper": CanvasSpec(),
    "no-crop": CanvasSpec(crop_from=0),
    "no-overlap": CanvasSpec(max_iou=0.0, digits_per_image=(2, 6)),
    "keep-all-ink": CanvasSpec(min_visible=0.0, digit_size=(8, 30)),
    "quadrant-train": CanvasSpec(region=THREE_QUADRANTS),
    "quadrant-test": CanvasSpec(region=HELDOUT_QUADRANT),
}


@pytest.mark.parametrize("name", SPECS)
def test_boxes_are_tight_inside_and_cover_every_ink_pixel(bundled, name):
    source, bank = bundled
    spec = SPECS[name]
    size = spec.canvas_size
    for canvas in _canvases(bank, source.train_pool, spec):
        assert canvas.image.dtype == np.uint8 and canvas.image.shape == (size, size)
        assert len(canvas.boxes) == len(canvas.labels) == len(canvas.source_indices)
        covered = np.zeros((size, size), dtype=bool)
        for x, y, w, h in canvas.boxes.tolist():
            assert w >= 1 and h >= 1 and x >= 0 and y >= 0 and x + w <= size and y + h <= size
            ink = canvas.image[y : y + h, x : x + w] > 0
            assert ink[0].any() and ink[-1].any() and ink[:, 0].any() and ink[:, -1].any()
            covered[y : y + h, x : x + w] = True
        assert not (canvas.image[~covered] > 0).any(), "ink outside every box"
        assert (source.labels[canvas.source_indices] == canvas.labels).all()


def test_boxes_are_the_digit_ink_box_when_digits_do_not_overlap(bundled):
    """With IoU 0 a box holds only its own digit, so it is the ink box of that region."""
    source, bank = bundled
    for canvas in _canvases(bank, source.train_pool, SPECS["no-overlap"]):
        for x, y, w, h in canvas.boxes.tolist():
            rows, cols = np.nonzero(canvas.image[y : y + h, x : x + w])
            assert (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1) == (0, 0, h, w)


def test_max_iou_bounds_every_pair_of_boxes(bundled):
    source, bank = bundled
    spec = CanvasSpec(max_iou=0.1, crop_from=0, digits_per_image=(3, 5))
    for canvas in _canvases(bank, source.train_pool, spec):
        assert len(canvas.boxes) >= 3  # crop_from 0: no digit is cut or erased
        for a, b in itertools.combinations(canvas.boxes.tolist(), 2):
            assert _iou(a, b) <= 0.1


def test_quadrant_regions_hold_for_box_centres(bundled):
    source, bank = bundled
    half = 32
    for region, in_heldout in ((THREE_QUADRANTS, False), (HELDOUT_QUADRANT, True)):
        spec = CanvasSpec(region=region)
        for canvas in _canvases(bank, source.train_pool, spec, count=100):
            for x, y, w, h in canvas.boxes.tolist():
                cx, cy = x + w / 2, y + h / 2
                assert 0 <= cx < 64 and 0 <= cy < 64
                assert ((cx >= half) and (cy >= half)) == in_heldout
                # also with pixel-index centres, and never on the dividing lines
                pcx, pcy = x + (w - 1) / 2, y + (h - 1) / 2
                assert ((pcx > half) and (pcy > half)) == in_heldout


def _block_bank(value=200):
    """One 'digit' whose ink fills its whole 28x28 image, so ink area = box area."""
    return DigitBank(np.full((1, 28, 28), value, dtype=np.uint8), np.array([3]))


def test_min_visible_erases_digits_cut_too_hard():
    bank = _block_bank()
    spec = CanvasSpec(canvas_size=16, digit_size=(10, 10), crop_from=40, min_visible=0.5)
    kept = 0
    for canvas in _canvases(bank, np.array([0]), spec, count=300):
        covered = np.zeros((16, 16), dtype=bool)
        for x, y, w, h in canvas.boxes.tolist():
            assert w * h >= 50  # at least half of the 10x10 block is inside the canvas
            covered[y : y + h, x : x + w] = True
            kept += 1
        assert ((canvas.image > 0) == covered).all()  # erased digits leave no ink
    assert kept > 0


def test_overlap_combines_by_clipped_sum():
    bank = _block_bank(200)
    spec = CanvasSpec(canvas_size=32, digit_size=(12, 12), crop_from=0, digits_per_image=(4, 4))
    overlapped = 0
    for canvas in _canvases(bank, np.array([0]), spec, count=50):
        layers = np.zeros((32, 32), dtype=int)
        for x, y, w, h in canvas.boxes.tolist():
            layers[y : y + h, x : x + w] += 1
        assert (canvas.image == np.minimum(200 * layers, 255)).all()
        overlapped += int((layers > 1).any())
    assert overlapped > 0


def test_same_generator_same_canvas(bundled):
    source, bank = bundled
    first, second = (
        _canvases(bank, source.train_pool, CanvasSpec(), count=20, seed=7) for _ in range(2)
    )
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.boxes, b.boxes)


def test_digits_that_cannot_fit_raise_a_user_error(bundled):
    source, bank = bundled
    spec = CanvasSpec(canvas_size=32, crop_from=0, digit_size=(20, 20), max_iou=0.0)
    with pytest.raises(PlacementError, match="--max-iou") as caught:
        render_canvas(np.random.default_rng(0), spec, bank=bank, pool=source.train_pool)
    assert isinstance(caught.value, UserError)
