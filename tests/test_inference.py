"""coorddet.inference's tripwires: its use of torchvision's internals gives torchvision's outputs.

The batched RPN filtering and detection post-processing give torchvision's outputs bit for bit;
``predict_with_proposals`` gives exactly ``model(images)``; ``paper_proposals`` is the RPN with
the paper's settings.
"""

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torchvision.models.detection import FasterRCNN, fasterrcnn_mobilenet_v3_large_320_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import MultiScaleRoIAlign, box_iou

from coorddet.inference import (
    BatchedRegionProposalNetwork,
    BatchedRoIHeads,
    paper_proposals,
    predict_with_proposals,
    use_batched_postprocessing,
)
from coorddet.models import build_model

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


def _ground_truth(counts: list[int], anchors: torch.Tensor, generator: torch.Generator):
    """Per image: ``counts[i]`` boxes, with a duplicate (tied IoUs) and an anchor itself."""
    targets = []
    for count in counts:
        boxes = _boxes(count, generator, spread=60.0) + torch.tensor([0.0, 0.0, 4.0, 4.0])
        if count >= 2:
            boxes[1] = boxes[0]
        if count >= 3:
            boxes[2] = anchors[11]
        targets.append(
            {"boxes": boxes, "labels": torch.randint(1, 11, (count,), generator=generator)}
        )
    return targets


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0], [4]])
def test_anchor_and_proposal_matching_is_torchvision_s(counts):
    model = build_model().train()
    generator = torch.Generator().manual_seed(2)
    grid = _boxes(400, generator, spread=60.0)
    targets = _ground_truth(counts, grid, generator)
    anchors = [grid.clone() for _ in counts]
    mine = model.rpn.assign_targets_to_anchors(anchors, targets)
    theirs = RegionProposalNetwork.assign_targets_to_anchors(model.rpn, anchors, targets)
    for mine_part, their_part in zip(mine, theirs, strict=True):
        _assert_identical(mine_part, their_part)
    labels = set(torch.cat(mine[0]).tolist())
    assert labels == ({-1.0, 0.0, 1.0} if max(counts) >= 3 else {0.0})  # an anchor is a box
    proposals = [
        grid[torch.randperm(400, generator=generator)[: 50 + 60 * i]] for i in range(len(counts))
    ]
    args = (proposals, [t["boxes"] for t in targets], [t["labels"] for t in targets])
    mine = model.roi_heads.assign_targets_to_proposals(*args)
    theirs = RoIHeads.assign_targets_to_proposals(model.roi_heads, *args)
    for mine_part, their_part in zip(mine, theirs, strict=True):
        _assert_identical(mine_part, their_part)


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


def test_any_torchvision_faster_rcnn_keeps_its_detections():
    """On torchvision's own builder, images of other sizes and aspect ratios in one batch."""
    torch.manual_seed(0)
    detector = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None)
    detector.roi_heads.score_thresh = 0.0  # an untrained detector's scores are low
    plain = copy.deepcopy(detector).eval()
    batched = use_batched_postprocessing(detector).eval()
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


# Step-by-step torchvision inference ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model() -> FasterRCNN:
    """A random FasterRCNN with a two-conv backbone on 1-channel 64x64 inputs."""
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1)
    )
    backbone.out_channels = 8
    model = FasterRCNN(
        backbone,
        num_classes=11,
        min_size=64,
        max_size=64,
        image_mean=[0.5],
        image_std=[0.25],
        rpn_anchor_generator=AnchorGenerator(((8, 16, 32),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2),
        representation_size=32,
    )
    return model.eval()


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.rand(1, h, w, generator=generator) for h, w in [(64, 64), (48, 40), (40, 56)]]


def test_predict_with_proposals_equals_the_model(tiny_model, images):
    expected = tiny_model(images)
    calls = []
    hook = tiny_model.transform.register_forward_hook(lambda *args: calls.append(1))
    try:
        records = predict_with_proposals(tiny_model, images, image_ids=[5, 6, 7])
    finally:
        hook.remove()
    assert calls == [1]  # module calls: CoordConv's hooks on the transform fire
    assert [r.image_id for r in records] == [5, 6, 7]
    assert sum(len(r.boxes) for r in records) > 0
    for want, got, image in zip(expected, records, images, strict=True):
        assert_close(got.boxes, want["boxes"], rtol=0, atol=0)
        assert_close(got.scores, want["scores"], rtol=0, atol=0)
        assert torch.equal(got.labels, want["labels"])
        height, width = image.shape[-2:]
        assert 0 < len(got.proposals) <= 10  # original pixels, like the detections:
        assert (got.proposals >= 0).all() and (got.proposals[:, 2] <= width).all()
        assert (got.proposals[:, 3] <= height).all()
        assert box_iou(got.proposals, got.proposals).triu(diagonal=1).max() <= 0.8 + 1e-6


def test_predict_with_proposals_reuses_the_rpn_head_and_leaves_the_model_as_it_was(
    tiny_model, images
):
    """The paper's proposals come from the RPN head outputs of the main pass: the same boxes as
    a second full RPN pass, one head call, and the model's own RPN keeps its submodules."""
    head, anchors = tiny_model.rpn.head, tiny_model.rpn.anchor_generator
    calls = []
    hook = head.register_forward_hook(lambda *args: calls.append(1))
    try:
        records = predict_with_proposals(tiny_model, images, image_ids=[5, 6, 7])
    finally:
        hook.remove()
    assert calls == [1]
    assert tiny_model.rpn.head is head and tiny_model.rpn.anchor_generator is anchors
    with torch.no_grad():
        image_list, _ = tiny_model.transform(images)
        features = tiny_model.backbone(image_list.tensors)
    recomputed = paper_proposals(tiny_model, image_list, {"0": features})
    sizes = image_list.image_sizes
    for record, boxes, image, size in zip(records, recomputed, images, sizes, strict=True):
        want = resize_boxes(boxes, tuple(size), tuple(image.shape[-2:]))
        assert torch.equal(record.proposals, want)


# short: some image keeps fewer than top_k, so NMS runs again over every candidate
@pytest.mark.parametrize(
    ("nms_iou", "top_k", "short"),
    [(0.8, 3, False), (0.8, 10, False), (0.1, 10, False), (0.1, 40, True)],
)
def test_paper_proposals_shortlist_gives_what_nms_over_every_candidate_gives(
    tiny_model, images, nms_iou, top_k, short
):
    with torch.no_grad():
        image_list, _ = tiny_model.transform(images)
        features = tiny_model.backbone(image_list.tensors)
        rpn = copy.copy(tiny_model.rpn)  # the paper's settings, every candidate through NMS
        rpn.nms_thresh, rpn._post_nms_top_n = nms_iou, {"training": top_k, "testing": top_k}
        expected, _ = rpn(image_list, {"0": features})
    got = paper_proposals(tiny_model, image_list, features, top_k=top_k, nms_iou=nms_iou)
    assert any(len(boxes) < top_k for boxes in got) == short
    for want, boxes in zip(expected, got, strict=True):
        assert torch.equal(boxes, want)


def test_predict_with_proposals_restores_training_mode(tiny_model, images):
    tiny_model.train()
    try:
        records = predict_with_proposals(tiny_model, images[:1], image_ids=[0], top_k=3)
        assert all(module.training for module in tiny_model.modules())
    finally:
        tiny_model.eval()
    assert len(records[0].proposals) <= 3


def test_paper_proposals_is_the_rpn_with_other_settings(tiny_model, images):
    rpn = tiny_model.rpn
    settings = (rpn.nms_thresh, dict(rpn._post_nms_top_n), dict(rpn._pre_nms_top_n))
    with torch.no_grad():
        image_list, _ = tiny_model.transform(images)
        features = tiny_model.backbone(image_list.tensors)
        default, _ = rpn(image_list, {"0": features})
    same = paper_proposals(
        tiny_model, image_list, features, top_k=rpn.post_nms_top_n(), nms_iou=rpn.nms_thresh
    )
    for want, got in zip(default, same, strict=True):
        assert torch.equal(got, want)
    top_10 = paper_proposals(tiny_model, image_list, features)
    all_08 = paper_proposals(tiny_model, image_list, features, top_k=1000)
    for few, many in zip(top_10, all_08, strict=True):
        assert len(few) == min(10, len(many)) and torch.equal(few, many[:10])  # best first
    assert (rpn.nms_thresh, rpn._post_nms_top_n, rpn._pre_nms_top_n) == settings
