"""IOU metrics and COCO mAP: pure functions of predictions and ground truth, one code path for
validation during training and for evaluation.

Records (:class:`coorddet.predictions.ImagePrediction`, made by :mod:`coorddet.inference` or
read from a COCO results file) hold one image's detections and RPN proposals in original
image pixels, xyxy. Definitions (pooled means: every box counts once, not every image):

- ``rpn_iou``: each paper proposal's best IoU with any ground-truth box of its image (0 in an
  image without ground truth). NaN when no record carries proposals (external predictions).
- ``det_iou``: each detection with ``score >= score_thresh``: its best IoU with any ground-truth
  box of its image, any class (0 in an image without ground truth). 0.0 when there is no such
  detection at all: a detector that finds nothing scores 0, not "undefined".
- ``gt_iou``: each ground-truth box: its best IoU among detections of the same class with
  ``score >= score_thresh``, 0 when there is none. NaN when there is no ground truth at all.
- ``COCO_KEYS``: pycocotools ``COCOeval`` (bbox) ``stats[0:9]``. COCOeval's -1 ("undefined",
  e.g. no large objects) becomes NaN, which ``json.dump`` writes as ``NaN``; report writers
  should write ``null`` and must not average it.
- ``SEGM_KEYS`` (only when asked for, ``masks=True``): the same nine stats of
  ``COCOeval(iouType="segm")`` on the detections' instance masks. The results are scored
  without their ``bbox``, as COCO's own segm results are, so a detection's area (for the
  small/medium/large ranges) is its mask's. NaN for a run without masks.

Crowd annotations (``iscrowd=1``) are left out of the ground truth of the IOU metrics; COCOeval
treats them its own way.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor
from torchvision.ops import box_iou

from coorddet.boxes import xywh_to_xyxy
from coorddet.errors import UserError
from coorddet.masks import check_segmentation
from coorddet.predictions import (
    ImagePrediction,
    check_segmentation_sizes,
    dedupe_records,
    has_segmentations,
    to_coco_results,
)

COCO_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large",
             "mar_1", "mar_10", "mar_100")  # COCOeval.stats[0:9], in that order  # fmt: skip
IOU_KEYS = ("rpn_iou", "det_iou", "gt_iou")
METRIC_KEYS = COCO_KEYS + IOU_KEYS
SEGM_KEYS = tuple(f"segm_{key}" for key in COCO_KEYS)  # COCOeval (segm), with masks=True


class GroundTruth(NamedTuple):
    """One image's ground truth: ``boxes`` float32 ``(K, 4)`` xyxy pixels, ``labels`` int64 ``(K,)``."""

    boxes: Tensor
    labels: Tensor


def ground_truth(coco_gt: COCO, image_ids: Iterable[int] | None = None) -> dict[int, GroundTruth]:
    """Non-crowd ground truth per image id (default: every image of ``coco_gt``), xywh -> xyxy."""
    ids = coco_gt.getImgIds() if image_ids is None else image_ids
    gts = {}
    for image_id in ids:
        anns = [a for a in coco_gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        gts[int(image_id)] = GroundTruth(xywh_to_xyxy(xywh).float(), labels)
    return gts


def _best_iou(boxes: Tensor, others: Tensor, mask: Tensor | None = None) -> Tensor:
    """``(N,)``: each of ``boxes`` ``(N, 4)``' best IoU with ``others`` ``(M, 4)`` where ``mask``
    ``(N, M)`` bool is true (default: all); 0 when there is none."""
    if len(boxes) == 0 or len(others) == 0:
        return torch.zeros(len(boxes))
    ious = box_iou(boxes.float(), others.float()).nan_to_num(0.0)
    return (ious if mask is None else ious * mask).amax(dim=1)  # amax: max(dim=) is slow here


def _scored(records: Iterable[ImagePrediction], gts: Mapping[int, GroundTruth]):
    """(record, ground truth) for each record of an image in ``gts``, one per image id."""
    by_id = {int(r.image_id): r for r in records}
    return [(by_id[i], gt) for i, gt in gts.items() if i in by_id]


def per_proposal_ious(
    records: Iterable[ImagePrediction], gts: Mapping[int, GroundTruth]
) -> Tensor | None:
    """``(P,)`` pooled best IoU of every proposal; ``None`` when no record has proposals."""
    pairs = [(r, gt) for r, gt in _scored(records, gts) if r.proposals is not None]
    if not pairs:
        return None
    return torch.cat([torch.zeros(0)] + [_best_iou(r.proposals, gt.boxes) for r, gt in pairs])


def per_detection_ious(
    records: Iterable[ImagePrediction], gts: Mapping[int, GroundTruth], *, score_thresh: float = 0.5
) -> Tensor:
    """``(D,)`` pooled best IoU (any class) of every detection with ``score >= score_thresh``."""
    ious = [
        _best_iou(r.boxes[r.scores >= score_thresh], gt.boxes) for r, gt in _scored(records, gts)
    ]
    return torch.cat([torch.zeros(0)] + ious)


def per_gt_ious(
    records: Iterable[ImagePrediction], gts: Mapping[int, GroundTruth], *, score_thresh: float = 0.5
) -> Tensor:
    """``(G,)`` every ground-truth box's best IoU among same-class detections (score >= thresh).

    Images of ``gts`` without a record count as having no detections.
    """
    by_id = {int(r.image_id): r for r in records}
    nothing = ImagePrediction.empty(-1)
    ious = [torch.zeros(0)]
    for image_id, gt in gts.items():
        record = by_id.get(image_id, nothing)
        keep = record.scores >= score_thresh
        same_class = gt.labels[:, None] == record.labels[keep][None, :]  # (K, D)
        ious.append(_best_iou(gt.boxes, record.boxes[keep], mask=same_class))
    return torch.cat(ious)


def iou_metrics(
    records: Sequence[ImagePrediction], gts: Mapping[int, GroundTruth], *, score_thresh: float = 0.5
) -> dict[str, float]:
    """``rpn_iou``, ``det_iou``, ``gt_iou`` over the images of ``gts`` (see the module doc)."""
    proposal = per_proposal_ious(records, gts)
    detection = per_detection_ious(records, gts, score_thresh=score_thresh)
    truth = per_gt_ious(records, gts, score_thresh=score_thresh)
    return {
        "rpn_iou": math.nan if proposal is None else _mean(proposal, empty=0.0),
        "det_iou": _mean(detection, empty=0.0),
        "gt_iou": _mean(truth, empty=math.nan),
    }


def _mean(values: Tensor, *, empty: float) -> float:
    return float(values.double().mean()) if len(values) else empty


def coco_metrics(
    coco_gt: COCO,
    results: list[dict[str, Any]],
    *,
    image_ids: Iterable[int] | None = None,
    iou_type: str = "bbox",
) -> dict[str, float]:
    """COCOeval ``COCO_KEYS`` (``iou_type="bbox"``) or ``SEGM_KEYS`` (``"segm"``: the results'
    ``segmentation`` RLEs, their ``bbox`` left out) over ``image_ids`` (default: every image of
    ``coco_gt``).

    Results of other images are ignored. -1 (undefined) -> NaN. Empty ``results`` score 0 where
    ground truth exists (NaN where undefined). Unknown image ids, and for ``"segm"`` ground
    truth without a well-formed ``segmentation``, raise UserError.
    """
    keys = {"bbox": COCO_KEYS, "segm": SEGM_KEYS}[iou_type]
    evaluator = coco_evaluator(coco_gt, results, image_ids=image_ids, iou_type=iou_type)
    if evaluator is None:
        return dict.fromkeys(keys, math.nan)
    return {
        k: math.nan if v < 0 else float(v) for k, v in zip(keys, evaluator.stats[:9], strict=True)
    }


def coco_evaluator(
    coco_gt: COCO,
    results: list[dict[str, Any]],
    *,
    image_ids: Iterable[int] | None = None,
    iou_type: str = "bbox",
) -> COCOeval | None:
    """pycocotools' ``COCOeval`` of ``results`` over ``image_ids``, evaluated, accumulated and
    summarized (``stats``, ``eval["precision"]``), as :func:`coco_metrics` describes; ``None``
    for no images."""
    ids = sorted({int(i) for i in (coco_gt.getImgIds() if image_ids is None else image_ids)})
    _check_known(coco_gt, ids + [r["image_id"] for r in results])
    if not ids:
        return None
    if iou_type == "segm":
        _check_mask_ground_truth(coco_gt, ids)
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        if results:
            coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes adds keys in place
        else:  # loadRes cannot take []
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": list(coco_gt.dataset["images"]),
                "categories": copy.deepcopy(coco_gt.dataset["categories"]),
                "annotations": [],
            }
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.imgIds = ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _check_mask_ground_truth(coco_gt: COCO, image_ids: Iterable[int]) -> None:
    """UserError unless every annotation of ``image_ids`` has a well-formed segmentation."""
    for image_id in image_ids:
        image = coco_gt.imgs[image_id]
        for ann in coco_gt.imgToAnns.get(image_id, []):
            where = f"ground truth annotation id {ann.get('id')}"
            if "segmentation" not in ann:
                raise UserError(
                    f"{where} (image id {image_id}) has no 'segmentation': mask AP (segm_*) "
                    "needs instance masks in the dataset"
                )
            check_segmentation(ann["segmentation"], image["height"], image["width"], where)


def _check_known(coco_gt: COCO, image_ids: Iterable[int]) -> None:
    unknown = sorted(set(image_ids) - set(coco_gt.getImgIds()))
    if unknown:
        shown = ", ".join(map(str, unknown[:5])) + (", ..." if len(unknown) > 5 else "")
        raise UserError(f"image ids not in the dataset: {shown} ({len(unknown)} in all)")


def evaluate_records(
    coco_gt: COCO,
    records: Iterable[ImagePrediction],
    *,
    image_ids: Iterable[int] | None = None,
    score_thresh: float = 0.5,
    detections: bool = True,
    masks: bool = False,
) -> dict[str, float]:
    """Every ``METRIC_KEYS`` value for ``records`` over ``image_ids`` (default: the records'),
    then with ``masks`` every ``SEGM_KEYS`` value (NaN when no record has segmentations).

    Records are deduplicated first. Images without a record count as having no detections.
    ``detections=False`` (an RPN-only detector): only ``rpn_iou``; the detection metrics
    (``COCO_KEYS``, ``det_iou``, ``gt_iou``, ``SEGM_KEYS``) are NaN, undefined.
    COCO metrics are computed from :func:`to_coco_results` (rounded), so re-scoring the written
    results file gives the same numbers.
    """
    keys = METRIC_KEYS + (SEGM_KEYS if masks else ())
    records = dedupe_records(records)
    ids = sorted({int(r.image_id) for r in records} if image_ids is None else set(image_ids))
    _check_known(coco_gt, ids + [r.image_id for r in records])
    gts = ground_truth(coco_gt, ids)
    if not detections:
        proposal = per_proposal_ious(records, gts)
        rpn_iou = math.nan if proposal is None else _mean(proposal, empty=0.0)
        return {key: rpn_iou if key == "rpn_iou" else math.nan for key in keys}
    results = to_coco_results(records)
    metrics = coco_metrics(coco_gt, results, image_ids=ids)
    metrics.update(iou_metrics(records, gts, score_thresh=score_thresh))
    if masks:
        metrics.update(_mask_metrics(coco_gt, records, results, ids))
    return {key: metrics[key] for key in keys}


def _mask_metrics(
    coco_gt: COCO, records: list[ImagePrediction], results: list[dict[str, Any]], ids: list[int]
) -> dict[str, float]:
    """``SEGM_KEYS`` of ``records`` (their COCO ``results``); NaN when none has segmentations."""
    if not has_segmentations(records):
        return dict.fromkeys(SEGM_KEYS, math.nan)
    for record in records:
        if record.segmentations is None and len(record.boxes):
            raise ValueError(f"image id {record.image_id}: detections without segmentations")
    sizes = {
        image_id: (image["height"], image["width"]) for image_id, image in coco_gt.imgs.items()
    }
    check_segmentation_sizes(records, sizes)
    return coco_metrics(coco_gt, results, image_ids=ids, iou_type="segm")


def finite_or_none(metrics: Mapping[str, float | None]) -> dict[str, float | None]:
    """``metrics`` for JSON: NaN ("undefined") becomes ``None`` (``null``), the rest floats."""
    return {k: None if v is None or math.isnan(v) else float(v) for k, v in metrics.items()}
