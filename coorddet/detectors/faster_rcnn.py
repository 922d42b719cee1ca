"""Faster R-CNN, Mask R-CNN and the first stage alone (``rpn-only``), from torchvision's parts.

Both are torchvision ``GeneralizedRCNN`` models (the class ``FasterRCNN`` is), assembled from
parts as ``FasterRCNN`` does, but handed over directly: torchvision's ``FasterRCNN``
constructor builds its own transform, RPN and RoI heads and accepts only a
``MultiScaleRoIAlign`` pooler, and each part here differs from its default:

- the transform is :class:`coorddet.detectors.parts.GrayscaleTransform` (gray or colour
  images into the backbone's channels);
- the RPN and RoI heads are :mod:`coorddet.inference`'s batched subclasses (the same outputs);
- the pooler is :class:`coorddet.poolers.MatmulRoIAlign` or ``SingleMapRoIPool``.

Settings that ``FasterRCNN`` would have set by default (IoU thresholds, sampler fractions,
NMS) take its default values, named in :data:`FASTER_RCNN_DEFAULTS`. Parts are built in the
order backbone, RPN head, box head, predictor, so that a seed gives the weights it gave when
they went through torchvision's ``FasterRCNN`` constructor.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from coorddet.detectors import parts
from coorddet.detectors.options import (
    AnchorOptions,
    BoxHeadOptions,
    ImageOptions,
    ProposalOptions,
)
from coorddet.fp32_boxes import FloatBoxPredictor, FloatBoxRPNHead
from coorddet.inference import BatchedRegionProposalNetwork, BatchedRoIHeads
from coorddet.poolers import ChannelsLastTwoMLPHead, MatmulRoIAlign, SingleMapRoIPool
from coorddet.released import NoRoIHeads

# torchvision's FasterRCNN constructor defaults for the settings build_model does not expose.
FASTER_RCNN_DEFAULTS = {
    "rpn": {"fg_iou_thresh": 0.7, "bg_iou_thresh": 0.3, "positive_fraction": 0.5,
            "nms_thresh": 0.7, "score_thresh": 0.0},
    "roi_heads": {"fg_iou_thresh": 0.5, "bg_iou_thresh": 0.5, "positive_fraction": 0.25,
                  "bbox_reg_weights": None, "nms_thresh": 0.5},
}  # fmt: skip


def faster_rcnn(
    *,
    image: ImageOptions,
    anchors: AnchorOptions,
    proposals: ProposalOptions,
    box_head: BoxHeadOptions,
    num_classes: int,
) -> GeneralizedRCNN:
    """torchvision's Faster R-CNN: backbone, RPN, RoI pooler, ``TwoMLPHead``, predictor."""
    return _two_stage(image, anchors, proposals, box_head, num_classes, masks=False)


def mask_rcnn(
    *,
    image: ImageOptions,
    anchors: AnchorOptions,
    proposals: ProposalOptions,
    box_head: BoxHeadOptions,
    num_classes: int,
) -> GeneralizedRCNN:
    """Mask R-CNN: Faster R-CNN (the same weights for a seed) plus torchvision's mask branch:
    RoIs pooled to 14x14 (on ``mnist-small``'s one map: the box RoIs' size, 7x7), four 3x3
    convs as wide as the backbone's maps, a 2x upsampling predictor, one mask per class.
    Trains on targets' ``masks``; detections gain ``masks``."""
    return _two_stage(image, anchors, proposals, box_head, num_classes, masks=True)


def _two_stage(
    image: ImageOptions,
    anchors: AnchorOptions,
    proposals: ProposalOptions,
    box_head: BoxHeadOptions,
    num_classes: int,
    *,
    masks: bool,
) -> GeneralizedRCNN:
    if box_head.roi_pool == "pool" and image.spec.feature_maps != 1:
        raise ValueError(
            f"roi_pool='pool' is not valid for backbone={image.backbone!r}; use 'align'"
        )
    generator = _anchor_generator(image, anchors)
    body = parts.backbone(image)
    rpn = _rpn(body, generator, proposals)
    heads = _roi_heads(body, image, box_head, num_classes, masks=masks)
    return GeneralizedRCNN(body, rpn, heads, parts.transform(image))


def rpn_only(
    *, image: ImageOptions, anchors: AnchorOptions, proposals: ProposalOptions
) -> GeneralizedRCNN:
    """torchvision's RPN alone: trained on the RPN's losses, scored by ``rpn_iou``; its RoI
    head slot is :class:`coorddet.released.NoRoIHeads` (no detections)."""
    generator = _anchor_generator(image, anchors)
    body = parts.backbone(image)
    return GeneralizedRCNN(
        body, _rpn(body, generator, proposals), NoRoIHeads(), parts.transform(image)
    )


def _anchor_generator(image: ImageOptions, anchors: AnchorOptions) -> AnchorGenerator:
    if image.backbone_padding == "valid":
        raise ValueError(
            "backbone_padding='valid' needs rpn='released' (torchvision's anchors assume "
            "'same' padding)"
        )
    return anchors.generator(image)


def _rpn(
    body: nn.Module, anchors: AnchorGenerator, options: ProposalOptions
) -> BatchedRegionProposalNetwork:
    """torchvision's RPN (``RPNHead``, its sampler and losses) with batched post-processing."""
    return BatchedRegionProposalNetwork(
        anchors,
        FloatBoxRPNHead(body.out_channels, anchors.num_anchors_per_location()[0]),
        batch_size_per_image=options.rpn_batch_size_per_image,
        pre_nms_top_n={
            "training": options.rpn_pre_nms_top_n_train,
            "testing": options.rpn_pre_nms_top_n_test,
        },
        post_nms_top_n={
            "training": options.rpn_post_nms_top_n_train,
            "testing": options.rpn_post_nms_top_n_test,
        },
        **FASTER_RCNN_DEFAULTS["rpn"],
    )


def _roi_heads(
    body: nn.Module, image: ImageOptions, options: BoxHeadOptions, num_classes: int, *, masks: bool
) -> BatchedRoIHeads:
    """RoI pooler (``MatmulRoIAlign`` on single-map backbones, torchvision's
    ``MultiScaleRoIAlign`` on FPNs or with ``align-torchvision``, ``RoIPool`` with ``pool``),
    ``TwoMLPHead``, predictor, batched NMS; with ``masks``, the mask branch after them."""
    size = options.roi_output_size
    if options.roi_pool == "pool":
        pooler: nn.Module = SingleMapRoIPool(image.spec.roi_maps[0], size)
    else:
        pooler = _align(image, options, size)
    width = options.box_head_width
    box_parts = (
        pooler,
        ChannelsLastTwoMLPHead(body.out_channels * size**2, width),
        FloatBoxPredictor(width, num_classes),
    )
    mask_parts = {}
    if masks:  # built after the box parts: a seed gives Faster R-CNN's weights for those
        channels = body.out_channels
        # torchvision's 14x14 mask RoIs on FPN maps; on a single stride-4 map (mnist-small) a
        # digit spans a few cells, so the box RoIs' size serves and the head costs 4x less
        mask_size = 14 if image.spec.feature_maps > 1 else size
        mask_parts = {
            "mask_roi_pool": _align(image, options, mask_size),
            "mask_head": MaskRCNNHeads(channels, (channels,) * 4, 1),
            "mask_predictor": MaskRCNNPredictor(channels, channels, num_classes),
        }
    return BatchedRoIHeads(
        *box_parts,
        batch_size_per_image=options.box_batch_size_per_image,
        score_thresh=options.box_score_thresh,
        detections_per_img=options.box_detections_per_img,
        **FASTER_RCNN_DEFAULTS["roi_heads"],
        **mask_parts,
    )


def _align(image: ImageOptions, options: BoxHeadOptions, size: int) -> nn.Module:
    """RoIAlign to ``size`` x ``size``: as matrix products on a single map, else torchvision's."""
    roi_maps = list(image.spec.roi_maps)
    if options.roi_pool == "align" and image.spec.feature_maps == 1:
        return MatmulRoIAlign(roi_maps, size, options.sampling_ratio)
    return MultiScaleRoIAlign(roi_maps, size, options.sampling_ratio)
