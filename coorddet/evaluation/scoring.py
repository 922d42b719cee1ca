"""Evaluation, stage two: predictions and COCO ground truth -> metrics. Pure: no files, no model.

The metrics themselves are defined in :mod:`coorddet.metrics` (IOU metrics and pycocotools'
COCO mAP); this stage scores several runs on one ground truth, as ``coorddet.evaluate`` and
validation during training both do.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from pycocotools.coco import COCO

from coorddet.metrics import evaluate_records, finite_or_none
from coorddet.predictions import ImagePrediction


def score(
    coco: COCO, records: Sequence[ImagePrediction], **options: Any
) -> dict[str, float | None]:
    """Every metric of :data:`coorddet.metrics.METRIC_KEYS` for one run's ``records``, ``None``
    where undefined. ``options``: :func:`coorddet.metrics.evaluate_records`' ``image_ids``
    (default: the records'), ``score_thresh`` (0.5) and ``detections`` (``False`` for a
    detector without detections, e.g. ``rpn-only``: ``rpn_iou`` alone)."""
    return finite_or_none(evaluate_records(coco, records, **options))


def score_runs(
    coco: COCO,
    runs: Mapping[str, Sequence[ImagePrediction]],
    *,
    image_ids: Iterable[int] | None = None,
    score_thresh: float = 0.5,
    without_detections: Collection[str] = (),
) -> dict[str, dict[str, float | None]]:
    """:func:`score` for each named run: ``{run: {metric: value or None}}``; the runs named in
    ``without_detections`` are scored on their proposals alone."""
    ids = None if image_ids is None else list(image_ids)
    return {
        name: score(
            coco,
            records,
            image_ids=ids,
            score_thresh=score_thresh,
            detections=name not in without_detections,
        )
        for name, records in runs.items()
    }
