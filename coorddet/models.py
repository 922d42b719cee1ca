"""``build_model``: a torchvision Faster R-CNN for gray or colour images, with or without CoordConv.

Inputs are lists of (1, H, W) or (3, H, W) float images in [0, 1]; targets and detections use torchvision's
format: ``boxes`` (K, 4) xyxy in pixels, ``labels`` (K,) int64 with 0 the background.

Every argument is a plain value (str, int, float, bool, list) so a config's ``model:`` section
maps one-to-one onto ``build_model``'s keyword arguments and can be stored in checkpoints.

The detector is composed from its parts, as torchvision's ``FasterRCNN`` does, but handed to
``GeneralizedRCNN`` directly (the class both ``FasterRCNN`` and the RPN-only detector are):
torchvision's ``FasterRCNN`` constructor builds its own transform, RPN and RoI heads and
accepts only a ``MultiScaleRoIAlign`` pooler, and each part here differs from its default:

- the transform is :class:`GrayscaleTransform` (gray or colour images into the backbone's
  channels);
- the RPN and RoI heads are :mod:`coorddet.inference`'s batched subclasses (the same outputs);
- the pooler is :class:`coorddet.poolers.MatmulRoIAlign` or ``SingleMapRoIPool``.

Parts that ``FasterRCNN`` would have set by default (IoU thresholds, sampler fractions, NMS)
take its default values, named in :data:`FASTER_RCNN_DEFAULTS`. Nothing is swapped after
construction, except CoordConv itself: ``build_model(coordconv=True)`` is the baseline build
followed by :func:`coorddet.inject.inject_coordconv`, so under the same seed both arms start
from the same weights everywhere except the (zero) coordinate weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from coorddet.backbones import (
    BACKBONE_INITS,
    BACKBONE_SPECS,
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PADDINGS,
    BackboneSpec,
    build_backbone,
)
from coorddet.inference import BatchedRegionProposalNetwork, BatchedRoIHeads
from coorddet.inject import DEFAULT_SITES, check_sites, inject_coordconv
from coorddet.poolers import ChannelsLastTwoMLPHead, MatmulRoIAlign, SingleMapRoIPool
from coorddet.released import (
    ANCHOR_LAYOUTS,
    TEMPLATES,
    NoRoIHeads,
    ReceptiveFieldAnchors,
    ReleasedRegionProposalNetwork,
    ReleasedRPNHead,
    receptive_field_centres,
)
from coorddet.validate import check_choice, check_int, check_number

ROI_POOLS = ("align", "align-torchvision", "pool")
DETECTORS = ("faster-rcnn", "rpn-only")
RPNS = ("torchvision", "released")
__all__ = ["BACKBONES", "GrayscaleTransform", "build_model", "is_rpn_only"]

# torchvision's FasterRCNN constructor defaults for the settings build_model does not expose.
FASTER_RCNN_DEFAULTS = {
    "rpn": {"fg_iou_thresh": 0.7, "bg_iou_thresh": 0.3, "positive_fraction": 0.5,
            "nms_thresh": 0.7, "score_thresh": 0.0},
    "roi_heads": {"fg_iou_thresh": 0.5, "bg_iou_thresh": 0.5, "positive_fraction": 0.25,
                  "bbox_reg_weights": None, "nms_thresh": 0.5},
}  # fmt: skip


class GrayscaleTransform(GeneralizedRCNNTransform):
    """torchvision's transform, plus: images are brought to ``len(image_mean)`` channels before
    normalising. A 1-channel image is replicated (gray data into a 3-channel backbone, as
    Pillow's ``L`` -> ``RGB``); a 3-channel image into a 1-channel model becomes gray by
    torchvision's ``rgb_to_grayscale`` (ITU-R 601-2 luma). Other channel counts raise
    ``ValueError``.
    """

    def normalize(self, image: Tensor) -> Tensor:
        if not image.is_floating_point():
            raise TypeError(f"expected float images in [0, 1], got {image.dtype}")
        channels = len(self.image_mean)
        if image.shape[0] == 1 and channels > 1:
            image = image.expand(channels, -1, -1)
        elif image.shape[0] == 3 and channels == 1:
            red, green, blue = image.unbind(0)  # torchvision's rgb_to_grayscale, scriptable
            image = (red * 0.2989).add_(green, alpha=0.587).add_(blue, alpha=0.114).unsqueeze(0)
        elif image.shape[0] != channels:
            raise ValueError(f"expected images with 1 or 3 channels, got {image.shape}")
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        return (image - mean[:, None, None]) / std[:, None, None]


def _anchor_generator(
    name: str, spec: BackboneSpec, anchor_sizes: Sequence | None, aspect_ratios: Sequence[float]
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
        check_int("anchor_sizes", size)
    if not aspect_ratios:
        raise ValueError(
            "aspect_ratios=[] is not valid; give height/width ratios, e.g. [0.5, 1, 2]"
        )
    ratios = tuple(check_number("aspect_ratios", ratio, 1e-3) for ratio in aspect_ratios)
    return AnchorGenerator(tuple(per_map), (ratios,) * maps)


def _released_rpn(body: nn.Module, *, anchor_layout: str, padding: str) -> RegionProposalNetwork:
    """The released code's RPN: its head and 9 templates at receptive-field centres."""
    first, stride = receptive_field_centres(padding)
    return ReleasedRegionProposalNetwork(
        ReceptiveFieldAnchors(first, stride, TEMPLATES, anchor_layout),
        ReleasedRPNHead(body.out_channels, len(TEMPLATES)),
    )


def _torchvision_rpn(
    body: nn.Module,
    anchors: AnchorGenerator,
    *,
    pre_nms_top_n: dict[str, int],
    post_nms_top_n: dict[str, int],
    batch_size_per_image: int,
) -> RegionProposalNetwork:
    """torchvision's RPN (``RPNHead``, its sampler and losses) with batched post-processing."""
    return BatchedRegionProposalNetwork(
        anchors,
        RPNHead(body.out_channels, anchors.num_anchors_per_location()[0]),
        batch_size_per_image=batch_size_per_image,
        pre_nms_top_n=pre_nms_top_n,
        post_nms_top_n=post_nms_top_n,
        **FASTER_RCNN_DEFAULTS["rpn"],
    )


def _roi_heads(
    body: nn.Module,
    spec: BackboneSpec,
    *,
    num_classes: int,
    roi_pool: str,
    roi_output_size: int,
    sampling_ratio: int,
    box_head_width: int,
    batch_size_per_image: int,
    score_thresh: float,
    detections_per_img: int,
) -> BatchedRoIHeads:
    """Faster R-CNN's second stage: RoI pooler, ``TwoMLPHead``, predictor, batched NMS."""
    roi_maps = list(spec.roi_maps)
    pooler: nn.Module
    if roi_pool == "pool":
        pooler = SingleMapRoIPool(roi_maps[0], roi_output_size)
    elif roi_pool == "align" and spec.feature_maps == 1:
        pooler = MatmulRoIAlign(roi_maps, roi_output_size, sampling_ratio)
    else:
        pooler = MultiScaleRoIAlign(roi_maps, roi_output_size, sampling_ratio)
    box_head = ChannelsLastTwoMLPHead(body.out_channels * roi_output_size**2, box_head_width)
    return BatchedRoIHeads(
        pooler,
        box_head,
        FastRCNNPredictor(box_head_width, num_classes),
        batch_size_per_image=batch_size_per_image,
        score_thresh=score_thresh,
        detections_per_img=detections_per_img,
        **FASTER_RCNN_DEFAULTS["roi_heads"],
    )


TORCHVISION_SIZES = (800, 1333)  # torchvision's min_size, max_size for COCO-sized images


def default_image_sizes(backbone: str, image_sizes: set[tuple[int, int]]) -> tuple[int, int]:
    """``(min_size, max_size)`` for a dataset of these ``(width, height)`` image sizes.

    One size: its short and long side, so images are never resized (64 px canvases: 64, 64).
    Several: torchvision's 800 and 1333 for the FPN backbones; for ``mnist-small``, built for
    small canvases, the largest short and long sides, so no image is shrunk.
    """
    if not image_sizes:
        raise ValueError("image_sizes is empty")
    if len(image_sizes) == 1:
        ((width, height),) = image_sizes
        return min(width, height), max(width, height)
    if backbone != "mnist-small":
        return TORCHVISION_SIZES
    return max(min(w, h) for w, h in image_sizes), max(max(w, h) for w, h in image_sizes)


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
    image_channels: int = 1,
    min_size: int | None = None,
    max_size: int | None = None,
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
    """Build a Faster R-CNN (or an RPN-only detector) for gray or colour images.

    Args:
        backbone: one of :data:`BACKBONES`. ``mnist-small``: :class:`MnistSmallBackbone`
            (``image_channels`` in, stride 4, 64 channels). ``resnet50-fpn`` /
            ``mobilenet-v3-fpn``: torchvision's backbones of ``fasterrcnn_resnet50_fpn`` /
            ``fasterrcnn_mobilenet_v3_large_fpn`` (3 channels in; gray images are replicated
            to 3 by :class:`GrayscaleTransform`).
        num_classes: including the background (11 = 10 digits + background).
        coordconv, coordconv_sites, with_r: inject CoordConv at these sites
            (:data:`coorddet.inject.SITES`) after building the baseline.
        canvas_size: the default of ``min_size`` and ``max_size``: ``canvas_size`` px square
            canvases are never resized (64 px stay 64 px instead of torchvision's 800).
        image_channels: the images' channels, 1 (gray) or 3 (colour); ``train.py`` sets it
            from the dataset. It sizes ``mnist-small``'s first convolution; the ImageNet
            backbones always take 3.
        min_size, max_size: torchvision's meaning: each image is scaled so that its short
            side is ``min_size`` unless its long side would pass ``max_size``. ``None``:
            ``canvas_size``. ``train.py`` sets them from the dataset (see README).
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
            (1 value for a gray ``mnist-small``, fitted to ``data_gen``'s canvases; ImageNet's
            3 values for a colour ``mnist-small`` and for the others).
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
    check_choice("backbone", backbone, BACKBONES)
    spec = BACKBONE_SPECS[backbone]
    check_choice("roi_pool", roi_pool, ROI_POOLS)
    if roi_pool == "pool" and spec.feature_maps != 1:
        raise ValueError(f"roi_pool='pool' is not valid for backbone={backbone!r}; use 'align'")
    sites = check_sites(coordconv_sites)  # also when coordconv=False: no silent typos
    if coordconv and not sites:
        raise ValueError("coordconv_sites=[] is not valid with coordconv=True; name sites")
    check_choice("detector", detector, DETECTORS)
    check_choice("rpn", rpn, RPNS)
    check_choice("anchor_layout", anchor_layout, ANCHOR_LAYOUTS)
    check_choice("backbone_padding", backbone_padding, PADDINGS)
    check_choice("backbone_init", backbone_init, BACKBONE_INITS)
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
    check_int("num_classes", num_classes, minimum=2)
    check_choice("image_channels", image_channels, (1, 3))
    for name, value in [
        ("canvas_size", canvas_size),
        ("min_size", canvas_size if min_size is None else min_size),
        ("max_size", canvas_size if max_size is None else max_size),
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
        check_int(name, value)
    check_int("sampling_ratio", sampling_ratio, minimum=0)  # 0: adaptive, as torchvision
    check_number("box_score_thresh", box_score_thresh, 0.0, 1.0)
    channels = image_channels if backbone == "mnist-small" else len(spec.image_mean)
    default_mean, default_std = (
        (spec.image_mean, spec.image_std)
        if len(spec.image_mean) == channels
        else (IMAGENET_MEAN, IMAGENET_STD)
    )
    mean = list(default_mean if image_mean is None else image_mean)
    std = list(default_std if image_std is None else image_std)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"image_mean={mean!r}, image_std={std!r} are not valid for {backbone}: expected "
            f"{channels} value(s) each"
        )
    for value in std:
        check_number("image_std", value, 1e-6)

    # Built in this order (backbone, RPN head, box head, predictor) so that a seed gives the
    # weights it gave when these parts went through torchvision's FasterRCNN constructor.
    anchors = _anchor_generator(backbone, spec, anchor_sizes, aspect_ratios)
    body = build_backbone(
        backbone,
        pretrained=pretrained,
        padding=backbone_padding,
        init=backbone_init,
        in_channels=channels,
    )
    if rpn == "released":
        proposer = _released_rpn(body, anchor_layout=anchor_layout, padding=backbone_padding)
    else:
        proposer = _torchvision_rpn(
            body,
            anchors,
            pre_nms_top_n={"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
            post_nms_top_n={"training": rpn_post_nms_top_n_train, "testing": rpn_post_nms_top_n_test},
            batch_size_per_image=rpn_batch_size_per_image,
        )  # fmt: skip
    if detector == "rpn-only":
        second_stage: nn.Module = NoRoIHeads()
    else:
        second_stage = _roi_heads(
            body,
            spec,
            num_classes=num_classes,
            roi_pool=roi_pool,
            roi_output_size=roi_output_size,
            sampling_ratio=sampling_ratio,
            box_head_width=box_head_width,
            batch_size_per_image=box_batch_size_per_image,
            score_thresh=box_score_thresh,
            detections_per_img=box_detections_per_img,
        )
    transform = GrayscaleTransform(
        canvas_size if min_size is None else min_size,
        canvas_size if max_size is None else max_size,
        mean,
        std,
    )
    model = GeneralizedRCNN(body, proposer, second_stage, transform)
    if coordconv:
        inject_coordconv(model, sites, with_r=with_r)
    # NHWC convolutions, pooling and RoIAlign: the backbone infers ~2x faster on CPU (max
    # pooling in NCHW alone was 9x slower) and RoI features need no transpose for the box head.
    return model.to(memory_format=torch.channels_last)
