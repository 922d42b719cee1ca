"""IOU metrics and COCO mAP: one code path for validation during training and for evaluation.

Records (:class:`ImagePrediction`) hold one image's detections and RPN proposals in original
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

Crowd annotations (``iscrowd=1``) are left out of the ground truth of the IOU metrics; COCOeval
treats them its own way.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import box_convert, box_iou

from coorddet.errors import UserError

COCO_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large",
             "mar_1", "mar_10", "mar_100")  # COCOeval.stats[0:9], in that order  # fmt: skip
IOU_KEYS = ("rpn_iou", "det_iou", "gt_iou")
METRIC_KEYS = COCO_KEYS + IOU_KEYS
BOX_DECIMALS = 3  # COCO results: boxes to 1/1000 px,
SCORE_DECIMALS = 5  # scores to 1e-5


@dataclass
class ImagePrediction:
    """One image's predictions; CPU tensors, original image pixel coordinates.

    Attributes:
        image_id: COCO image id.
        boxes: float32 ``(D, 4)`` xyxy detections.
        scores: float32 ``(D,)``.
        labels: int64 ``(D,)`` COCO category ids.
        proposals: float32 ``(P, 4)`` xyxy RPN proposals (:func:`paper_proposals`), best
            objectness first; ``None`` when unknown (predictions from another detector).
    """

    image_id: int
    boxes: Tensor
    scores: Tensor
    labels: Tensor
    proposals: Tensor | None = None


class GroundTruth(NamedTuple):
    """One image's ground truth: ``boxes`` float32 ``(K, 4)`` xyxy pixels, ``labels`` int64 ``(K,)``."""

    boxes: Tensor
    labels: Tensor


def paper_proposals(
    model: FasterRCNN,
    images: ImageList,
    features: Mapping[str, Tensor] | Tensor,
    *,
    top_k: int = 10,
    nms_iou: float = 0.8,
    rpn_outputs: Mapping[str, Any] | None = None,
) -> list[Tensor]:
    """The RPN proposals of the CoordConv paper: NMS at ``nms_iou``, then the ``top_k`` best.

    Runs a shallow copy of ``model.rpn`` (a torchvision ``RegionProposalNetwork``, shared weights)
    in eval mode with those settings; the model itself is not changed. NMS is per feature level,
    as in torchvision. ``images`` is the ``ImageList`` from ``model.transform``; ``features``
    what ``model.backbone`` returned for it. ``rpn_outputs`` (``{"head": ..., "anchors": ...}``,
    what ``model.rpn.head`` and ``model.rpn.anchor_generator`` returned for these ``features``)
    skips recomputing them. Returns per image a float ``(P, 4)`` xyxy tensor, ``P <= top_k``,
    best objectness first, in the *transformed* image's pixels.

    With one feature level, NMS first runs on the ``4 * top_k`` best-scored proposals only (of
    the RPN's ``pre_nms_top_n``, 300 for ``mnist-small``), then on all of them for a batch in
    which an image kept fewer than ``top_k``. Same result: greedy NMS decides each box from
    the better-scored ones alone, so the first ``top_k`` kept of a prefix are the first
    ``top_k`` kept of the whole list. It made batch-64 inference ~8% faster.
    """
    if top_k < 1 or not 0.0 < nms_iou <= 1.0:
        raise ValueError(f"need top_k >= 1 and 0 < nms_iou <= 1, got {top_k=}, {nms_iou=}")
    if isinstance(features, Tensor):
        features = OrderedDict([("0", features)])
    rpn = copy.copy(model.rpn)  # own __dict__, shared submodules and weights
    rpn.training = False  # the copy's flag only; .eval() would reach the shared submodules
    rpn.nms_thresh = nms_iou
    rpn._post_nms_top_n = {"training": top_k, "testing": top_k}
    if rpn_outputs is not None:
        rpn._modules = OrderedDict(rpn._modules)  # the copy's submodule table, not the model's
        rpn.head = _Replay(rpn_outputs["head"])
        rpn.anchor_generator = _Replay(rpn_outputs["anchors"])
    candidates = rpn._pre_nms_top_n["testing"]
    shortlist = 4 * top_k if len(features) == 1 else candidates
    with torch.no_grad():
        if shortlist < candidates:
            rpn._pre_nms_top_n = {"training": shortlist, "testing": shortlist}
            proposals, _ = rpn(images, features)
            if all(len(image_proposals) == top_k for image_proposals in proposals):
                return proposals
            rpn._pre_nms_top_n = {"training": candidates, "testing": candidates}
        proposals, _ = rpn(images, features)
    return proposals


class _Replay(torch.nn.Module):
    """A submodule that returns what the real one returned for the same input (no recompute)."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any) -> Any:
        return self.output


def predict_with_proposals(
    model: FasterRCNN,
    images: list[Tensor],
    *,
    image_ids: Sequence[int],
    top_k: int = 10,
    nms_iou: float = 0.8,
) -> list[ImagePrediction]:
    """Detections (exactly ``model(images)`` in eval mode) and paper proposals, per image.

    ``model`` is a torchvision ``FasterRCNN``; ``images`` float ``(C, H, W)`` tensors as
    ``model`` takes them; ``image_ids`` their COCO ids. Runs the model's own steps (transform,
    backbone, rpn, roi_heads, postprocess) as module calls, so hooks fire; proposals are
    rescaled to original image pixels like the detections. Training modes are restored.
    """
    if len(image_ids) != len(images):
        raise ValueError(f"{len(images)} images but {len(image_ids)} image_ids")
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
            image_list, _ = model.transform(images)
            features = model.backbone(image_list.tensors)
            if isinstance(features, Tensor):
                features = OrderedDict([("0", features)])
            outputs: dict[str, Any] = {}
            hooks = [
                getattr(model.rpn, name).register_forward_hook(
                    lambda module, args, output, name=name: outputs.__setitem__(name, output)
                )
                for name in ("head", "anchor_generator")
            ]
            try:
                proposals, _ = model.rpn(image_list, features)
            finally:
                for hook in hooks:
                    hook.remove()
            detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
            sizes = image_list.image_sizes
            detections = model.transform.postprocess(detections, sizes, original_sizes)
            paper = paper_proposals(
                model, image_list, features, top_k=top_k, nms_iou=nms_iou,
                rpn_outputs={"head": outputs["head"], "anchors": outputs["anchor_generator"]},
            )  # fmt: skip
    finally:
        for module, training in modes.items():
            module.training = training
    return [
        ImagePrediction(
            image_id=int(image_id),
            boxes=det["boxes"].float().cpu(),
            scores=det["scores"].float().cpu(),
            labels=det["labels"].long().cpu(),
            proposals=resize_boxes(props.float(), size, original).cpu(),
        )
        for image_id, det, props, size, original in zip(
            image_ids, detections, paper, sizes, original_sizes, strict=True
        )
    ]


def dedupe_records(records: Iterable[ImagePrediction]) -> list[ImagePrediction]:
    """One record per image id (the first seen), sorted by id: drops DistributedSampler padding."""
    unique: dict[int, ImagePrediction] = {}
    for record in records:
        unique.setdefault(int(record.image_id), record)
    return [unique[image_id] for image_id in sorted(unique)]


def ground_truth(coco_gt: COCO, image_ids: Iterable[int] | None = None) -> dict[int, GroundTruth]:
    """Non-crowd ground truth per image id (default: every image of ``coco_gt``), xywh -> xyxy."""
    ids = coco_gt.getImgIds() if image_ids is None else image_ids
    gts = {}
    for image_id in ids:
        anns = [a for a in coco_gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        gts[int(image_id)] = GroundTruth(box_convert(xywh, "xywh", "xyxy").float(), labels)
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
    nothing = ImagePrediction(
        -1, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    )
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


def to_coco_results(records: Iterable[ImagePrediction]) -> list[dict[str, Any]]:
    """Detections in the COCO results format: ``image_id, category_id, bbox [x, y, w, h], score``.

    The one xyxy -> xywh conversion; boxes rounded to ``BOX_DECIMALS``, scores to
    ``SCORE_DECIMALS``.
    """
    results = []
    for record in records:
        xywh = box_convert(record.boxes.double().reshape(-1, 4), "xyxy", "xywh")
        for box, score, label in zip(
            xywh.tolist(), record.scores.tolist(), record.labels.tolist(), strict=True
        ):
            results.append(
                {
                    "image_id": int(record.image_id),
                    "category_id": int(label),
                    "bbox": [round(value, BOX_DECIMALS) for value in box],
                    "score": round(float(score), SCORE_DECIMALS),
                }
            )
    return results


def records_from_coco_results(results: Any) -> list[ImagePrediction]:
    """COCO results (parsed JSON) -> records sorted by image id, no proposals.

    Raises UserError naming the first malformed entry. Images without detections get no
    record; :func:`evaluate_records` ``image_ids=`` still counts them.
    """
    if not isinstance(results, list):
        raise UserError(
            f"COCO results must be a JSON list of detections, got {type(results).__name__}"
        )
    grouped: dict[int, list[dict[str, Any]]] = {}
    for index, result in enumerate(results):
        _check_result(index, result)
        grouped.setdefault(result["image_id"], []).append(result)
    records = []
    for image_id in sorted(grouped):
        entries = grouped[image_id]
        xywh = torch.tensor([e["bbox"] for e in entries], dtype=torch.float64)
        records.append(
            ImagePrediction(
                image_id=image_id,
                boxes=box_convert(xywh, "xywh", "xyxy").float(),
                scores=torch.tensor([float(e["score"]) for e in entries], dtype=torch.float32),
                labels=torch.tensor([e["category_id"] for e in entries], dtype=torch.int64),
            )
        )
    return records


def _check_result(index: int, result: Any) -> None:
    def number(value: Any) -> bool:
        return (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        )

    where = f"detection #{index}"
    if not isinstance(result, dict):
        raise UserError(f"{where} is not an object with image_id, category_id, bbox, score")
    for key in ("image_id", "category_id"):
        if not isinstance(result.get(key), int) or isinstance(result.get(key), bool):
            raise UserError(f"{where}: '{key}' must be an integer, got {result.get(key)!r}")
    bbox = result.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(number, bbox))):
        raise UserError(f"{where}: 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}")
    if bbox[2] < 0 or bbox[3] < 0:
        raise UserError(f"{where}: 'bbox' width and height must be >= 0, got {bbox!r}")
    if not number(result.get("score")):
        raise UserError(f"{where}: 'score' must be a finite number, got {result.get('score')!r}")


def coco_metrics(
    coco_gt: COCO, results: list[dict[str, Any]], *, image_ids: Iterable[int] | None = None
) -> dict[str, float]:
    """COCOeval (bbox) ``COCO_KEYS`` over ``image_ids`` (default: every image of ``coco_gt``).

    Results of other images are ignored. -1 (undefined) -> NaN. Empty ``results`` score 0 where
    ground truth exists (NaN where undefined). Unknown image ids raise UserError.
    """
    ids = sorted({int(i) for i in (coco_gt.getImgIds() if image_ids is None else image_ids)})
    _check_known(coco_gt, ids + [r["image_id"] for r in results])
    if not ids:
        return dict.fromkeys(COCO_KEYS, math.nan)
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
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.imgIds = ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {
        k: math.nan if v < 0 else float(v)
        for k, v in zip(COCO_KEYS, evaluator.stats[:9], strict=True)
    }


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
) -> dict[str, float]:
    """Every ``METRIC_KEYS`` value for ``records`` over ``image_ids`` (default: the records').

    Records are deduplicated first. Images without a record count as having no detections.
    ``detections=False`` (an RPN-only detector): only ``rpn_iou``; the detection metrics
    (``COCO_KEYS``, ``det_iou``, ``gt_iou``) are NaN, undefined.
    COCO metrics are computed from :func:`to_coco_results` (rounded), so re-scoring the written
    results file gives the same numbers.
    """
    records = dedupe_records(records)
    ids = sorted({int(r.image_id) for r in records} if image_ids is None else set(image_ids))
    _check_known(coco_gt, ids + [r.image_id for r in records])
    gts = ground_truth(coco_gt, ids)
    if not detections:
        proposal = per_proposal_ious(records, gts)
        rpn_iou = math.nan if proposal is None else _mean(proposal, empty=0.0)
        return {key: rpn_iou if key == "rpn_iou" else math.nan for key in METRIC_KEYS}
    metrics = coco_metrics(coco_gt, to_coco_results(records), image_ids=ids)
    metrics.update(iou_metrics(records, gts, score_thresh=score_thresh))
    return {key: metrics[key] for key in METRIC_KEYS}
