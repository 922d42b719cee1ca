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

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights, WeightsEnum
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from coorddet.inject import DEFAULT_SITES, check_sites, inject_coordconv
from coorddet.poolers import ChannelsLastTwoMLPHead, MatmulRoIAlign, SingleMapRoIPool
from coorddet.postprocess import BatchedRegionProposalNetwork, batch_postprocessing
from coorddet.released import (
    ANCHOR_LAYOUTS,
    TEMPLATES,
    NoRoIHeads,
    ReceptiveFieldAnchors,
    ReleasedRegionProposalNetwork,
    ReleasedRPNHead,
    he_normal_,
    receptive_field_centres,
)

ROI_POOLS = ("align", "align-torchvision", "pool")
DETECTORS = ("faster-rcnn", "rpn-only")
RPNS = ("torchvision", "released")
PADDINGS = ("same", "valid")
BACKBONE_INITS = ("default", "he-normal")


@dataclass(frozen=True)
class _Backbone:
    feature_maps: int  # how many maps the backbone returns
    roi_maps: tuple[str, ...]  # the maps RoIs are pooled from (absent names are skipped)
    image_mean: tuple[float, ...]  # one value per input channel the backbone takes
    image_std: tuple[float, ...]
    anchor_sizes: tuple  # pixels: one tuple for every map, or one tuple per map
    weights: WeightsEnum | None  # ImageNet weights for pretrained=True


_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Digits are 15-25 px (median box side ~17 px, smaller where the border cuts them), so anchor
# sizes 12-24 px; resnet50-fpn: one size per FPN level (strides 4 .. 64) as torchvision does.
# mnist-small's mean/std: the default data_gen canvases (mostly black, ~2.4 digits each).
_BACKBONES = {
    "mnist-small": _Backbone(1, ("0",), (0.06,), (0.21,), (12, 18, 24), None),
    "resnet50-fpn": _Backbone(
        5,
        ("0", "1", "2", "3"),
        _IMAGENET_MEAN,
        _IMAGENET_STD,
        ((12,), (18,), (24,), (36,), (48,)),
        ResNet50_Weights.IMAGENET1K_V1,
    ),
    "mobilenet-v3-fpn": _Backbone(
        3,
        ("0", "1", "2", "3"),
        _IMAGENET_MEAN,
        _IMAGENET_STD,
        (12, 18, 24),
        MobileNet_V3_Large_Weights.IMAGENET1K_V1,
    ),
}
BACKBONES = tuple(_BACKBONES)


class MnistSmallBackbone(nn.Module):
    """The paper's small net for 64x64 grayscale canvases: (N, 1, H, W) -> (N, 64, H/4, W/4).

    ``body``: conv1 (5x5, 32) -> relu1 -> pool1 (2x2) -> conv2 (5x5, 64) -> relu2 -> pool2, so
    the stem is ``body.conv1`` like torchvision's ResNets. One feature map, stride 4.
    ``padding="valid"`` (the released code's default) gives a 13x13 map for 64x64 canvases.
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
        raise ValueError(
            f"{name}={value!r} is not valid; valid values: {', '.join(map(str, valid))}"
        )


def _integer(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is not valid; expected an integer >= {minimum}")


def _number(name: str, value: object, low: float, high: float = float("inf")) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name}={value!r} is not valid; expected a number in [{low}, {high}]")
    return float(value)


def _anchor_generator(
    name: str, spec: _Backbone, anchor_sizes: Sequence | None, aspect_ratios: Sequence[float]
) -> AnchorGenerator:
    sizes = list(spec.anchor_sizes if anchor_sizes is None else anchor_sizes)
    maps = spec.feature_maps
    if sizes and all(isinstance(level, (list, tuple)) for level in sizes):
        per_map = [tuple(level) for level in sizes]
        if len(per_map) != maps or len({len(level) for level in per_map}) != 1:
            raise ValueError(
                f"anchor_sizes={sizes!r} is not valid for {name}: give one list of sizes for "
                f"all maps, or {maps} lists of equal length (one per feature map)"
            )
    else:
        per_map = [tuple(sizes)] * maps
    if not per_map[0]:
        raise ValueError("anchor_sizes=[] is not valid; give sizes in pixels, e.g. [12, 18, 24]")
    for size in (size for level in per_map for size in level):
        _integer("anchor_sizes", size)
    if not aspect_ratios:
        raise ValueError(
            "aspect_ratios=[] is not valid; give height/width ratios, e.g. [0.5, 1, 2]"
        )
    ratios = tuple(_number("aspect_ratios", ratio, 1e-3) for ratio in aspect_ratios)
    return AnchorGenerator(tuple(per_map), (ratios,) * maps)


def _pretrained_weights(name: str, spec: _Backbone) -> WeightsEnum:
    """The backbone's ImageNet weights, if their file is in the local torch hub cache."""
    if spec.weights is None:
        valid = [backbone for backbone, other in _BACKBONES.items() if other.weights is not None]
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


def _backbone(name: str, spec: _Backbone, pretrained: bool, padding: str, init: str) -> nn.Module:
    weights = _pretrained_weights(name, spec) if pretrained else None
    if name == "mnist-small":
        backbone = MnistSmallBackbone(padding=padding)
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


def _rpn_only(
    body: nn.Module,
    anchors: AnchorGenerator,
    *,
    rpn: str,
    anchor_layout: str,
    padding: str,
    canvas_size: int,
    mean: list[float],
    std: list[float],
    pre_nms_top_n: dict[str, int],
    post_nms_top_n: dict[str, int],
    batch_size_per_image: int,
) -> GeneralizedRCNN:
    """torchvision's ``GeneralizedRCNN`` from a backbone, an RPN and :class:`NoRoIHeads`."""
    if rpn == "released":
        first, stride = receptive_field_centres(padding)
        proposer: RegionProposalNetwork = ReleasedRegionProposalNetwork(
            ReceptiveFieldAnchors(first, stride, TEMPLATES, anchor_layout),
            ReleasedRPNHead(body.out_channels, len(TEMPLATES)),
        )
    else:
        proposer = BatchedRegionProposalNetwork(
            anchors,
            RPNHead(body.out_channels, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7,  # torchvision's FasterRCNN defaults
            bg_iou_thresh=0.3,
            batch_size_per_image=batch_size_per_image,
            positive_fraction=0.5,
            pre_nms_top_n=pre_nms_top_n,
            post_nms_top_n=post_nms_top_n,
            nms_thresh=0.7,
        )
    transform = GrayscaleTransform(canvas_size, canvas_size, mean, std)
    return GeneralizedRCNN(body, proposer, NoRoIHeads(), transform)


def is_rpn_only(model: nn.Module) -> bool:
    """True for :func:`build_model`'s ``detector="rpn-only"`` models (no detections)."""
    return isinstance(getattr(model, "roi_heads", None), NoRoIHeads)


def build_model(
    *,
    backbone: str = "mnist-small",
    num_classes: int = 11,
    coordconv: bool = False,
    coordconv_sites: Sequence[str] = DEFAULT_SITES,
    with_r: bool = False,
    canvas_size: int = 64,
    pretrained: bool = False,
    anchor_sizes: Sequence | None = None,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    rpn_pre_nms_top_n_train: int = 300,
    rpn_pre_nms_top_n_test: int = 300,
    rpn_post_nms_top_n_train: int = 150,
    rpn_post_nms_top_n_test: int = 100,
    rpn_batch_size_per_image: int = 256,
    box_batch_size_per_image: int = 32,
    box_head_width: int = 256,
    roi_pool: str = "align",
    sampling_ratio: int = 2,
    roi_output_size: int = 7,
    box_detections_per_img: int = 100,
    box_score_thresh: float = 0.05,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    detector: str = "faster-rcnn",
    rpn: str = "torchvision",
    anchor_layout: str = "intended",
    backbone_padding: str = "same",
    backbone_init: str = "default",
) -> GeneralizedRCNN:
    """Build a Faster R-CNN (or an RPN-only detector) for ``canvas_size`` grayscale canvases.

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
        detector: ``"faster-rcnn"``, or ``"rpn-only"``: a torchvision ``GeneralizedRCNN``
            whose RoI-head slot is :class:`coorddet.released.NoRoIHeads`; it trains on the RPN
            losses alone and is scored by ``rpn_iou`` (detection metrics are undefined).
        rpn: ``"torchvision"`` (``RPNHead``, ``AnchorGenerator`` with ``anchor_sizes`` x
            ``aspect_ratios``, torchvision's sampler and losses) or ``"released"``: the
            CoordConv paper's released RPN (:mod:`coorddet.released`: its head, 9 anchor
            templates at receptive-field centres, its sampler, losses and NMS at 0.8 to 10
            proposals); needs ``detector="rpn-only"`` and ``mnist-small``.
        anchor_layout: ``rpn="released"`` only: ``"intended"`` anchors, or ``"released"``,
            the ones the released code actually trains with (see :mod:`coorddet.released`).
        backbone_padding: ``mnist-small``'s convolutions, ``"same"`` (a 16x16 map for 64 px
            canvases) or ``"valid"`` (13x13, the released code's default; needs
            ``rpn="released"``, whose anchors follow the receptive field).
        backbone_init: ``"default"`` (PyTorch's) or ``"he-normal"`` (TensorFlow's, as the
            released code initialises ``mnist-small``).

    Raises:
        ValueError: a bad argument (the message names it and the valid values), or
            ``pretrained=True`` without the weights file in the local cache.
    """
    _choice("backbone", backbone, BACKBONES)
    spec = _BACKBONES[backbone]
    _choice("roi_pool", roi_pool, ROI_POOLS)
    single_map = spec.feature_maps == 1
    if roi_pool == "pool" and not single_map:
        raise ValueError(f"roi_pool='pool' is not valid for backbone={backbone!r}; use 'align'")
    sites = check_sites(coordconv_sites)  # also when coordconv=False: no silent typos
    if coordconv and not sites:
        raise ValueError("coordconv_sites=[] is not valid with coordconv=True; name sites")
    _choice("detector", detector, DETECTORS)
    _choice("rpn", rpn, RPNS)
    _choice("anchor_layout", anchor_layout, ANCHOR_LAYOUTS)
    _choice("backbone_padding", backbone_padding, PADDINGS)
    _choice("backbone_init", backbone_init, BACKBONE_INITS)
    if rpn == "released" and (detector != "rpn-only" or backbone != "mnist-small"):
        raise ValueError(
            "rpn='released' is the released code's RPN-only detector: it needs "
            "detector='rpn-only' and backbone='mnist-small'"
        )
    if backbone != "mnist-small" and (backbone_padding, backbone_init) != ("same", "default"):
        raise ValueError(
            f"backbone_padding and backbone_init apply to mnist-small only, not {backbone!r}"
        )
    if backbone_padding == "valid" and rpn != "released":
        raise ValueError(
            "backbone_padding='valid' needs rpn='released' (torchvision's anchors assume "
            "'same' padding)"
        )
    _integer("num_classes", num_classes, minimum=2)
    for name, value in [
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
        _integer(name, value)
    _integer("sampling_ratio", sampling_ratio, minimum=0)  # 0: adaptive, as torchvision
    _number("box_score_thresh", box_score_thresh, 0.0, 1.0)
    mean = list(spec.image_mean if image_mean is None else image_mean)
    std = list(spec.image_std if image_std is None else image_std)
    channels = len(spec.image_mean)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"image_mean={mean!r}, image_std={std!r} are not valid for {backbone}: expected "
            f"{channels} value(s) each"
        )
    for value in std:
        _number("image_std", value, 1e-6)

    anchors = _anchor_generator(backbone, spec, anchor_sizes, aspect_ratios)
    body = _backbone(backbone, spec, pretrained, backbone_padding, backbone_init)
    if detector == "rpn-only":
        model = _rpn_only(
            body, anchors, rpn=rpn, anchor_layout=anchor_layout, padding=backbone_padding,
            canvas_size=canvas_size, mean=mean, std=std,
            pre_nms_top_n={"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
            post_nms_top_n={"training": rpn_post_nms_top_n_train, "testing": rpn_post_nms_top_n_test},
            batch_size_per_image=rpn_batch_size_per_image,
        )  # fmt: skip
        if coordconv:
            inject_coordconv(model, sites, with_r=with_r)
        return model.to(memory_format=torch.channels_last)
    rpn_head = RPNHead(body.out_channels, anchors.num_anchors_per_location()[0])
    roi_maps = list(spec.roi_maps)
    if roi_pool == "align" and single_map:
        roi_align = MatmulRoIAlign(roi_maps, roi_output_size, sampling_ratio)
    else:
        roi_align = MultiScaleRoIAlign(roi_maps, roi_output_size, sampling_ratio)
    box_head = ChannelsLastTwoMLPHead(body.out_channels * roi_output_size**2, box_head_width)
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
    # torchvision's proposal filtering and detection post-processing, same outputs, with the
    # per-image steps batched (~12% faster batch-64 inference): coorddet.postprocess.
    batch_postprocessing(model)
    if roi_pool == "pool":
        # FasterRCNN's constructor only accepts MultiScaleRoIAlign; RoIHeads calls any module
        # with that signature.
        model.roi_heads.box_roi_pool = SingleMapRoIPool(roi_maps[0], roi_output_size)
    if coordconv:
        inject_coordconv(model, sites, with_r=with_r)
    # NHWC convolutions, pooling and RoIAlign: the backbone infers ~2x faster on CPU (max
    # pooling in NCHW alone was 9x slower) and RoI features need no transpose for the box head.
    return model.to(memory_format=torch.channels_last)
