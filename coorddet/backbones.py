"""The backbones ``build_model`` knows, by name: their networks and their defaults.

``mnist-small`` is the paper's small net (:class:`MnistSmallBackbone`); ``resnet50-fpn`` and
``mobilenet-v3-fpn`` are torchvision's backbones of ``fasterrcnn_resnet50_fpn`` and
``fasterrcnn_mobilenet_v3_large_fpn``. :data:`BACKBONE_SPECS` holds what the rest of the
detector needs to know about each (maps, normalisation, anchor sizes, ImageNet weights).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights, WeightsEnum
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

from coorddet.released import he_normal_

PADDINGS = ("same", "valid")
BACKBONE_INITS = ("default", "he-normal")


@dataclass(frozen=True)
class BackboneSpec:
    feature_maps: int  # how many maps the backbone returns
    roi_maps: tuple[str, ...]  # the maps RoIs are pooled from (absent names are skipped)
    image_mean: tuple[float, ...]  # one value per input channel the backbone takes
    image_std: tuple[float, ...]
    anchor_sizes: tuple  # pixels: one tuple for every map, or one tuple per map
    weights: WeightsEnum | None  # ImageNet weights for pretrained=True


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Digits are 15-25 px (median box side ~17 px, smaller where the border cuts them), so anchor
# sizes 12-24 px; resnet50-fpn: one size per FPN level (strides 4 .. 64) as torchvision does.
# mnist-small's mean/std: the default data_gen canvases (mostly black, ~2.4 digits each).
BACKBONE_SPECS = {
    "mnist-small": BackboneSpec(
        feature_maps=1,
        roi_maps=("0",),
        image_mean=(0.06,),
        image_std=(0.21,),
        anchor_sizes=(12, 18, 24),
        weights=None,
    ),
    "resnet50-fpn": BackboneSpec(
        feature_maps=5,
        roi_maps=("0", "1", "2", "3"),
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        anchor_sizes=((12,), (18,), (24,), (36,), (48,)),
        weights=ResNet50_Weights.IMAGENET1K_V1,
    ),
    "mobilenet-v3-fpn": BackboneSpec(
        feature_maps=3,
        roi_maps=("0", "1", "2", "3"),
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        anchor_sizes=(12, 18, 24),
        weights=MobileNet_V3_Large_Weights.IMAGENET1K_V1,
    ),
}
BACKBONES = tuple(BACKBONE_SPECS)


class MnistSmallBackbone(nn.Module):
    """The paper's small net for 64x64 grayscale canvases: (N, 1, H, W) -> (N, 64, H/4, W/4).

    ``body``: conv1 (5x5, 32) -> pool1 (2x2) -> relu1 -> conv2 (5x5, 64) -> pool2 -> relu2, so
    the stem is ``body.conv1`` like torchvision's ResNets. One feature map, stride 4.
    ``padding="valid"`` (the released code's default) gives a 13x13 map for 64x64 canvases.

    The paper's order is conv -> ReLU -> max-pool; max-pooling first gives the same numbers,
    forward and backward, bit for bit (ReLU is monotone, so the maximum of the rectified
    window is the rectified maximum, picked at the same place, and a window whose maximum is
    not positive passes no gradient either way; tested), with ReLU on a quarter of the values
    (faster: docs/speed.md).
    """

    def __init__(
        self, in_channels: int = 1, widths: Sequence[int] = (32, 64), padding: str = "same"
    ) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = in_channels
        for index, width in enumerate(widths, start=1):
            layers[f"conv{index}"] = nn.Conv2d(
                channels, width, kernel_size=5, padding=2 if padding == "same" else 0
            )
            layers[f"pool{index}"] = nn.MaxPool2d(2)
            layers[f"relu{index}"] = nn.ReLU(inplace=True)
            channels = width
        self.body = nn.Sequential(layers)
        self.out_channels = channels

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def pretrained_weights(name: str) -> WeightsEnum:
    """The backbone's ImageNet weights, if their file is in the local torch hub cache.

    Raises:
        ValueError: ``name`` has no pretrained weights, or their file is not in the cache
            (nothing is ever downloaded).
    """
    spec = BACKBONE_SPECS[name]
    if spec.weights is None:
        valid = [other for other, s in BACKBONE_SPECS.items() if s.weights is not None]
        raise ValueError(
            f"pretrained=True is not valid for backbone={name!r}, which has no pretrained "
            f"weights; backbones with pretrained weights: {', '.join(valid)}"
        )
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(spec.weights.url))
    if not os.path.isfile(path):
        raise ValueError(
            f"pretrained=True for {name} needs {path} (from {spec.weights.url}); nothing is "
            "downloaded here: copy the file there, or use pretrained=False"
        )
    return spec.weights


def build_backbone(
    name: str, *, pretrained: bool, padding: str, init: str, in_channels: int = 1
) -> nn.Module:
    """The backbone network ``name`` (one of :data:`BACKBONES`), with ``out_channels``.
    ``in_channels`` applies to ``mnist-small``; the ImageNet backbones take 3."""
    weights = pretrained_weights(name) if pretrained else None
    if name == "mnist-small":
        backbone = MnistSmallBackbone(in_channels, padding=padding)
        if init == "he-normal":
            for module in backbone.modules():
                if isinstance(module, nn.Conv2d):
                    he_normal_(module)
        return backbone
    # As torchvision's fasterrcnn_* builders do: frozen BN and 3 trainable stages when
    # fine-tuning ImageNet weights; plain BN and everything trainable from scratch.
    norm_layer = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    if name == "resnet50-fpn":
        return resnet_fpn_backbone(
            backbone_name="resnet50",
            weights=weights,
            norm_layer=norm_layer,
            trainable_layers=3 if pretrained else 5,
        )
    return mobilenet_backbone(
        backbone_name="mobilenet_v3_large",
        weights=weights,
        fpn=True,
        norm_layer=norm_layer,
        trainable_layers=3 if pretrained else 6,
    )
