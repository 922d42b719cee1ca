"""IOU metrics by hand, COCOeval on known cases, the COCO results round trip, and the step-by-step
torchvision inference that yields detections plus the paper's RPN proposals."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch
from conftest import coco_annotation
from pycocotools.coco import COCO
from torch.testing import assert_close

from coorddet.errors import UserError
from coorddet.metrics import (
    COCO_KEYS,
    METRIC_KEYS,
    GroundTruth,
    coco_metrics,
    evaluate_records,
    ground_truth,
    iou_metrics,
    per_gt_ious,
)
from coorddet.predictions import (
    ImagePrediction,
    dedupe_records,
    records_from_coco_results,
    to_coco_results,
)

# COCO ground truth, xywh: two small boxes in image 1, one medium (40x40) + one small in image 2.
GT_XYWH = {
    1: [(1, [10.0, 10.0, 20.0, 20.0]), (2, [30.0, 30.0, 20.0, 20.0])],
    2: [(1, [5.0, 5.0, 40.0, 40.0]), (3, [50.0, 5.0, 12.0, 14.0])],
}


def make_coco(images: dict[int, list[tuple[int, list[float]]]]) -> COCO:
    """A pycocotools COCO index of 64x64 images with the given (category_id, xywh) boxes."""
    annotations = []
    for image_id, boxes in images.items():
        for category_id, (x, y, w, h) in boxes:
            annotations.append(
                coco_annotation(len(annotations) + 1, image_id, category_id, (x, y, w, h))
            )
    coco = COCO()
    coco.dataset = {
        "images": [
            {"id": i, "file_name": f"{i:06d}.png", "width": 64, "height": 64} for i in images
        ],
        "annotations": annotations,
        "categories": [{"id": d + 1, "name": str(d)} for d in range(10)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def record(image_id, boxes, labels, scores=None, proposals=None) -> ImagePrediction:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    scores = [0.9] * len(boxes) if scores is None else scores
    return ImagePrediction(
        image_id=image_id,
        boxes=boxes,
        scores=torch.tensor(scores, dtype=torch.float32),
        labels=torch.tensor(labels, dtype=torch.int64),
        proposals=None if proposals is None else torch.tensor(proposals, dtype=torch.float32),
    )


def perfect_records(shift: float = 0.0) -> list[ImagePrediction]:
    """One detection per GT box, moved right by ``shift`` times its width."""
    return [
        record(
            image_id,
            [[x + shift * w, y, x + shift * w + w, y + h] for _, (x, y, w, h) in boxes],
            [category for category, _ in boxes],
        )
        for image_id, boxes in GT_XYWH.items()
    ]


# IOU metrics ------------------------------------------------------------------------------------

# Image 1: A (class 1) and B (class 2); image 2: C (class 3); image 3 has no ground truth.
HAND_GT = {
    1: GroundTruth(torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10]]), torch.tensor([1, 2])),
    2: GroundTruth(torch.tensor([[0.0, 0, 20, 20]]), torch.tensor([3])),
    3: GroundTruth(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)),
}
HAND_RECORDS = [
    # half of A (IoU 0.5); exactly B but class 1 (IoU 1.0); B's class below the threshold (1/3).
    record(1, [[0, 0, 10, 5], [20, 0, 30, 10], [15, 0, 25, 10]], [1, 1, 2], [0.9, 0.8, 0.3],
           proposals=[[0, 0, 10, 10], [0, 0, 5, 10], [40, 40, 50, 50]]),  # IoU 1, 0.5, 0
    record(2, [[0, 0, 20, 10]], [3], [0.7], proposals=[[0, 0, 10, 20]]),  # 0.5; 0.5
    record(3, [[0, 0, 10, 10]], [4], [0.9], proposals=[[0, 0, 10, 10]]),  # 0 (no GT); 0
]  # fmt: skip


def test_iou_metrics_by_hand():
    metrics = iou_metrics(HAND_RECORDS, HAND_GT)
    assert metrics["det_iou"] == pytest.approx((0.5 + 1.0 + 0.5 + 0.0) / 4)
    # A: 0.5 (d1; d2 is class 1 but far away), B: 0 (only class-2 detection is below 0.5), C: 0.5
    assert metrics["gt_iou"] == pytest.approx((0.5 + 0.0 + 0.5) / 3)
    assert metrics["rpn_iou"] == pytest.approx((1.0 + 0.5 + 0.0 + 0.5 + 0.0) / 5)
    assert_close(per_gt_ious(HAND_RECORDS, HAND_GT), torch.tensor([0.5, 0.0, 0.5]))


def test_iou_metrics_threshold_and_subset():
    low = iou_metrics(HAND_RECORDS, HAND_GT, score_thresh=0.2)
    assert low["gt_iou"] == pytest.approx((0.5 + 1 / 3 + 0.5) / 3)  # B now finds its class
    assert low["det_iou"] == pytest.approx((0.5 + 1.0 + 1 / 3 + 0.5 + 0.0) / 5)
    only_2 = iou_metrics(HAND_RECORDS, {2: HAND_GT[2]})
    assert only_2 == pytest.approx({"rpn_iou": 0.5, "det_iou": 0.5, "gt_iou": 0.5})


def test_iou_metrics_empty_cases():
    nothing = [record(1, [], []), record(2, [], [])]
    metrics = iou_metrics(nothing, HAND_GT)
    assert metrics["det_iou"] == 0.0 and metrics["gt_iou"] == 0.0
    assert math.isnan(metrics["rpn_iou"])  # no proposals known
    assert math.isnan(iou_metrics(HAND_RECORDS, {3: HAND_GT[3]})["gt_iou"])  # no ground truth
    # an image of the ground truth without a record: its boxes are missed
    assert_close(per_gt_ious(HAND_RECORDS[1:], HAND_GT), torch.tensor([0.0, 0.0, 0.5]))


def test_ground_truth_converts_xywh_and_skips_crowd():
    coco = make_coco({7: [(4, [2.0, 3.0, 10.0, 20.0])]})
    coco.dataset["annotations"].append(dict(coco.dataset["annotations"][0], id=2, iscrowd=1))
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    gt = ground_truth(coco)[7]
    assert_close(gt.boxes, torch.tensor([[2.0, 3.0, 12.0, 23.0]]))
    assert gt.labels.tolist() == [4]


# COCOeval ---------------------------------------------------------------------------------------


def test_perfect_predictions_score_one():
    metrics = evaluate_records(make_coco(GT_XYWH), perfect_records())
    assert set(metrics) == set(METRIC_KEYS)
    for key in ("map", "map_50", "map_75", "map_small", "map_medium", "mar_1", "mar_100"):
        assert metrics[key] == pytest.approx(1.0), key
    assert math.isnan(metrics["map_large"])  # no large objects: COCOeval's -1 becomes NaN
    assert metrics["det_iou"] == pytest.approx(1.0) and metrics["gt_iou"] == pytest.approx(1.0)
    assert math.isnan(metrics["rpn_iou"])


def test_shift_to_iou_054_passes_only_the_050_threshold():
    # moved right by 0.3 w: IoU = 0.7 / 1.3 = 0.538, a match at IoU 0.50 only (of 0.50:0.95)
    metrics = evaluate_records(make_coco(GT_XYWH), perfect_records(shift=0.3))
    assert metrics["map_50"] == pytest.approx(1.0)
    assert metrics["map_75"] == pytest.approx(0.0)
    assert metrics["map"] == pytest.approx(0.1)
    assert metrics["mar_100"] == pytest.approx(0.1)
    assert metrics["det_iou"] == pytest.approx(0.7 / 1.3, abs=1e-4)


def test_one_missed_box_of_two_in_a_class():
    records = perfect_records()
    keep = records[1].labels != 1  # drop image 2's class-1 (the only medium) detection
    records[1] = record(2, records[1].boxes[keep].tolist(), records[1].labels[keep].tolist())
    metrics = evaluate_records(make_coco(GT_XYWH), records)
    # class 1 finds 1 of 2 at precision 1: recall points 0.00..0.50 of 101 -> AP 51/101
    assert metrics["map"] == pytest.approx((51 / 101 + 1 + 1) / 3)
    assert metrics["mar_100"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert metrics["map_small"] == pytest.approx(1.0)  # the missed box is medium
    assert metrics["map_medium"] == pytest.approx(0.0)
    assert metrics["gt_iou"] == pytest.approx(3 / 4)


def test_image_ids_restrict_the_evaluation():
    coco = make_coco(GT_XYWH)
    only_image_1 = perfect_records()[:1]
    subset = evaluate_records(coco, only_image_1)  # default: the records' images
    assert subset["map"] == pytest.approx(1.0) and subset["gt_iou"] == pytest.approx(1.0)
    whole = evaluate_records(coco, only_image_1, image_ids=coco.getImgIds())
    assert whole["map"] < 1.0 and whole["gt_iou"] == pytest.approx(0.5)
    assert coco_metrics(coco, to_coco_results(only_image_1), image_ids=[1])["map"] == pytest.approx(
        1.0
    )


def test_empty_results():
    metrics = coco_metrics(make_coco(GT_XYWH), [])
    assert set(metrics) == set(COCO_KEYS)
    assert metrics["map"] == 0.0 and metrics["mar_100"] == 0.0
    assert math.isnan(metrics["map_large"])
    assert math.isnan(evaluate_records(make_coco(GT_XYWH), [])["map"])  # no images to score


def test_unknown_image_ids_are_a_user_error():
    with pytest.raises(UserError, match="not in the dataset: 99"):
        evaluate_records(make_coco(GT_XYWH), [record(99, [[0, 0, 1, 1]], [1])])


def test_results_round_trip_and_rescoring_the_json_file(tmp_path):
    records = perfect_records(shift=0.3)
    results = to_coco_results(records)
    assert results[0] == {
        "image_id": 1,
        "category_id": 1,
        "bbox": [16.0, 10.0, 20.0, 20.0],
        "score": 0.9,
    }
    back = records_from_coco_results(results)
    assert [r.image_id for r in back] == [1, 2] and back[0].proposals is None
    for original, restored in zip(records, back, strict=True):
        assert_close(restored.boxes, original.boxes)
        assert_close(restored.scores, original.scores, atol=1e-5, rtol=0)
        assert torch.equal(restored.labels, original.labels)
    assert to_coco_results(back) == results
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps(results))
    coco = make_coco(GT_XYWH)
    rescored = coco_metrics(coco, json.loads(path.read_text()))
    expected = evaluate_records(coco, records)
    assert json.dumps(rescored) == json.dumps({key: expected[key] for key in COCO_KEYS})  # NaN too


@pytest.mark.parametrize(
    ("results", "message"),
    [
        ({"image_id": 1}, "JSON list"),
        ([[1, 2]], "#0 is not an object"),
        ([{"image_id": "1", "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}], "'image_id'"),
        ([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1], "score": 1}], "'bbox' must be 4"),
        ([{"image_id": 1, "category_id": 1, "bbox": [0, 0, -1, 1], "score": 1}], ">= 0"),
        ([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": None}], "'score'"),
    ],
)
def test_malformed_results_are_a_user_error(results, message):
    with pytest.raises(UserError, match=message):
        records_from_coco_results(results)


def test_dedupe_keeps_one_record_per_image():
    a, b = perfect_records()
    deduped = dedupe_records([b, a, b, record(1, [], [])])
    assert [r.image_id for r in deduped] == [1, 2] and deduped[0] is a
