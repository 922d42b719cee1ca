"""The batched RPN filtering and detection post-processing give torchvision's outputs exactly."""

import copy

import pytest
import torch
from torchvision.models.detection import FasterRCNN, fasterrcnn_mobilenet_v3_large_320_fpn
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork

from coorddet.models import build_model
from coorddet.postprocess import (
    BatchedRegionProposalNetwork,
    BatchedRoIHeads,
    batch_postprocessing,
)

SHAPES = [(64, 64), (40, 64), (64, 23)]  # per-image clipping bounds differ


def _boxes(count: int, generator: torch.Generator, spread: float = 90.0) -> torch.Tensor:
    """xyxy boxes, many partly outside a 64 px canvas, some thinner than any min_size."""
    corner = torch.rand(count, 2, generator=generator) * spread - 15
    size = torch.rand(count, 2, generator=generator) * 30
    size[::7] *= 1e-4  # tiny: dropped as small boxes
    return torch.cat([corner, corner + size], dim=1)


def _assert_identical(mine: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("levels", [[300], [120, 60, 30]])
@pytest.mark.parametrize("training", [False, True])
def test_filter_proposals_is_torchvision_s(levels, training):
    model = build_model(rpn_pre_nms_top_n_train=50, rpn_pre_nms_top_n_test=80)
    rpn = model.rpn.train(training)
    rpn.score_thresh = 0.3  # some proposals fall below it
    assert isinstance(rpn, BatchedRegionProposalNetwork)
    generator = torch.Generator().manual_seed(0)
    proposals = _boxes(len(SHAPES) * sum(levels), generator).view(len(SHAPES), -1, 4)
    objectness = torch.randn(len(SHAPES) * sum(levels), 1, generator=generator)
    args = (proposals, objectness, SHAPES, levels)
    mine, theirs = rpn.filter_proposals(*args), RegionProposalNetwork.filter_proposals(rpn, *args)
    for mine_part, their_part in zip(mine, theirs, strict=True):
        _assert_identical(mine_part, their_part)
    assert 0 < sum(len(boxes) for boxes in mine[0]) < len(SHAPES) * rpn.post_nms_top_n()


@pytest.mark.parametrize("counts", [[30, 0, 17], [25, 25, 25]])
def test_postprocess_detections_is_torchvision_s(counts):
    heads = build_model(box_score_thresh=0.12, box_detections_per_img=9).roi_heads.eval()
    assert isinstance(heads, BatchedRoIHeads)
    generator = torch.Generator().manual_seed(1)
    classes = heads.box_predictor.cls_score.out_features
    proposals = [_boxes(count, generator, spread=70.0) for count in counts]
    logits = torch.randn(sum(counts), classes, generator=generator) * 3
    regression = torch.randn(sum(counts), classes * 4, generator=generator)
    args = (logits, regression, proposals, SHAPES)
    mine = heads.postprocess_detections(*args)
    theirs = RoIHeads.postprocess_detections(heads, *args)
    for mine_part, their_part in zip(mine, theirs, strict=True):
        _assert_identical(mine_part, their_part)
    found = [len(boxes) for boxes in mine[0]]
    assert [n for n, count in zip(found, counts, strict=True) if count == 0] in ([], [0])
    assert max(found) == 9  # capped at detections_per_img


def _torchvision_heads(model: FasterRCNN) -> FasterRCNN:
    plain = copy.deepcopy(model)
    plain.rpn.__class__ = RegionProposalNetwork
    plain.roi_heads.__class__ = RoIHeads
    return plain


@pytest.mark.parametrize("backbone", ["mnist-small", "mobilenet-v3-fpn"])
def test_detector_outputs_and_losses_are_torchvision_s(backbone):
    torch.manual_seed(0)
    model = build_model(backbone=backbone, box_score_thresh=0.0)
    plain = _torchvision_heads(model)
    assert model.state_dict().keys() == plain.state_dict().keys()
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(1, 64, 64, generator=generator) for _ in range(3)]
    with torch.no_grad():
        for mine, theirs in zip(model.eval()(images), plain.eval()(images), strict=True):
            assert mine.keys() == theirs.keys()
            assert len(mine["boxes"]) > 0
            for key in mine:
                assert torch.equal(mine[key], theirs[key]), key
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 24.0, 28.0]]), "labels": torch.tensor([3])}] * 3
    torch.manual_seed(1)  # the samplers draw at random
    mine = model.train()(images, targets)
    torch.manual_seed(1)
    theirs = plain.train()(images, targets)
    assert {key: value.item() for key, value in mine.items()} == {
        key: value.item() for key, value in theirs.items()
    }


def test_settings_survive_the_swap():
    model = build_model(
        rpn_pre_nms_top_n_test=77,
        rpn_post_nms_top_n_train=33,
        rpn_batch_size_per_image=64,
        box_batch_size_per_image=48,
        box_detections_per_img=7,
        box_score_thresh=0.2,
    )
    rpn, heads = model.rpn, model.roi_heads
    assert rpn._pre_nms_top_n["testing"] == 77 and rpn._post_nms_top_n["training"] == 33
    assert rpn.fg_bg_sampler.batch_size_per_image == 64
    assert (rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold) == (0.7, 0.3)
    assert rpn.nms_thresh == 0.7 and rpn.min_size == 1e-3
    assert heads.fg_bg_sampler.batch_size_per_image == 48
    assert (heads.detections_per_img, heads.score_thresh, heads.nms_thresh) == (7, 0.2, 0.5)
    assert heads.box_coder.weights == (10.0, 10.0, 5.0, 5.0)
    assert heads.proposal_matcher.high_threshold == 0.5


def test_any_torchvision_faster_rcnn_keeps_its_detections():
    """On torchvision's own builder, images of other sizes and aspect ratios in one batch."""
    torch.manual_seed(0)
    detector = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None)
    detector.roi_heads.score_thresh = 0.0  # an untrained detector's scores are low
    plain = copy.deepcopy(detector).eval()
    batched = batch_postprocessing(detector).eval()
    assert isinstance(batched.rpn, BatchedRegionProposalNetwork)
    generator = torch.Generator().manual_seed(0)
    images = [
        torch.rand(3, 200, 300, generator=generator),
        torch.rand(3, 240, 130, generator=generator),
    ]
    with torch.no_grad():
        mine, theirs = batched(images), plain(images)
    for image_mine, image_theirs in zip(mine, theirs, strict=True):
        assert len(image_mine["boxes"]) > 0
        for key in image_mine:
            assert torch.equal(image_mine[key], image_theirs[key]), key
