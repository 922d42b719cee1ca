"""Boxes stay float32 under bf16 autocast at COCO-sized coordinates: anchors, decoding,
matching and RoI boxes equal a float32 run's where they used to be rounded to 4-8 px."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import roi_align

from coorddet.fp32_boxes import FloatAnchorGenerator
from coorddet.models import build_model
from coorddet.poolers import roi_align_matmul
from coorddet.released import ReceptiveFieldAnchors

HEIGHT, WIDTH = 800, 1333  # coco_resnet50_fpn.yaml's images
SIZES, RATIOS = ((32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 3


def _maps(dtype: torch.dtype) -> tuple[ImageList, list[torch.Tensor]]:
    images = ImageList(torch.zeros(1, 3, HEIGHT, 1344), [(HEIGHT, WIDTH)])
    maps = [torch.zeros(1, 8, HEIGHT // s, 1344 // s, dtype=dtype) for s in (8, 16, 32)]
    return images, maps


def test_anchors_of_bf16_maps_are_the_float32_anchors():
    images, maps = _maps(torch.float32)
    exact = AnchorGenerator(SIZES, RATIOS)(images, maps)[0]
    images, maps = _maps(torch.bfloat16)
    ours = FloatAnchorGenerator(SIZES, RATIOS)(images, maps)[0]
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, exact, rtol=0, atol=0)
    rounded = AnchorGenerator(SIZES, RATIOS)(images, maps)[0]  # torchvision's: bf16 anchors
    assert (rounded.float() - exact).abs().max() >= 2.0  # bf16 steps of 8 px above 1024


def test_released_anchors_of_bf16_maps_are_float32():
    generator = ReceptiveFieldAnchors(first=2.0, stride=4.0)
    images = ImageList(torch.zeros(1, 1, HEIGHT, WIDTH), [(HEIGHT, WIDTH)])
    exact = generator(images, [torch.zeros(1, 8, 200, 333)])[0]
    ours = generator(images, [torch.zeros(1, 8, 200, 333, dtype=torch.bfloat16)])[0]
    torch.testing.assert_close(ours, exact, rtol=0, atol=0)


def test_roi_align_samples_bf16_features_at_float32_positions():
    torch.manual_seed(0)
    features = torch.rand(1, 4, 200, 333)
    boxes = [torch.tensor([[1001.3, 601.7, 1207.9, 777.1], [3.2, 5.5, 40.1, 60.7]])]
    exact = roi_align(features, boxes, 7, 0.25, 2, aligned=False)
    ours = roi_align_matmul(features.bfloat16(), boxes, 7, 0.25, 2).float()
    # bf16 values and weights: ~3 significant digits, not whole cells off
    torch.testing.assert_close(ours, exact, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("detector", ["faster-rcnn", "retinanet", "fcos"])
def test_detector_boxes_are_float32_under_bf16_autocast(detector):
    """Anchors equal a float32 run's exactly; the box outputs that decoding and the losses
    read are float32, so proposals, matches and detections are too."""
    torch.manual_seed(0)
    # a strip 1,333 px wide: COCO-sized x coordinates at a fraction of the pixels
    model = build_model(detector=detector, keep_image_size=True).eval()
    seen: dict[str, list] = {"anchors": [], "boxes": []}
    generator = model.rpn.anchor_generator if detector == "faster-rcnn" else model.anchor_generator
    generator.register_forward_hook(lambda m, args, out: seen["anchors"].append(out[0]))
    head = model.rpn.head if detector == "faster-rcnn" else model.head
    head.register_forward_hook(
        lambda m, args, out: seen["boxes"].append(
            out[1][0] if isinstance(out, tuple) else out["bbox_regression"]
        )
    )
    image = [torch.rand(1, 96, WIDTH)]
    with torch.no_grad():
        model(image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            detections = model(image)
    exact, mixed = seen["anchors"]
    torch.testing.assert_close(mixed, exact, rtol=0, atol=0)
    assert seen["boxes"][1].dtype == torch.float32
    assert detections[0]["boxes"].dtype == torch.float32


def test_ground_truth_is_matched_in_float32_whatever_the_anchors_dtype():
    model = build_model().train()
    images, maps = _maps(torch.float32)
    anchors = model.rpn.anchor_generator(images, [maps[0][:, :, :, :]])
    box = torch.tensor([[1001.3, 601.7, 1207.9, 777.1]])
    bf16_anchors = [a.bfloat16() for a in anchors]
    _, matched = model.rpn.assign_targets_to_anchors(bf16_anchors, [{"boxes": box}])
    hit = matched[0][(matched[0] != 0).any(dim=1)]
    assert hit.shape[0] > 0
    torch.testing.assert_close(hit, box.expand_as(hit), rtol=0, atol=0)
