"""roi_align_matmul / MatmulRoIAlign against torchvision's roi_align, forward and backward."""

import warnings

import pytest
import torch
from torch.testing import assert_close
from torchvision.ops import MultiScaleRoIAlign, roi_align, roi_pool

from coorddet.poolers import MatmulRoIAlign, SingleMapRoIPool, roi_align_matmul


def _boxes(counts: list[int], canvas: float = 64.0) -> list[torch.Tensor]:
    """xyxy pixel boxes, some partly or wholly outside the canvas, some tinier than a cell."""
    generator = torch.Generator().manual_seed(0)
    boxes = []
    for count in counts:
        corner = torch.rand(count, 2, generator=generator) * (canvas + 8) - 6
        size = torch.rand(count, 2, generator=generator) * 30 + 0.1
        boxes.append(torch.cat([corner, corner + size], dim=1))
    return boxes


@pytest.mark.parametrize("sampling_ratio", [2, 1, 0])
@pytest.mark.parametrize("output_size", [7, 5])
def test_matches_torchvision_roi_align_forward_and_backward(sampling_ratio, output_size):
    torch.manual_seed(0)
    features = torch.randn(3, 4, 16, 13, dtype=torch.float64, requires_grad=True)
    boxes = [b.double() for b in _boxes([9, 0, 6], canvas=52)]  # an image without RoIs
    ours = roi_align_matmul(features, boxes, output_size, 0.25, sampling_ratio)
    theirs = roi_align(features, boxes, output_size, 0.25, sampling_ratio, aligned=False)
    assert_close(ours, theirs)
    grad = torch.randn_like(theirs)
    (ours_grad,) = torch.autograd.grad(ours, features, grad)
    (theirs_grad,) = torch.autograd.grad(theirs, features, grad)
    assert_close(ours_grad, theirs_grad)


def test_module_matches_multiscale_roi_align_and_scripts():
    features = {"0": torch.randn(2, 8, 16, 16)}
    boxes = _boxes([5, 4])
    shapes = [(64, 64), (60, 50)]
    ours = MatmulRoIAlign(["0"], 7, 2)
    expected = MultiScaleRoIAlign(["0"], 7, 2)(features, boxes, shapes)
    assert_close(ours(features, boxes, shapes), expected, atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(ours)
    assert_close(scripted(features, boxes, shapes), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one feature map"):
        MatmulRoIAlign(["0", "1"], 7, 2)


def test_single_map_roi_pool():
    features = {"0": torch.randn(2, 8, 16, 16)}
    boxes = _boxes([5, 4])
    pooled = SingleMapRoIPool("0", 5)(features, boxes, [(64, 64), (64, 64)])
    assert_close(pooled, roi_pool(features["0"], boxes, [5, 5], 0.25))
