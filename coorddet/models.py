"""Detectors by name: ``build_model(detector=..., **model_config)`` looks its builder up.

Inputs are lists of (1, H, W) or (3, H, W) float images in [0, 1]; targets and detections use
torchvision's format: ``boxes`` (K, 4) xyxy in pixels, ``labels`` (K,) int64, 0 the background.

Every argument is a plain value (str, int, float, bool, list), so a config's ``model:``
section maps one-to-one onto ``build_model``'s keyword arguments and is stored in checkpoints.
In the manner of torchvision's ``get_model`` and timm's ``create_model``, a detector is one
keyword-only builder in :mod:`coorddet.detectors`, registered here under its name (and the RPN
it uses); :func:`register_detector` adds one. ``build_model(coordconv=True)`` is the baseline
build followed by :func:`coorddet.inject.inject_coordconv`, so under the same seed both arms
start from the same weights everywhere except the (zero) coordinate weights.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from coorddet.backbones import BACKBONES
from coorddet.detectors import (
    OPTION_GROUPS,
    GrayscaleTransform,
    faster_rcnn,
    fcos,
    mask_rcnn,
    released_rpn_only,
    retinanet,
    rpn_only,
    ssdlite,
)
from coorddet.inject import DEFAULT_SITES, EXTENTS, check_sites, inject_coordconv
from coorddet.released import NoRoIHeads
from coorddet.validate import check_choice, check_int

__all__ = [
    "BACKBONES",
    "GrayscaleTransform",
    "build_model",
    "default_image_sizes",
    "default_sites",
    "is_rpn_only",
    "uses_masks",
    "list_detectors",
    "model_defaults",
    "register_detector",
]

RPNS = ("torchvision", "released")

ONE_STAGE_SITES = ("backbone-stem", "head-box")
"""The paper's placement carried over to a one-stage detector: at the input, and in the head
that regresses boxes."""

_BUILDERS: dict[tuple[str, str], Callable[..., nn.Module]] = {}
_DEFAULT_SITES: dict[str, tuple[str, ...]] = {}
_MASKS: set[str] = set()  # detectors that train on instance masks


def register_detector(
    name: str,
    builder: Callable[..., nn.Module],
    *,
    rpn: str = "torchvision",
    sites: Sequence[str] = DEFAULT_SITES,
    masks: bool = False,
) -> Callable[..., nn.Module]:
    """Make ``builder`` the detector ``name`` (with the RPN ``rpn``) for :func:`build_model`.

    ``builder`` is keyword-only; it receives the option groups it names (``image``,
    ``anchors``, ``proposals``, ``box_head``, ``released``: :data:`OPTION_GROUPS`) and
    ``num_classes`` if it names it, and returns the detector without CoordConv. ``sites``:
    where ``coordconv=True`` puts CoordConv unless ``coordconv_sites`` says otherwise.
    ``masks``: the detector trains on the targets' instance ``masks``.
    """
    check_choice("rpn", rpn, RPNS)
    unknown = set(inspect.signature(builder).parameters) - {*OPTION_GROUPS, "num_classes"}
    if unknown:
        raise ValueError(f"builder {builder.__name__} takes unknown arguments {sorted(unknown)}")
    _BUILDERS[(name, rpn)] = builder
    _DEFAULT_SITES.setdefault(name, tuple(check_sites(sites)))
    if masks:
        _MASKS.add(name)
    return builder


register_detector("faster-rcnn", faster_rcnn)
register_detector("mask-rcnn", mask_rcnn, masks=True)
register_detector("rpn-only", rpn_only)
register_detector("rpn-only", released_rpn_only, rpn="released")
register_detector("retinanet", retinanet, sites=ONE_STAGE_SITES)
register_detector("fcos", fcos, sites=ONE_STAGE_SITES)
register_detector("ssdlite", ssdlite, sites=ONE_STAGE_SITES)


def list_detectors() -> list[str]:
    """The detector names :func:`build_model` knows, in registration order."""
    return list(dict.fromkeys(name for name, _ in _BUILDERS))


def uses_masks(detector: str) -> bool:
    """Whether ``detector`` trains on instance masks (its data must hold segmentations)."""
    return detector in _MASKS


def default_sites(detector: str) -> tuple[str, ...]:
    """Where ``coordconv=True`` puts CoordConv in ``detector`` by default: the paper's
    placement for the R-CNNs (:data:`DEFAULT_SITES`), the input and the box-regression head
    for one-stage detectors (:data:`ONE_STAGE_SITES`). Unknown names: :data:`DEFAULT_SITES`."""
    return _DEFAULT_SITES.get(detector, DEFAULT_SITES)


def build_model(
    *,
    detector: str = "faster-rcnn",
    rpn: str = "torchvision",
    num_classes: int = 11,
    coordconv: bool = False,
    coordconv_sites: Sequence[str] | None = None,
    with_r: bool = False,
    coordconv_extent: str = "image",
    **options: Any,
) -> nn.Module:
    """Build the detector ``detector`` for gray or colour images, with or without CoordConv.

    Args:
        detector: a name of :func:`list_detectors`: ``"faster-rcnn"``, or ``"rpn-only"``
            (trained on the RPN losses alone, scored by ``rpn_iou``; no detections).
        rpn: ``"torchvision"`` (``RPNHead``, ``AnchorGenerator``, torchvision's sampler and
            losses) or ``"released"``: the CoordConv paper's released RPN
            (:mod:`coorddet.detectors.released`; needs ``detector="rpn-only"``).
        num_classes: including the background (11 = 10 digits + background).
        coordconv, coordconv_sites, with_r: inject CoordConv at these sites
            (:data:`coorddet.inject.SITES`; ``None``: :func:`default_sites`) after building
            the baseline.
        coordconv_extent: what the coordinates of image-aligned layers span in a
            zero-padded batch: ``"image"`` (each image's own extent, so a pixel's coordinates
            never depend on its batch-mates) or ``"batch"`` (the padded tensor, as other
            CoordConv implementations do; an ablation arm). :data:`coorddet.inject.EXTENTS`.
        options: the remaining ``model:`` config keys, sorted into
            :mod:`coorddet.detectors.options`' groups (which document them): the backbone and
            image sizes, anchors, RPN and box-head settings, the released anchor layout.

    Raises:
        ValueError: a bad argument (the message names it and the valid values), or
            ``pretrained=True`` without the weights file in the local cache.
        TypeError: an unknown keyword argument.
    """
    groups = {name: _group(group, options) for name, group in OPTION_GROUPS.items()}
    if options:
        raise TypeError(f"build_model() got unexpected keyword arguments {sorted(options)}")
    if coordconv_sites is None:
        coordconv_sites = default_sites(detector)
    sites = check_sites(coordconv_sites)  # also when coordconv=False: no silent typos
    if coordconv and not sites:
        raise ValueError("coordconv_sites=[] is not valid with coordconv=True; name sites")
    check_int("num_classes", num_classes, minimum=2)
    check_choice("coordconv_extent", coordconv_extent, EXTENTS)
    builder = _builder(detector, rpn)
    arguments = {**groups, "num_classes": num_classes}
    model = builder(**{name: arguments[name] for name in inspect.signature(builder).parameters})
    if coordconv:
        inject_coordconv(model, sites, with_r=with_r, extent=coordconv_extent)
    # NHWC convolutions, pooling and RoIAlign: faster on CPU (see docs/speed.md), and RoI
    # features need no transpose for the box head.
    return model.to(memory_format=torch.channels_last)


def _group(group: type, options: dict[str, Any]) -> Any:
    """``group`` built from (and removing) its keys in ``options``."""
    return group(**{f.name: options.pop(f.name) for f in fields(group) if f.name in options})


def _builder(detector: str, rpn: str) -> Callable[..., nn.Module]:
    check_choice("detector", detector, list_detectors())
    check_choice("rpn", rpn, RPNS)
    builder = _BUILDERS.get((detector, rpn))
    if builder is None:
        needs = " or ".join(repr(name) for name, kind in _BUILDERS if kind == rpn)
        raise ValueError(f"rpn={rpn!r} needs detector={needs}, not {detector!r}")
    return builder


def model_defaults() -> dict[str, Any]:
    """Every ``model:`` config key (``build_model``'s keyword arguments) with its default."""
    parameters = inspect.signature(build_model).parameters.values()
    defaults = {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    defaults["coordconv_sites"] = DEFAULT_SITES  # the default detector's; see default_sites
    for group in OPTION_GROUPS.values():
        defaults.update({f.name: f.default for f in fields(group)})
    return defaults


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
    """True for models without detections (``detector="rpn-only"``), scored by ``rpn_iou``."""
    return isinstance(getattr(model, "roi_heads", None), NoRoIHeads)
