"""Named augmentation policies for digit canvases; the only albumentations import.

A policy is a callable ``transform(image=..., bboxes=..., labels=..., masks=...) -> dict`` with

- ``image``: ``(H, W)`` uint8 grayscale (returned with the same shape and dtype),
- ``bboxes``: ``(K, 4)`` float, COCO ``[x, y, w, h]`` in pixels,
- ``labels``: ``(K,)`` int, one per box,
- ``masks`` (optional, ``K >= 1``): ``(K, H, W)`` uint8 instance masks, moved as the image
  is (nearest neighbour) and never dropped,

and the same keys on return. Boxes that leave the image are clipped to it by albumentations,
and dropped when too little of them stays visible; their labels go with them. Nothing here
changes a digit's identity: no flips, rotations or shears (a mirrored 2 or a turned 6 is
another digit, or none). :func:`augment` calls a policy for one dataset item and keeps its
boxes, labels and masks aligned.

Randomness: albumentations 2.x transforms draw from their own ``numpy.random.Generator`` and
``random.Random``, never from the global ``numpy``/``random``/``torch`` state, so
``lightning.seed_everything`` does not reach them. Seed a pipeline with :func:`reseed`
(``coorddet.data`` does this per DataLoader worker).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

import numpy as np

# albumentations asks PyPI for a newer version when imported unless this is set; coorddet
# never touches the network at run time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402  (albumentations' own dependency; only for its border constant)

POLICIES: tuple[str, ...] = ("none", "digits")

# A box keeping less than this share of its area inside the image is dropped: a digit cut in
# half can read as another digit (the top of an 8 is a 0), so it must not keep its label.
MIN_VISIBILITY = 0.6
# Clipped slivers smaller than this (pixels^2) are dropped as well.
MIN_AREA = 16.0

Transform = Callable[..., dict[str, Any]]


def build_transforms(policy: str, *, seed: int | None = None) -> Transform | None:
    """Return the augmentation pipeline called ``policy`` (see :data:`POLICIES`).

    ``"none"`` returns ``None`` (no augmentation). ``"digits"`` applies, each with its own
    probability: a small shift and zoom (translate <= 8 % of the side, scale 0.9-1.1, same
    scale on both axes, no rotation or shear), brightness/contrast, Gaussian noise and a mild
    blur. ``seed`` makes the sequence of augmentations reproducible (see :func:`reseed`);
    ``None`` seeds from the OS.

    Raises:
        ValueError: ``policy`` is not one of :data:`POLICIES`.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown augmentation policy {policy!r}; valid: {', '.join(POLICIES)}")
    if policy == "none":
        return None
    transform = A.Compose(
        [
            A.Affine(
                scale=(0.9, 1.1),
                keep_ratio=True,  # one zoom for both axes: boxes keep their aspect ratio
                translate_percent=(-0.08, 0.08),
                rotate=0.0,
                shear=0.0,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,  # the canvas background is black
                p=0.7,
            ),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
            A.GaussNoise(std_range=(0.01, 0.05), p=0.3),  # std as a fraction of 255
            A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(0.3, 0.8), p=0.2),
        ],
        bbox_params=A.BboxParams(
            format="coco",
            label_fields=["labels"],
            clip=True,
            min_visibility=MIN_VISIBILITY,
            min_area=MIN_AREA,
            # Filter once at the end: only Affine moves boxes, and the visibility test still
            # compares the final box with its unclipped self (checked in tests); cheaper.
            check_each_transform=False,
        ),
    )
    if seed is not None:
        reseed(transform, seed)
    return transform


def augment(
    transform: Transform,
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """One item through ``transform``: ``(image, boxes, labels, masks)`` as the policy takes
    them (``masks`` ``(K, H, W)`` uint8 or ``None``) -> the same, minus the dropped boxes.

    albumentations drops boxes and their label fields but never masks, so the policy gets each
    box's row number as its label; the surviving rows then pick the labels and masks.
    Returns ``boxes`` float32 ``(K', 4)`` xywh, ``labels`` int64 ``(K',)``, ``masks`` uint8
    ``(K', H', W')`` (``None`` without masks).
    """
    inputs = {"image": image, "bboxes": boxes, "labels": np.arange(len(labels))}
    if masks is not None and len(masks):  # albumentations cannot take (0, H, W)
        inputs["masks"] = masks
    out = transform(**inputs)
    kept = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
    if masks is not None:
        if len(masks):
            masks = np.asarray(out["masks"], dtype=np.uint8)[kept]
        else:
            masks = np.zeros((0, *out["image"].shape[:2]), dtype=np.uint8)
    return (
        out["image"],
        np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4),
        np.asarray(labels, dtype=np.int64)[kept],
        masks,
    )


def reseed(transform: Transform, seed: int) -> None:
    """Restart ``transform``'s random streams from ``seed``.

    All transforms of the pipeline share one generator. ``A.Compose(seed=...)`` would instead
    give every transform its own generator started from the *same* seed, so their draws are
    correlated (transforms with equal ``p`` then switch on and off together).
    """
    if not isinstance(transform, A.BaseCompose):
        raise TypeError(f"reseed expects an albumentations pipeline, got {type(transform)}")
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
