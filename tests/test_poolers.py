"""roi_align_matmul / MatmulRoIAlign against torchvision's roi_align, forward and backward, and
ChannelsLastTwoMLPHead against torchvision's TwoMLPHead."""

import warnings

import pytest
import torch
from torch.testing import assert_close
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign, roi_align, roi_pool

from coorddet.poolers import (
    ChannelsLastTwoMLPHead,
    MatmulRoIAlign,
    SingleMapRoIPool,
    roi_align_matmul,
)


def _boxes(counts: list[int], canvas: float = 64.0) -> list[torch.Tensor]:
    """xyxy pixel boxes, some partly or wholly outside the canvas, some tinier than a cell."""
    generator = torch.Generator().manual_seed(0)
    boxes = []
    for count in counts:
        corner = torch.rand(count, 2, generator=generator) * (canvas + 8) - 6
        size = torch.rand(count, 2, generator=generator) * 30 + 0.1
        boxes.append(torch.cat([corner, corner + size], dim=1))
    return boxes


# [9, 0, 6]: an image without RoIs (image by image); [7, 7, 7]: as training samples them (one
# batched product when autograd records).
@pytest.mark.parametrize("counts", [[9, 0, 6], [7, 7, 7]])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("sampling_ratio", [2, 1, 0])
@pytest.mark.parametrize("output_size", [7, 5])
def test_matches_torchvision_roi_align_forward_and_backward(
    sampling_ratio, output_size, memory_format, counts
):
    torch.manual_seed(0)
    features = torch.randn(3, 4, 16, 13, dtype=torch.float64).contiguous(
        memory_format=memory_format
    )
    features.requires_grad_(True)
    boxes = [b.double() for b in _boxes(counts, canvas=52)]
    ours = roi_align_matmul(features, boxes, output_size, 0.25, sampling_ratio)
    theirs = roi_align(features, boxes, output_size, 0.25, sampling_ratio, aligned=False)
    assert_close(ours, theirs)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # inference: always image by image
        assert_close(roi_align_matmul(features, boxes, output_size, 0.25, sampling_ratio), theirs)
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


def test_roi_align_without_any_roi():
    pooled = roi_align_matmul(torch.randn(2, 4, 16, 16), _boxes([0, 0]), 7, 0.25, 2)
    assert pooled.shape == (0, 4, 7, 7)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_channels_last_head_matches_torchvision_two_mlp_head(memory_format):
    torch.manual_seed(0)
    ours = ChannelsLastTwoMLPHead(8 * 7 * 7, 32).double()
    theirs = TwoMLPHead(8 * 7 * 7, 32).double()
    theirs.load_state_dict(ours.state_dict())  # same parameters, same checkpoint keys
    features = torch.randn(5, 8, 7, 7, dtype=torch.float64)
    output = ours(features.contiguous(memory_format=memory_format))
    expected = theirs(features)
    assert_close(output, expected)
    grad = torch.randn_like(expected)
    ours_grads = torch.autograd.grad(output, list(ours.parameters()), grad)
    theirs_grads = torch.autograd.grad(expected, list(theirs.parameters()), grad)
    for ours_grad, theirs_grad in zip(ours_grads, theirs_grads, strict=True):
        assert_close(ours_grad, theirs_grad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(ours)
    assert_close(scripted(features.contiguous(memory_format=memory_format)), expected)
