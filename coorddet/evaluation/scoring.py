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
from coorddet.predictions import ImagePrediction, has_segmentations


def score(
    coco: COCO, records: Sequence[ImagePrediction], **options: Any
) -> dict[str, float | None]:
    """Every metric of :data:`coorddet.metrics.METRIC_KEYS` for one run's ``records``, ``None``
    where undefined. ``options``: :func:`coorddet.metrics.evaluate_records`' ``image_ids``
    (default: the records'), ``score_thresh`` (0.5), ``detections`` (``False`` for a
    detector without detections, e.g. ``rpn-only``: ``rpn_iou`` alone) and ``masks``
    (``True``: also :data:`coorddet.metrics.SEGM_KEYS`, mask AP)."""
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
    ``without_detections`` are scored on their proposals alone.

    When any run has instance masks (segmentations), every run also gets the mask AP keys
    (:data:`coorddet.metrics.SEGM_KEYS`, ``None`` for a run without masks), so all runs share
    one set of keys; when none has, the keys are exactly :data:`coorddet.metrics.METRIC_KEYS`.
    """
    ids = None if image_ids is None else list(image_ids)
    masks = any(has_segmentations(records) for records in runs.values())
    return {
        name: score(
            coco,
            records,
            image_ids=ids,
            score_thresh=score_thresh,
            detections=name not in without_detections,
            masks=masks,
        )
        for name, records in runs.items()
    }


def score_per_class(
    coco: COCO,
    runs: Mapping[str, Sequence[ImagePrediction]],
    *,
    image_ids: Iterable[int],
    score_thresh: float = 0.5,
    without_detections: Collection[str] = (),
) -> dict[str, dict[str, dict[str, float | None]]]:
    """``{run: {category name: {"map", "map_50", "gt_iou"}}}``
    (:func:`coorddet.class_metrics.per_class_metrics`); ``None`` throughout for the runs
    named in ``without_detections``."""
    from coorddet.class_metrics import PER_CLASS_KEYS, category_names, per_class_metrics

    ids = list(image_ids)
    names = category_names([coco.cats[c] for c in sorted(coco.cats)]).values()
    return {
        name: {n: dict.fromkeys(PER_CLASS_KEYS) for n in names}
        if name in without_detections
        else per_class_metrics(coco, records, image_ids=ids, score_thresh=score_thresh)
        for name, records in runs.items()
    }
