"""``build_model``: a torchvision Faster R-CNN for grayscale canvases, with or without CoordConv.

Inputs are lists of (1, H, W) float images in [0, 1]; targets and detections use torchvision's
format: ``boxes`` (K, 4) xyxy in pixels, ``labels`` (K,) int64 with 0 the background.

Every argument is a plain value (str, int, float, bool, list) so a config's ``model:`` section
maps one-to-one onto ``build_model``'s keyword arguments and can be stored in checkpoints.
``build_model(coordconv=True)`` is the baseline build followed by
:func:`coorddet.inject.inject_coordconv`, so under the same seed both arms start from the same
weights everywhere except the (zero) coordinate weights.
"""

from __future__ import annotations

from collections import OrderedDict
import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from coorddet.inject import DEFAULT_SITES, inject_coordconv
from coorddet.poolers import MatmulRoIAlign, SingleMapRoIPool

BACKBONES = ("mnist-small", "resnet50-fpn", "mobilenet-v3-fpn")
ROI_POOLS = ("align", "align-torchvision", "pool")

# Per backbone: feature maps (names and count), RoI-pooled maps, image statistics.
_FEATURE_MAPS = {"mnist-small": 1, "resnet50-fpn": 5, "mobilenet-v3-fpn": 3}
_ROI_MAPS = {
    "mnist-small": ["0"],
    "resnet50-fpn": ["0", "1", "2", "3"],
    "mobilenet-v3-fpn": ["0", "1", "2", "3"],  # torchvision's default; absent names are skipped
}
# mnist-small: mean/std of the default data_gen canvases (mostly black, ~2.4 digits each);
# the ImageNet backbones: their ImageNet statistics, applied to the replicated gray channel.
_IMAGE_MEAN = {"mnist-small": [0.06], "resnet50-fpn": [0.485, 0.456, 0.406]}
_IMAGE_STD = {"mnist-small": [0.21], "resnet50-fpn": [0.229, 0.224, 0.225]}
_IMAGE_MEAN["mobilenet-v3-fpn"] = _IMAGE_MEAN["resnet50-fpn"]
_IMAGE_STD["mobilenet-v3-fpn"] = _IMAGE_STD["resnet50-fpn"]
# Digits are 15-25 px (median box side ~17 px, smaller where cut by the border): sizes around
# that, one list shared by every map (mnist-small, mobilenet) or one size per FPN level
# (resnet50-fpn, strides 4 .. 64, as torchvision does).
_ANCHOR_SIZES = {
    "mnist-small": [12, 18, 24],
    "resnet50-fpn": [[12], [18], [24], [36], [48]],
    "mobilenet-v3-fpn": [12, 18, 24],
}
_PRETRAINED = {"resnet50-fpn": ResNet50_Weights.IMAGENET1K_V1}
_PRETRAINED["mobilenet-v3-fpn"] = MobileNet_V3_Large_Weights.IMAGENET1K_V1


class MnistSmallBackbone(nn.Module):
    """The paper's small net for 64x64 grayscale canvases: (N, 1, H, W) -> (N, 64, H/4, W/4).

    ``body``: conv1 (5x5, 32) -> relu1 -> pool1 (2x2) -> conv2 (5x5, 64) -> relu2 -> pool2, so
    the stem is ``body.conv1`` like torchvision's ResNets. One feature map, stride 4.
    """

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (32, 64)) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = in_channels
        for index, width in enumerate(widths, start=1):
            layers[f"conv{index}"] = nn.Conv2d(channels, width, kernel_size=5, padding=2)
            layers[f"relu{index}"] = nn.ReLU(inplace=True)
            layers[f"pool{index}"] = nn.MaxPool2d(2)
            channels = width
        self.body = nn.Sequential(layers)
        self.out_channels = channels

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class GrayscaleTransform(GeneralizedRCNNTransform):
    """torchvision's transform, plus: 1-channel images are replicated to ``len(image_mean)``
    channels before normalising (the ImageNet backbones take 3). Any other channel count
    that differs from ``len(image_mean)`` raises ``ValueError``.
    """

    def normalize(self, image: Tensor) -> Tensor:
        if not image.is_floating_point():
            raise TypeError(f"expected float images in [0, 1], got {image.dtype}")
        channels = len(self.image_mean)
        if image.shape[0] == 1 and channels > 1:
            image = image.expand(channels, -1, -1)
        elif image.shape[0] != channels:
            raise ValueError(f"expected images with 1 or {channels} channels, got {image.shape}")
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        return (image - mean[:, None, None]) / std[:, None, None]


def _choice(name: str, value: object, valid: Sequence[object]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; valid values: {', '.join(map(str, valid))}")


def _positive(name: str, value: object, minimum: float = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ValueError(f"{name}={value!r} is not valid; expected a number >= {minimum}")


def _anchor_generator(
    backbone: str, anchor_sizes: list | None, aspect_ratios: list[float]
) -> AnchorGenerator:
    maps = _FEATURE_MAPS[backbone]
    sizes = _ANCHOR_SIZES[backbone] if anchor_sizes is None else list(anchor_sizes)
    if not sizes:
        raise ValueError("anchor_sizes=[] is not valid; give sizes in pixels, e.g. [12, 18, 24]")
    if all(isinstance(size, (list, tuple)) for size in sizes):
        per_map = [tuple(level) for level in sizes]
        if len(per_map) != maps or len({len(level) for level in per_map}) != 1:
            raise ValueError(
                f"anchor_sizes={sizes!r} is not valid for {backbone}: give one list of sizes for "
                f"all maps, or {maps} lists of equal length (one per feature map)"
            )
    else:
        per_map = [tuple(sizes)] * maps
    for size in (size for level in per_map for size in level):
        _positive("anchor_sizes", size)
    if not aspect_ratios:
        raise ValueError("aspect_ratios=[] is not valid; give height/width ratios, e.g. [0.5, 1, 2]")
    for ratio in aspect_ratios:
        _positive("aspect_ratios", ratio, minimum=1e-3)
    ratios = tuple(float(ratio) for ratio in aspect_ratios)
    return AnchorGenerator(tuple(per_map), (ratios,) * maps)


def _local_weights(backbone: str):
    """The ImageNet weights enum for ``backbone`` if its file is in the torch hub cache."""
    if backbone not in _PRETRAINED:
        raise ValueError(
            f"pretrained=True is not valid for backbone={backbone!r}: it has no pretrained "
            f"weights; valid backbones for pretrained: {', '.join(_PRETRAINED)}"
        )
    weights = _PRETRAINED[backbone]
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.isfile(path):
        raise ValueError(
            f"pretrained=True for {backbone} needs {path} (from {weights.url}); this program never "
            "downloads: copy the file there, or use pretrained=False"
        )
    return weights


def _backbone(backbone: str, pretrained: bool) -> nn.Module:
    if backbone == "mnist-small":
        if pretrained:
            _local_weights(backbone)  # raises
        return MnistSmallBackbone()
    weights = _local_weights(backbone) if pretrained else None
    # As torchvision's fasterrcnn_* builders do: frozen BN and 3 trainable stages when
    # fine-tuning ImageNet weights, plain BN and everything trainable from scratch.
    norm_layer = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    if backbone == "resnet50-fpn":
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


def build_model(
    *,
    backbone: str = "mnist-small",
    num_classes: int = 11,
    coordconv: bool = False,
    coordconv_sites: Sequence[str] = DEFAULT_SITES,
    with_r: bool = False,
    canvas_size: int = 64,
    pretrained: bool = False,
    anchor_sizes: list | None = None,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    rpn_pre_nms_top_n_train: int = 600,
    rpn_pre_nms_top_n_test: int = 300,
    rpn_post_nms_top_n_train: int = 300,
    rpn_post_nms_top_n_test: int = 100,
    rpn_batch_size_per_image: int = 256,
    box_batch_size_per_image: int = 64,
    box_head_width: int = 256,
    roi_pool: str = "align",
    sampling_ratio: int = 2,
    roi_output_size: int = 7,
    box_detections_per_img: int = 100,
    box_score_thresh: float = 0.05,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
) -> FasterRCNN:
    """Build a Faster R-CNN for ``canvas_size`` grayscale canvases.

    Args:
        backbone: one of :data:`BACKBONES`. ``mnist-small``: :class:`MnistSmallBackbone`
            (1-channel, stride 4, 64 channels). ``resnet50-fpn`` / ``mobilenet-v3-fpn``:
            torchvision's backbones of ``fasterrcnn_resnet50_fpn`` /
            ``fasterrcnn_mobilenet_v3_large_fpn``, fed the gray channel replicated to 3 by
            :class:`GrayscaleTransform`.
        num_classes: including the background (11 = 10 digits + background).
        coordconv, coordconv_sites, with_r: inject CoordConv at these sites
            (:data:`coorddet.inject.SITES`) after building the baseline.
        canvas_size: images are never resized (``min_size = max_size = canvas_size``), so
            64 px canvases stay 64 px instead of torchvision's 800.
        pretrained: ImageNet backbone weights, only from the local torch hub cache
            (``torch.hub.get_dir()/checkpoints``); never downloads.
        anchor_sizes: pixels; one list for every feature map, or one list per map. ``None``:
            the backbone's default for 15-25 px digits.
        aspect_ratios: anchor height / width ratios.
        rpn_*: torchvision's RPN options; top-n sized for a few digits per 64 px canvas
            (torchvision's 2000/1000 are for 800 px COCO images).
        box_batch_size_per_image: RoIs sampled per image to train the box head.
        box_head_width: ``TwoMLPHead`` representation size.
        roi_pool: how RoIs become (roi_output_size x roi_output_size) features. ``"align"``:
            RoIAlign with ``sampling_ratio``, computed by :class:`MatmulRoIAlign` on
            single-map backbones (torchvision's numbers, ~6x faster CPU training step for
            the pooler) and by torchvision's ``MultiScaleRoIAlign`` on FPN backbones;
            ``"align-torchvision"``: always torchvision's; ``"pool"``: ``RoIPool``
            (single-map backbones only).
        box_detections_per_img, box_score_thresh: torchvision's inference options.
        image_mean, image_std: per-channel normalisation; ``None``: the backbone's default
            (1 value for ``mnist-small``, 3 ImageNet values for the others).

    Raises:
        ValueError: a bad argument (the message names it and the valid values), or
            ``pretrained=True`` without the weights file in the local cache.
    """
    _choice("backbone", backbone, BACKBONES)
    _choice("roi_pool", roi_pool, ROI_POOLS)
    if roi_pool == "pool" and _FEATURE_MAPS[backbone] != 1:
        raise ValueError(f"roi_pool='pool' is not valid for backbone={backbone!r}; use 'align'")
    for name, value in [
        ("num_classes", num_classes),
        ("canvas_size", canvas_size),
        ("rpn_pre_nms_top_n_train", rpn_pre_nms_top_n_train),
        ("rpn_pre_nms_top_n_test", rpn_pre_nms_top_n_test),
        ("rpn_post_nms_top_n_train", rpn_post_nms_top_n_train),
        ("rpn_post_nms_top_n_test", rpn_post_nms_top_n_test),
        ("rpn_batch_size_per_image", rpn_batch_size_per_image),
        ("box_batch_size_per_image", box_batch_size_per_image),
        ("box_head_width", box_head_width),
        ("roi_output_size", roi_output_size),
        ("box_detections_per_img", box_detections_per_img),
    ]:
        _positive(name, value, minimum=2 if name == "num_classes" else 1)
    _positive("sampling_ratio", sampling_ratio, minimum=0)  # 0: adaptive, as torchvision
    if not 0.0 <= box_score_thresh <= 1.0:
        raise ValueError(f"box_score_thresh={box_score_thresh!r} is not valid; expected 0..1")
    mean = list(_IMAGE_MEAN[backbone] if image_mean is None else image_mean)
    std = list(_IMAGE_STD[backbone] if image_std is None else image_std)
    channels = len(_IMAGE_MEAN[backbone])
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ValueError(
            f"image_mean={mean!r}, image_std={std!r} are not valid for {backbone}: expected "
            f"{channels} value(s) each, std > 0"
        )

    anchors = _anchor_generator(backbone, anchor_sizes, list(aspect_ratios))
    body = _backbone(backbone, pretrained)
    rpn_head = RPNHead(body.out_channels, anchors.num_anchors_per_location()[0])
    single_map = _FEATURE_MAPS[backbone] == 1
    if roi_pool == "align" and single_map:
        roi_align = MatmulRoIAlign(_ROI_MAPS[backbone], roi_output_size, sampling_ratio)
    else:
        roi_align = MultiScaleRoIAlign(_ROI_MAPS[backbone], roi_output_size, sampling_ratio)
    box_head = TwoMLPHead(body.out_channels * roi_output_size**2, box_head_width)
    model = FasterRCNN(
        body,
        num_classes=None,
        min_size=canvas_size,
        max_size=canvas_size,
        image_mean=mean,
        image_std=std,
        rpn_anchor_generator=anchors,
        rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        box_roi_pool=roi_align,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(box_head_width, num_classes),
        box_batch_size_per_image=box_batch_size_per_image,
        box_detections_per_img=box_detections_per_img,
        box_score_thresh=box_score_thresh,
    )
    model.transform = GrayscaleTransform(canvas_size, canvas_size, mean, std)
    if roi_pool == "pool":
        # FasterRCNN's constructor only accepts MultiScaleRoIAlign; RoIHeads calls any module
        # with that signature.
        model.roi_heads.box_roi_pool = SingleMapRoIPool(_ROI_MAPS[backbone][0], roi_output_size)
    if coordconv:
        inject_coordconv(model, coordconv_sites, with_r=with_r)
    return model

