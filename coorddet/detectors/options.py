"""A detector's settings in groups, one per part: the flat ``model:`` config keys, checked once.

:func:`coorddet.models.build_model` takes the config's ``model:`` section as flat keyword
arguments (``roi_pool=...``, ``anchor_sizes=...``), sorts them into these groups, which check
their values on construction (``ValueError`` naming the key and the valid values), and hands
each detector builder the groups it asks for by name (``image``, ``anchors``, ``proposals``,
``box_head``, ``released``). Every group is checked whatever the detector, so a typo in a key
that this detector does not use still fails. Defaults are the config's defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torchvision.models.detection.anchor_utils import AnchorGenerator

from coorddet.backbones import (
    BACKBONE_INITS,
    BACKBONE_SPECS,
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PADDINGS,
    BackboneSpec,
)
from coorddet.fp32_boxes import FloatAnchorGenerator
from coorddet.released import ANCHOR_LAYOUTS
from coorddet.validate import check_choice, check_int, check_number

ROI_POOLS = ("align", "align-torchvision", "pool")


@dataclass(frozen=True)
class ImageOptions:
    """The backbone and how images reach it (see :func:`coorddet.models.build_model`)."""

    backbone: str = "mnist-small"
    canvas_size: int = 64
    image_channels: int = 1
    min_size: int | None = None
    max_size: int | None = None
    pretrained: bool = False
    image_mean: Sequence[float] | None = None
    image_std: Sequence[float] | None = None
    backbone_padding: str = "same"
    backbone_init: str = "default"
    keep_image_size: bool = False

    def __post_init__(self) -> None:
        check_choice("backbone", self.backbone, BACKBONES)
        check_choice("keep_image_size", self.keep_image_size, (False, True))
        check_choice("backbone_padding", self.backbone_padding, PADDINGS)
        check_choice("backbone_init", self.backbone_init, BACKBONE_INITS)
        if self.backbone != "mnist-small" and (self.backbone_padding, self.backbone_init) != (
            "same",
            "default",
        ):
            raise ValueError(
                f"backbone_padding and backbone_init apply to mnist-small only, not "
                f"{self.backbone!r}"
            )
        check_choice("image_channels", self.image_channels, (1, 3))
        check_int("canvas_size", self.canvas_size)
        check_int("min_size", self.sizes[0])
        check_int("max_size", self.sizes[1])
        channels = self.channels
        mean, std = self.normalisation
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"image_mean={mean!r}, image_std={std!r} are not valid for {self.backbone}: "
                f"expected {channels} value(s) each"
            )
        for value in std:
            check_number("image_std", value, 1e-6)

    @property
    def spec(self) -> BackboneSpec:
        return BACKBONE_SPECS[self.backbone]

    @property
    def channels(self) -> int:
        """Channels the backbone takes: ``image_channels`` for ``mnist-small``, else 3."""
        return self.image_channels if self.backbone == "mnist-small" else len(self.spec.image_mean)

    @property
    def sizes(self) -> tuple[int, int]:
        """``(min_size, max_size)``; ``canvas_size`` where unset."""
        return (
            self.canvas_size if self.min_size is None else self.min_size,
            self.canvas_size if self.max_size is None else self.max_size,
        )

    @property
    def normalisation(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std: the given ones, else the backbone's (ImageNet's for a
        colour ``mnist-small``)."""
        spec = self.spec
        if len(spec.image_mean) == self.channels:
            default_mean, default_std = spec.image_mean, spec.image_std
        else:
            default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD
        mean = list(default_mean if self.image_mean is None else self.image_mean)
        std = list(default_std if self.image_std is None else self.image_std)
        return mean, std


@dataclass(frozen=True)
class AnchorOptions:
    """torchvision's anchors: sizes in pixels (one list for every map, or one per map) and
    height/width ratios. ``anchor_sizes=None``: the backbone's default for 15-25 px digits."""

    anchor_sizes: Sequence | None = None
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)

    def __post_init__(self) -> None:
        if not self.aspect_ratios:
            raise ValueError(
                "aspect_ratios=[] is not valid; give height/width ratios, e.g. [0.5, 1, 2]"
            )
        for ratio in self.aspect_ratios:
            check_number("aspect_ratios", ratio, 1e-3)

    def generator(self, image: ImageOptions) -> AnchorGenerator:
        """An ``AnchorGenerator`` for ``image``'s backbone (its number of feature maps)."""
        spec = image.spec
        sizes = list(spec.anchor_sizes if self.anchor_sizes is None else self.anchor_sizes)
        maps = spec.feature_maps
        if sizes and all(isinstance(level, (list, tuple)) for level in sizes):
            per_map = [tuple(level) for level in sizes]
            if len(per_map) != maps or len({len(level) for level in per_map}) != 1:
                raise ValueError(
                    f"anchor_sizes={sizes!r} is not valid for {image.backbone}: give one list "
                    f"of sizes for all maps, or {maps} lists of equal length (one per map)"
                )
        else:
            per_map = [tuple(sizes)] * maps
        if not per_map[0]:
            raise ValueError(
                "anchor_sizes=[] is not valid; give sizes in pixels, e.g. [12, 18, 24]"
            )
        for size in (size for level in per_map for size in level):
            check_int("anchor_sizes", size)
        ratios = tuple(float(ratio) for ratio in self.aspect_ratios)
        return FloatAnchorGenerator(tuple(per_map), (ratios,) * maps)


@dataclass(frozen=True)
class ProposalOptions:
    """torchvision's RPN: proposals kept before and after NMS, sized for a few digits per
    64 px canvas (torchvision's 2000/1000 are for 800 px COCO images), anchors sampled per
    image for its losses."""

    rpn_pre_nms_top_n_train: int = 300
    rpn_pre_nms_top_n_test: int = 300
    rpn_post_nms_top_n_train: int = 150
    rpn_post_nms_top_n_test: int = 100
    rpn_batch_size_per_image: int = 256

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            check_int(name, value)


@dataclass(frozen=True)
class BoxHeadOptions:
    """Faster R-CNN's second stage: RoIs sampled per image in training, the ``TwoMLPHead``
    width, how RoIs are pooled, and torchvision's inference options (``box_score_thresh``,
    ``box_detections_per_img``), which the one-stage detectors take too."""

    box_batch_size_per_image: int = 32
    box_head_width: int = 256
    roi_pool: str = "align"
    sampling_ratio: int = 2
    roi_output_size: int = 7
    box_detections_per_img: int = 100
    box_score_thresh: float = 0.05

    def __post_init__(self) -> None:
        check_choice("roi_pool", self.roi_pool, ROI_POOLS)
        for name in ("box_batch_size_per_image", "box_head_width", "roi_output_size"):
            check_int(name, getattr(self, name))
        check_int("box_detections_per_img", self.box_detections_per_img)
        check_int("sampling_ratio", self.sampling_ratio, minimum=0)  # 0: adaptive
        check_number("box_score_thresh", self.box_score_thresh, 0.0, 1.0)


@dataclass(frozen=True)
class ReleasedOptions:
    """The CoordConv paper's released RPN: ``"intended"`` anchors, or ``"released"``, the ones
    its code actually trains with (see :mod:`coorddet.released`)."""

    anchor_layout: str = "intended"

    def __post_init__(self) -> None:
        check_choice("anchor_layout", self.anchor_layout, ANCHOR_LAYOUTS)


OPTION_GROUPS = {
    "image": ImageOptions,
    "anchors": AnchorOptions,
    "proposals": ProposalOptions,
    "box_head": BoxHeadOptions,
    "released": ReleasedOptions,
}
"""A builder's parameter name -> the group it receives."""
