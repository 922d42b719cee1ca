"""The report plots are whole PNG files of the expected size, written without leftovers."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from coorddet.plots import plot_detections, plot_iou_distribution
from coorddet.predictions import ImagePrediction


def prediction(image_id: int, boxes, labels, scores) -> ImagePrediction:
    return ImagePrediction(
        image_id=image_id,
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        scores=torch.tensor(scores, dtype=torch.float32),
        labels=torch.tensor(labels, dtype=torch.int64),
    )


def test_plot_detections_grid(tmp_path):
    images = [np.zeros((64, 64), np.uint8), np.full((64, 64), 80, np.uint8)]
    images[0][10:30, 10:30] = 255
    gts = [
        (torch.tensor([[10.0, 10, 30, 30]]), torch.tensor([4])),
        (np.zeros((0, 4)), np.zeros(0, dtype=np.int64)),  # a canvas without digits
    ]
    runs = {
        "baseline": [
            prediction(0, [[12, 9, 31, 30], [0, 0, 5, 5]], [4, 2], [0.9, 0.1]),
            prediction(1, [], [], []),
        ],
        "coordconv": [
            prediction(0, [[10, 10, 30, 30]], [4], [0.99]),
            prediction(1, [[1, 1, 9, 9]], [8], [0.6]),
        ],
    }
    path = plot_detections(images, gts, runs, tmp_path / "report" / "detections.png")
    with Image.open(path) as png:
        assert png.format == "PNG"
        width, height = png.size
    assert 500 <= width <= 800 and 350 <= height <= 550  # 3 columns x 2 rows of 2.2-inch cells
    assert [p.name for p in path.parent.iterdir()] == ["detections.png"]  # no temp file left

    named = plot_detections(images[:1], gts[:1], {}, tmp_path / "gt.png", categories={4: "four"})
    with Image.open(named) as png:
        assert png.size[0] < width


def test_plot_iou_distribution(tmp_path):
    generator = np.random.default_rng(0)
    ious = {
        "baseline": generator.uniform(0.3, 0.9, 200),
        "coordconv": generator.uniform(0.6, 1.0, 200),
        "outside": np.zeros(0),  # no ground truth: skipped, no crash
    }
    path = plot_iou_distribution(ious, tmp_path / "iou.png")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (1000, 400)
    assert [p.name for p in tmp_path.iterdir()] == ["iou.png"]
