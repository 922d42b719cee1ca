"""The confusion matrix on a hand-made case: matches, a wrong class, a miss, a false alarm."""

from __future__ import annotations

import numpy as np
import torch

from coorddet.class_metrics import category_names, confusion_matrix
from coorddet.metrics import GroundTruth
from coorddet.predictions import ImagePrediction


def test_confusion_counts_true_against_predicted_with_background():
    gts = {
        1: GroundTruth(torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), torch.tensor([1, 2])),
        2: GroundTruth(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([2])),
    }
    records = [
        ImagePrediction(  # a hit on category 1, category 1 on the 2, a false alarm, one too low
            1,
            torch.tensor([[0.0, 0, 10, 10], [21, 21, 30, 30], [40, 40, 50, 50], [20, 20, 30, 30]]),
            torch.tensor([0.9, 0.8, 0.7, 0.1]),
            torch.tensor([1, 1, 2, 2]),
        ),
        # image 2: no record, its box is missed
    ]
    matrix = confusion_matrix(records, gts, [1, 2], score_thresh=0.5)
    expected = np.array([[1, 0, 0],   # true 1: predicted 1
                         [1, 0, 1],   # true 2: predicted 1 once, missed once
                         [0, 1, 0]])  # background: a detection of 2 matching nothing  # fmt: skip
    np.testing.assert_array_equal(matrix, expected)


def test_a_box_is_matched_once_best_score_first():
    gts = {1: GroundTruth(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([1]))}
    records = [ImagePrediction(1, torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 11]]),
                               torch.tensor([0.6, 0.9]), torch.tensor([2, 1]))]  # fmt: skip
    matrix = confusion_matrix(records, gts, [1, 2])
    np.testing.assert_array_equal(matrix, [[1, 0, 0], [0, 0, 0], [0, 1, 0]])


def test_category_names_are_unique():
    names = category_names([{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "a"}])
    assert names == {1: "a (1)", 2: "b", 3: "a (3)"}
