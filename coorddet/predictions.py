"""Prediction records and the COCO results format they are written in and read from.

An :class:`ImagePrediction` holds one image's detections and RPN proposals in original image
pixels, xyxy; :mod:`coorddet.inference` makes them from a model, :func:`records_from_coco_results`
from another detector's COCO results file, and :mod:`coorddet.metrics` scores them. The COCO
results format (``image_id, category_id, bbox [x, y, w, h], score``, and ``segmentation`` for
instance masks) is converted here only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from coorddet.boxes import xywh_to_xyxy, xyxy_to_xywh
from coorddet.errors import UserError
from coorddet.masks import check_rle, encode, mask_box
from coorddet.validate import is_int, is_number

BOX_DECIMALS = 3  # COCO results: boxes to 1/1000 px,
SCORE_DECIMALS = 5  # scores to 1e-5
MASK_THRESHOLD = 0.5  # a mask probability above it is the object's (torchvision's reference)


@dataclass
class ImagePrediction:
    """One image's predictions; CPU tensors, original image pixel coordinates.

    Attributes:
        image_id: COCO image id.
        boxes: float32 ``(D, 4)`` xyxy detections.
        scores: float32 ``(D,)``.
        labels: int64 ``(D,)`` COCO category ids.
        proposals: float32 ``(P, 4)`` xyxy RPN proposals (:func:`coorddet.inference.paper_proposals`),
            best objectness first; ``None`` when unknown (predictions from another detector).
        segmentations: one compressed COCO RLE ``{"size": [h, w], "counts": str}`` per
            detection, in the order of ``boxes``; ``None`` for a detector without masks. RLEs,
            never full masks, so records stay small at any image size.
    """

    image_id: int
    boxes: Tensor
    scores: Tensor
    labels: Tensor
    proposals: Tensor | None = None
    segmentations: list[dict[str, Any]] | None = None

    @classmethod
    def from_detections(
        cls, image_id: Any, detections: dict[str, Tensor], proposals: Tensor | None = None
    ) -> ImagePrediction:
        """A record on the CPU from one image's torchvision detections (``boxes``, ``scores``,
        ``labels``, and ``masks`` float ``(D, 1, H, W)`` probabilities when the detector has a
        mask head) and optional proposals, all in original image pixels. Masks become RLEs of
        their pixels above :data:`MASK_THRESHOLD`."""
        masks = detections.get("masks")
        return cls(
            image_id=int(image_id),
            boxes=detections["boxes"].float().cpu(),
            scores=detections["scores"].float().cpu(),
            labels=detections["labels"].long().cpu(),
            proposals=None if proposals is None else proposals.float().cpu(),
            segmentations=None if masks is None else encode(masks[:, 0] > MASK_THRESHOLD),
        )

    @classmethod
    def batch(
        cls,
        image_ids: Sequence[Any],
        detections: Sequence[dict[str, Tensor]],
        proposals: Sequence[Tensor] | None = None,
    ) -> list[ImagePrediction]:
        """:meth:`from_detections` for a batch. From a GPU, each field of the whole batch
        comes to the host in one copy (one host sync per field, not per image and field)."""
        detections, proposals = list(detections), None if proposals is None else list(proposals)
        if detections and detections[0]["boxes"].device.type != "cpu":
            fields = {
                key: _to_host([image[key] for image in detections])
                for key in ("boxes", "scores", "labels")
            }
            detections = [
                {**image, **{key: parts[i] for key, parts in fields.items()}}
                for i, image in enumerate(detections)
            ]
            proposals = None if proposals is None else _to_host(proposals)
        return [
            cls.from_detections(image_id, image, None if proposals is None else proposals[i])
            for i, (image_id, image) in enumerate(zip(image_ids, detections, strict=True))
        ]

    @classmethod
    def empty(cls, image_id: int) -> ImagePrediction:
        """No detections (and no proposals) for ``image_id``."""
        return cls(image_id, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))


def _to_host(tensors: list[Tensor]) -> list[Tensor]:
    """Same-shaped (except along dim 0) device tensors on the CPU in one copy, each its own
    tensor again (not a view that would pickle the whole batch with it)."""
    joined = torch.cat(tensors).cpu()
    return [part.clone() for part in joined.split([len(t) for t in tensors])]


def with_category_ids(
    records: Sequence[ImagePrediction], category_ids: Sequence[int] | None
) -> list[ImagePrediction]:
    """Records whose model labels (1..K) are replaced by the dataset's category ids:
    label ``k`` -> ``category_ids[k - 1]`` (:attr:`coorddet.data.CocoDataset.category_ids`).
    ``None``, or ids that are already 1..K, leave the records as they are."""
    if category_ids is None or list(category_ids) == list(range(1, len(category_ids) + 1)):
        return list(records)
    lookup = torch.tensor([0, *category_ids], dtype=torch.int64)
    return [dataclasses.replace(r, labels=lookup[r.labels]) for r in records]


def has_segmentations(records: Iterable[ImagePrediction]) -> bool:
    """Whether any of ``records`` carries instance masks (segmentations)."""
    return any(record.segmentations is not None for record in records)


def dedupe_records(records: Iterable[ImagePrediction]) -> list[ImagePrediction]:
    """One record per image id (the first seen), sorted by id: drops DistributedSampler padding."""
    unique: dict[int, ImagePrediction] = {}
    for record in records:
        unique.setdefault(int(record.image_id), record)
    return [unique[image_id] for image_id in sorted(unique)]


def to_coco_results(records: Iterable[ImagePrediction]) -> list[dict[str, Any]]:
    """Detections in the COCO results format: ``image_id, category_id, bbox [x, y, w, h], score``,
    and ``segmentation`` (the record's RLE) for records that have segmentations.

    Boxes rounded to ``BOX_DECIMALS``, scores to ``SCORE_DECIMALS``.
    """
    results = []
    for record in records:
        xywh = xyxy_to_xywh(record.boxes.double().reshape(-1, 4)).tolist()
        segmentations = record.segmentations or [None] * len(xywh)
        for box, score, label, segmentation in zip(
            xywh, record.scores.tolist(), record.labels.tolist(), segmentations, strict=True
        ):
            result = {
                "image_id": int(record.image_id),
                "category_id": int(label),
                "bbox": [round(value, BOX_DECIMALS) for value in box],
                "score": round(float(score), SCORE_DECIMALS),
            }
            if segmentation is not None:
                result["segmentation"] = dict(segmentation)
            results.append(result)
    return results


def records_from_coco_results(results: Any) -> list[ImagePrediction]:
    """COCO results (parsed JSON) -> records sorted by image id, no proposals.

    ``segmentation``, when the entries have one, must be an RLE ``{"size": [h, w], "counts"}``
    (compressed, or uncompressed: compressed here); polygons are refused, since their masks
    depend on rasterization details that differ between tools. Either every entry has one or
    none has. An entry with a segmentation may leave out ``bbox`` (COCO's segm results do):
    its box is then its mask's. Raises UserError naming the first malformed entry. Images
    without detections get no record; :func:`coorddet.metrics.evaluate_records` ``image_ids=``
    still counts them.
    """
    if not isinstance(results, list):
        raise UserError(
            f"COCO results must be a JSON list of detections, got {type(results).__name__}"
        )
    masked = bool(results) and isinstance(results[0], dict) and "segmentation" in results[0]
    grouped: dict[int, list[dict[str, Any]]] = {}
    for index, result in enumerate(results):
        if masked and isinstance(result, dict) and "segmentation" in result:
            result = {**result, "segmentation": _checked_segmentation(index, result)}
            if "bbox" not in result:
                result["bbox"] = mask_box(result["segmentation"])
        _check_result(index, result)
        if masked != ("segmentation" in result):
            raise UserError(
                f"detection #{index} {'lacks' if masked else 'has'} a 'segmentation' and "
                f"detection #0 {'has' if masked else 'lacks'} one; give every detection a "
                "segmentation (COCO RLE) or none"
            )
        grouped.setdefault(result["image_id"], []).append(result)
    records = []
    for image_id in sorted(grouped):
        entries = grouped[image_id]
        xywh = torch.tensor([e["bbox"] for e in entries], dtype=torch.float64)
        records.append(
            ImagePrediction(
                image_id=image_id,
                boxes=xywh_to_xyxy(xywh).float(),
                scores=torch.tensor([float(e["score"]) for e in entries], dtype=torch.float32),
                labels=torch.tensor([e["category_id"] for e in entries], dtype=torch.int64),
                segmentations=[e["segmentation"] for e in entries] if masked else None,
            )
        )
    return records


def check_segmentation_sizes(
    records: Iterable[ImagePrediction], image_sizes: Mapping[int, tuple[int, int]]
) -> None:
    """UserError unless every segmentation is its image's ``(height, width)`` (by image id)."""
    for record in records:
        size = image_sizes.get(int(record.image_id))
        for segmentation in record.segmentations or ():
            if size is not None and tuple(segmentation["size"]) != tuple(size):
                raise UserError(
                    f"image id {record.image_id}: a segmentation of size {segmentation['size']} "
                    f"(height, width) on an image of {list(size)}"
                )


def _checked_segmentation(index: int, result: dict[str, Any]) -> dict[str, Any]:
    segmentation = result["segmentation"]
    if isinstance(segmentation, list):
        raise UserError(
            f"detection #{index}: 'segmentation' is a polygon list; give masks as COCO RLE "
            "{'size': [h, w], 'counts': ...} (pycocotools.mask.encode)"
        )
    return check_rle(segmentation, f"detection #{index}")


def _check_result(index: int, result: Any) -> None:
    where = f"detection #{index}"
    if not isinstance(result, dict):
        raise UserError(f"{where} is not an object with image_id, category_id, bbox, score")
    for key in ("image_id", "category_id"):
        if not is_int(result.get(key)):
            raise UserError(f"{where}: '{key}' must be an integer, got {result.get(key)!r}")
    bbox = result.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(is_number, bbox))):
        raise UserError(f"{where}: 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}")
    if bbox[2] < 0 or bbox[3] < 0:
        raise UserError(f"{where}: 'bbox' width and height must be >= 0, got {bbox!r}")
    if not is_number(result.get("score")):
        raise UserError(f"{where}: 'score' must be a finite number, got {result.get('score')!r}")
