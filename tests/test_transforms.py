"""Augmentation policies: names, what "digits" may do to a canvas, and what it must never do."""

from __future__ import annotations

import numpy as np
import pytest

from coorddet.transforms import MIN_VISIBILITY, POLICIES, build_transforms, reseed

SIZE = 64
# Things that change a digit's identity (a mirrored 2, a turned 6 or 9).
FORBIDDEN = {
    "HorizontalFlip",
    "VerticalFlip",
    "Transpose",
    "D4",
    "Rotate",
    "SafeRotate",
    "RandomRotate90",
    "ShiftScaleRotate",
    "Perspective",
    "ElasticTransform",
    "GridDistortion",
    "OpticalDistortion",
}


def canvas(boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """A black (SIZE, SIZE) uint8 canvas with a white filled rectangle per COCO xywh box."""
    image = np.zeros((SIZE, SIZE), dtype=np.uint8)
    for x, y, w, h in boxes:
        image[y : y + h, x : x + w] = 255
    return image


def run(transform, boxes, labels):
    out = transform(
        image=canvas(boxes),
        bboxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.array(labels, dtype=np.int64),
    )
    return out["image"], np.asarray(out["bboxes"]).reshape(-1, 4), list(out["labels"])


def test_policy_names():
    assert POLICIES == ("none", "digits")
    assert build_transforms("none") is None
    assert callable(build_transforms("digits"))


@pytest.mark.parametrize("name", ["", "Digits", "flip", "default"])
def test_unknown_policy_lists_valid_names(name):
    with pytest.raises(ValueError, match=r"unknown augmentation policy.*none, digits"):
        build_transforms(name)


def test_digits_policy_has_no_flips_rotations_or_shear():
    transform = build_transforms("digits")
    names = {type(t).__name__ for t in transform.transforms}
    assert names.isdisjoint(FORBIDDEN), names & FORBIDDEN
    (affine,) = [t for t in transform.transforms if type(t).__name__ == "Affine"]
    assert tuple(affine.rotate) == (0.0, 0.0)
    assert all(tuple(r) == (0.0, 0.0) for r in affine.shear.values())
    assert affine.keep_ratio  # same zoom on both axes


def test_digits_policy_moves_boxes_only_a_little_and_keeps_their_shape():
    """A blob in the top-left quadrant stays there: a flip or rotation would move it far."""
    transform = build_transforms("digits", seed=0)
    box = (8, 10, 12, 16)
    center = np.array([box[0] + box[2] / 2, box[1] + box[3] / 2])
    for _ in range(100):
        _, boxes, _ = run(transform, [box], [3])
        (x, y, w, h) = boxes[0]
        # |shift| <= 8% of 64 px, zoom 0.9-1.1 about the centre (32 px away at most)
        assert np.abs(np.array([x + w / 2, y + h / 2]) - center).max() <= 0.08 * SIZE + 0.1 * 32
        assert w / h == pytest.approx(box[2] / box[3], rel=1e-3)
        assert 0.9 * box[2] - 1e-3 <= w <= 1.1 * box[2] + 1e-3


def test_boxes_stay_tight_around_the_drawn_pixels():
    """Whatever the augmentation does to the pixels, it does to the boxes too."""
    transform = build_transforms("digits", seed=1)
    boxes_in = [(3, 3, 10, 14), (40, 30, 14, 12), (50, 50, 14, 14)]
    checked = 0
    for _ in range(100):
        image, boxes, labels = run(transform, boxes_in, [1, 2, 3])
        for (x, y, w, h), label in zip(boxes, labels, strict=True):
            src = boxes_in[label - 1]
            # look only around this box: the other blobs are far away
            x0, y0 = int(max(0, x - 3)), int(max(0, y - 3))
            window = image[y0 : int(y + h) + 3, x0 : int(x + w) + 3] > 127
            ys, xs = np.nonzero(window)
            found = np.array([xs.min() + x0, ys.min() + y0, xs.max() + x0 + 1, ys.max() + y0 + 1])
            expected = np.array([x, y, x + w, y + h])
            assert np.abs(found - expected).max() <= 1.5, (src, found, expected)
            checked += 1
    assert checked > 150


def test_boxes_stay_inside_and_labels_never_change():
    transform = build_transforms("digits", seed=2)
    # boxes on every edge and corner, so shifts push them out of the image
    boxes_in = [
        (0, 0, 10, 12),
        (54, 0, 10, 14),
        (0, 50, 12, 14),
        (52, 52, 12, 12),
        (26, 24, 12, 16),
    ]
    labels_in = [7, 1, 9, 4, 2]
    seen_drop = False
    for _ in range(200):
        image, boxes, labels = run(transform, boxes_in, labels_in)
        assert image.shape == (SIZE, SIZE) and image.dtype == np.uint8
        assert boxes.shape == (len(labels), 4)
        x, y, w, h = boxes.T
        assert (x >= 0).all() and (y >= 0).all()
        assert (x + w <= SIZE + 1e-4).all() and (y + h <= SIZE + 1e-4).all()
        assert (w > 0).all() and (h > 0).all()
        # labels are the input labels, in order, minus the boxes that left the image
        remaining = iter(labels_in)
        assert all(label in remaining for label in labels)
        seen_drop |= len(labels) < len(labels_in)
    assert seen_drop  # the edge boxes did get dropped sometimes


def test_mostly_hidden_box_is_dropped_with_its_label():
    """Visibility is judged on the final box (the pipeline filters only at the end)."""
    transform = build_transforms("digits", seed=3)
    kept_visible = []
    for _ in range(300):
        _, boxes, labels = run(transform, [(0, 20, 10, 10), (30, 30, 10, 10)], [5, 6])
        assert 6 in labels
        if 5 in labels:
            kept_visible.append(boxes[labels.index(5)][2] * boxes[labels.index(5)][3])
    # a kept corner box shows at least MIN_VISIBILITY of its (zoomed, <= 1.1^2 x) area
    assert min(kept_visible) >= MIN_VISIBILITY * 100 * 0.9**2 - 1e-3
    assert len(kept_visible) < 300


def test_all_boxes_dropped_gives_empty_arrays():
    transform = build_transforms("digits", seed=4)
    for _ in range(200):
        _, boxes, labels = run(transform, [(0, 0, 5, 5)], [8])
        if not labels:
            assert boxes.shape == (0, 4)
            return
    pytest.fail("the corner box was never dropped")


def test_seed_makes_the_augmentations_reproducible():
    def draws(transform):
        return [run(transform, [(20, 20, 12, 14)], [3]) for _ in range(20)]

    first, second = (
        draws(build_transforms("digits", seed=7)),
        draws(build_transforms("digits", seed=7)),
    )
    for (img_a, box_a, lab_a), (img_b, box_b, lab_b) in zip(first, second, strict=True):
        np.testing.assert_array_equal(img_a, img_b)
        np.testing.assert_array_equal(box_a, box_b)
        assert lab_a == lab_b
    other = draws(build_transforms("digits", seed=8))
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other, strict=True))

    transform = build_transforms("digits", seed=123)
    reseed(transform, 7)  # restarts the stream: same as a fresh seed-7 pipeline
    np.testing.assert_array_equal(draws(transform)[5][0], first[5][0])


def test_reseed_refuses_other_callables():
    with pytest.raises(TypeError):
        reseed(lambda **kw: kw, 0)
