"""Per-category results: pure functions of prediction records and COCO ground truth.

- :func:`per_class_metrics`: for every category, ``map`` and ``map_50`` from pycocotools'
  own per-category precision (``COCOeval.eval["precision"]``, averaged as ``summarize`` does:
  over the IoU thresholds and recall points it has, area "all", 100 detections), and
  ``gt_iou`` as :func:`coorddet.metrics.per_gt_ious` defines it, on that category's ground
  truth alone. ``None`` where undefined (no ground truth of the category).
- :func:`confusion_matrix`: true category (rows) by predicted category (columns) at IoU >= 0.5,
  with a background row (detections that match no ground-truth box) and column (ground-truth
  boxes no detection matched).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torchvision.ops import box_iou

from coorddet.metrics import GroundTruth, coco_evaluator, ground_truth, per_gt_ious
from coorddet.predictions import ImagePrediction, dedupe_records, to_coco_results

PER_CLASS_KEYS = ("map", "map_50", "gt_iou")
CONFUSION_IOU = 0.5


def category_names(categories: Sequence[Mapping[str, Any]]) -> dict[int, str]:
    """Category id -> its name, made unique (``name (id)``) where names repeat."""
    names = [str(c["name"]) for c in categories]
    return {
        int(c["id"]): str(c["name"])
        if names.count(str(c["name"])) == 1
        else f"{c['name']} ({c['id']})"
        for c in categories
    }


def per_class_metrics(
    coco_gt: COCO,
    records: Iterable[ImagePrediction],
    *,
    image_ids: Iterable[int],
    score_thresh: float = 0.5,
) -> dict[str, dict[str, float | None]]:
    """``{category name: {"map", "map_50", "gt_iou"}}`` over ``image_ids`` (see the module)."""
    records = dedupe_records(records)
    ids = sorted(set(image_ids))
    categories = [coco_gt.cats[c] for c in sorted(coco_gt.cats)]
    names = category_names(categories)
    evaluator = coco_evaluator(coco_gt, to_coco_results(records), image_ids=ids)
    precision = None if evaluator is None else evaluator.eval["precision"]  # [T, R, K, A, M]
    order = [] if evaluator is None else list(evaluator.params.catIds)
    gts = ground_truth(coco_gt, ids)
    result: dict[str, dict[str, float | None]] = {}
    for category in categories:
        category_id = int(category["id"])
        values: dict[str, float | None] = {"map": None, "map_50": None, "gt_iou": None}
        if precision is not None:
            k = order.index(category_id)
            values["map"] = _mean_defined(precision[:, :, k, 0, -1])
            values["map_50"] = _mean_defined(precision[0, :, k, 0, -1])
        own = {i: _only(gt, category_id) for i, gt in gts.items()}
        ious = per_gt_ious(records, own, score_thresh=score_thresh)
        values["gt_iou"] = float(ious.double().mean()) if len(ious) else None
        result[names[category_id]] = values
    return result


def _only(gt: GroundTruth, category_id: int) -> GroundTruth:
    keep = gt.labels == category_id
    return GroundTruth(gt.boxes[keep], gt.labels[keep])


def _mean_defined(precision: np.ndarray) -> float | None:
    """COCOeval.summarize's mean: over the entries that are defined (> -1)."""
    defined = precision[precision > -1]
    return float(np.mean(defined)) if defined.size else None


def confusion_matrix(
    records: Iterable[ImagePrediction],
    gts: Mapping[int, GroundTruth],
    category_ids: Sequence[int],
    *,
    score_thresh: float = 0.5,
    iou: float = CONFUSION_IOU,
) -> np.ndarray:
    """int64 ``(K + 1, K + 1)``: row = true category, column = predicted, in the order of
    ``category_ids``, background last. Per image, detections scoring at least
    ``score_thresh`` are matched best score first to the unmatched ground-truth box (any
    category) they overlap most, if by IoU >= ``iou``, as COCO matches."""
    index = {int(c): k for k, c in enumerate(category_ids)}
    background = len(category_ids)
    matrix = np.zeros((background + 1, background + 1), dtype=np.int64)
    by_id = {int(r.image_id): r for r in records}
    for image_id, gt in gts.items():
        record = by_id.get(image_id, ImagePrediction.empty(image_id))
        keep = record.scores >= score_thresh
        order = torch.argsort(record.scores[keep], descending=True, stable=True)
        boxes, labels = record.boxes[keep][order], record.labels[keep][order]
        overlaps = box_iou(boxes.float(), gt.boxes.float()) if len(gt.boxes) else None
        free = torch.ones(len(gt.boxes), dtype=torch.bool)
        for d, label in enumerate(labels.tolist()):
            row = background
            if overlaps is not None:
                candidates = torch.where(free, overlaps[d], torch.full_like(overlaps[d], -1.0))
                best = int(candidates.argmax())
                if float(candidates[best]) >= iou:
                    free[best] = False
                    row = index[int(gt.labels[best])]
            matrix[row, index.get(int(label), background)] += 1
        for g in torch.nonzero(free).flatten().tolist():
            matrix[index[int(gt.labels[g])], background] += 1
    return matrix
