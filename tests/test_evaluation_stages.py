"""Evaluation as three public stages (predict -> score -> write), each usable on its own, and
giving what ``coorddet.evaluate`` gives for the same checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from coorddet.checkpoint import load_checkpoint
from coorddet.data import CocoDataset
from coorddet.evaluation import (
    Comparison,
    evaluate,
    predict,
    predict_batch,
    score,
    score_per_class,
    score_runs,
    write_report,
)
from coorddet.evaluation.reporting import PLOTS
from coorddet.models import build_model
from coorddet.predictions import with_category_ids


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_dataset, smoke_runs) -> dict:
    """coorddet.evaluate's metrics.json for the smoke baseline, as the reference."""
    ckpt = smoke_runs["baseline"] / "checkpoints" / "best.ckpt"
    out = tmp_path_factory.mktemp("stages") / "report"
    result = evaluate(data=tiny_dataset, split="test", out=out, checkpoints=[ckpt], quiet=True)
    return {"checkpoint": ckpt, "metrics": result.metrics["baseline"]}


def test_predict_then_score_gives_evaluate_s_metrics(tiny_dataset, evaluated):
    checkpoint = load_checkpoint(evaluated["checkpoint"])
    dataset = CocoDataset(tiny_dataset, "test")
    records = predict(checkpoint.build_model(), dataset, batch_size=3)
    assert [r.image_id for r in records] == dataset.image_ids
    assert all(r.proposals is not None and len(r.proposals) <= 10 for r in records)
    records = with_category_ids(records, checkpoint.category_ids)
    metrics = score(dataset.coco, records, image_ids=dataset.image_ids)
    per_class = score_per_class(dataset.coco, {"a": records}, image_ids=dataset.image_ids)["a"]
    assert {**metrics, "per_class": per_class} == evaluated["metrics"]
    assert score_runs(dataset.coco, {"a": records}, image_ids=dataset.image_ids) == {"a": metrics}


def test_predict_on_a_list_of_images_is_the_model_s_own_output():
    torch.manual_seed(0)
    model = build_model(box_score_thresh=0.0).eval()
    images = [torch.rand(1, 64, 64), torch.rand(1, 48, 64), torch.rand(1, 64, 56)]
    records = predict(model, images, batch_size=2, proposals=False)
    with torch.no_grad():
        expected = model(images)
    assert [r.image_id for r in records] == [0, 1, 2]
    for record, detections in zip(records, expected, strict=True):
        assert record.proposals is None and len(record.boxes) > 0
        assert_close(record.boxes, detections["boxes"])
        assert_close(record.scores, detections["scores"])
        assert torch.equal(record.labels, detections["labels"])
    with_proposals = predict_batch(model, images, image_ids=[7, 8, 9], rpn_top_k=4)
    assert [r.image_id for r in with_proposals] == [7, 8, 9]
    assert all(len(r.proposals) == 4 for r in with_proposals)
    assert_close(with_proposals[1].boxes, records[1].boxes)  # the same detections either way
    assert model.training is False


def test_rpn_only_records_score_rpn_iou_alone(tiny_dataset):
    torch.manual_seed(0)
    model = build_model(detector="rpn-only")
    dataset = CocoDataset(tiny_dataset, "test")
    records = predict(model, dataset)
    metrics = score(dataset.coco, records, image_ids=dataset.image_ids, detections=False)
    assert metrics["rpn_iou"] is not None and 0.0 <= metrics["rpn_iou"] <= 1.0
    assert all(value is None for key, value in metrics.items() if key != "rpn_iou")


def test_write_report_writes_every_file_from_scored_runs(tmp_path, tiny_dataset, evaluated):
    checkpoint = load_checkpoint(evaluated["checkpoint"])
    dataset = CocoDataset(tiny_dataset, "test")
    records = with_category_ids(predict(checkpoint.build_model(), dataset), checkpoint.category_ids)
    runs = {"mine": records}
    metrics = score_runs(dataset.coco, runs, image_ids=dataset.image_ids)
    metrics["mine"]["per_class"] = score_per_class(dataset.coco, runs, image_ids=dataset.image_ids)[
        "mine"
    ]
    comparison = Comparison(
        runs=runs,
        metrics=metrics,
        sources={"mine": "the predict stage"},
        baseline="mine",
        settings={"score_thresh": 0.5},
    )
    out = write_report(tmp_path / "report", comparison, dataset)
    names = {path.name for path in Path(out).iterdir()}
    assert names == {"metrics.json", "predictions_mine.json", "report.md", *PLOTS}
    assert json.loads((out / "metrics.json").read_text()) == {"mine": evaluated["metrics"]}
    assert "the predict stage" in (out / "report.md").read_text()
    assert "## Per class" in (out / "report.md").read_text()
