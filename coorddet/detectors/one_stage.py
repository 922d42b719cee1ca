"""One-stage detectors from torchvision's classes: RetinaNet, FCOS and SSDlite.

Each is torchvision's own model class, handed a coorddet backbone, an anchor generator sized
for the data and a head sized for the backbone; the transform is swapped for
:class:`coorddet.detectors.parts.GrayscaleTransform` (those classes accept no transform), so
gray and colour images reach the backbone as for Faster R-CNN. ``box_score_thresh`` and
``box_detections_per_img`` are each detector's inference settings; the rest are torchvision's
defaults. On ``mnist-small`` all three run on its one stride-4 map.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.ssd import SSD

from coorddet.detectors import parts
from coorddet.detectors.options import AnchorOptions, BoxHeadOptions, ImageOptions
from coorddet.fp32_boxes import (
    FloatAnchorGenerator,
    FloatBoxFCOSHead,
    FloatBoxRetinaNetHead,
    FloatBoxSSDLiteHead,
)


def retinanet(
    *, image: ImageOptions, anchors: AnchorOptions, box_head: BoxHeadOptions, num_classes: int
) -> RetinaNet:
    """RetinaNet: focal loss over every anchor, a classification and a regression tower."""
    generator = anchors.generator(image)
    body = parts.backbone(image)
    head = FloatBoxRetinaNetHead(
        body.out_channels, generator.num_anchors_per_location()[0], num_classes
    )
    return _assemble(RetinaNet, body, num_classes, image, box_head,
                     anchor_generator=generator, head=head)  # fmt: skip


def fcos(
    *, image: ImageOptions, anchors: AnchorOptions, box_head: BoxHeadOptions, num_classes: int
) -> FCOS:
    """FCOS: anchor-free, boxes as distances from each map cell, plus a centerness score.

    One "anchor" per cell sets the cell's position and scale: its side is the map's stride
    (torchvision's choice), unless ``anchor_sizes`` gives one size per map."""
    body = parts.backbone(image)
    if anchors.anchor_sizes is None:
        sizes = tuple((stride,) for stride in _strides(body, image))
    else:
        sizes = tuple(tuple(level) for level in anchors.generator(image).sizes)
    generator = FloatAnchorGenerator(sizes, ((1.0,),) * len(sizes))
    head = FloatBoxFCOSHead(body.out_channels, 1, num_classes)
    return _assemble(FCOS, body, num_classes, image, box_head,
                     anchor_generator=generator, head=head)  # fmt: skip


def ssdlite(
    *, image: ImageOptions, anchors: AnchorOptions, box_head: BoxHeadOptions, num_classes: int
) -> SSD:
    """SSDlite: SSD's matching and hard-negative mining with depthwise-separable heads, on
    the backbone's maps and the data's anchors."""
    generator = anchors.generator(image)
    body = parts.backbone(image)
    channels = [body.out_channels] * image.spec.feature_maps
    head = FloatBoxSSDLiteHead(
        channels, generator.num_anchors_per_location(), num_classes, nn.BatchNorm2d
    )
    return _assemble(SSD, body, num_classes, image, box_head, anchor_generator=generator,
                     size=image.sizes, head=head)  # fmt: skip


def _assemble(
    detector: type[nn.Module],
    body: nn.Module,
    num_classes: int,
    image: ImageOptions,
    box_head: BoxHeadOptions,
    **parts_: Any,
) -> nn.Module:
    """torchvision's ``detector`` class from these parts, with coorddet's transform."""
    model = detector(
        backbone=body,
        num_classes=num_classes,
        score_thresh=box_head.box_score_thresh,
        detections_per_img=box_head.box_detections_per_img,
        **parts_,
    )
    model.transform = parts.transform(image)
    return model


def _strides(body: nn.Module, image: ImageOptions) -> list[int]:
    """Each feature map's stride, from one forward of a blank image (no state changes)."""
    side = 256
    training = body.training
    body.eval()
    try:
        with torch.no_grad():
            features = body(torch.zeros(1, image.channels, side, side))
    finally:
        body.train(training)
    if isinstance(features, torch.Tensor):
        features = {"0": features}
    return [side // feature.shape[-1] for feature in features.values()]
