"""Put CoordConv layers into any torchvision Faster R-CNN, without forking torchvision.

:func:`inject_coordconv` walks ``named_modules()`` of the model's sub-trees, swaps the chosen
``nn.Conv2d`` modules for :meth:`CoordConv2d.from_conv` copies (same outputs until training
moves the coordinate weights) and returns their qualified names, in the style of torchvision's
``overwrite_eps``. Checkpoint keys stay stable: an injected conv keeps its ``weight``/``bias``
keys and shapes and gains one ``coord_weight`` key (e.g. ``rpn.head.bbox_pred.coord_weight``).

Per-image extent: torchvision's transform zero-pads the images of a batch to one 32-divisible
size. So that a pixel's coordinates do not depend on its batch-mates, a forward hook on
``model.transform`` writes each image's real (height, width) as a fraction of the padded batch
into one small CPU tensor that every image-aligned injected layer shares (its
``image_extent``); a forward pre-hook on ``model.roi_heads`` empties it again once the
backbone and RPN are done. Layers derive their stride from their own map size, so the one
tensor serves every level; coordinates span each image and are 0 on its padding. The tensor is
a plain attribute (``coordconv_image_extent`` on ``model.transform`` and ``model.roi_heads``),
not a buffer: not in the ``state_dict``, not moved by ``.to()``; ``copy.deepcopy`` and
``torch.save`` keep it shared within the copy. Both hooks are TorchScript-compatible
functions: ``torch.jit.script`` of an injected model works and keeps the per-image extents.
One model object must not run forwards from several threads at once (they would share it).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList

from coorddet.coordconv import CoordConv2d

SITES = ("backbone-stem", "backbone", "fpn", "rpn-head", "rpn-box", "roi-head")
"""Where CoordConv can go:

* ``backbone-stem``: the first conv of the backbone (``model.backbone.body`` when present);
* ``backbone``: every conv of the backbone body (not the FPN);
* ``fpn``: every conv of ``model.backbone.fpn``;
* ``rpn-head``: the RPN's shared 3x3 conv(s), ``model.rpn.head.conv``;
* ``rpn-box``: the RPN's box-regression conv, ``model.rpn.head.bbox_pred``;
* ``roi-head``: convs of ``model.roi_heads.box_head`` (torchvision's ``TwoMLPHead`` has none).
  Their input is one RoI-pooled crop per row, so their coordinates are relative to the RoI.
"""

DEFAULT_SITES = ("backbone-stem", "rpn-head", "rpn-box")
"""The paper's placement for detection: at the input, in the RPN, before its box regressor."""

EXTENT_ATTRIBUTE = "coordconv_image_extent"  # on model.transform and model.roi_heads


def _record_image_extent(
    module: nn.Module,
    inputs: tuple[list[Tensor], list[dict[str, Tensor]] | None],
    output: tuple[ImageList, list[dict[str, Tensor]] | None],
) -> None:
    """Forward hook on ``model.transform``: per-image extent as fractions of the batch."""
    image_list = output[0]
    height, width = image_list.tensors.shape[-2:]
    fractions: list[list[float]] = []
    for image_height, image_width in image_list.image_sizes:
        fractions.append([image_height / height, image_width / width])
    extent: Tensor = module.coordconv_image_extent
    new = torch.tensor(fractions, dtype=torch.float64).reshape(-1, 2)
    extent.resize_(new.shape).copy_(new)


def _forget_image_extent(
    module: nn.Module,
    inputs: tuple[
        dict[str, Tensor], list[Tensor], list[tuple[int, int]], list[dict[str, Tensor]] | None
    ],
) -> None:
    """Forward pre-hook on ``model.roi_heads``, which runs after every image-aligned layer:
    later stand-alone calls of those layers use the whole map again."""
    extent: Tensor = module.coordconv_image_extent
    extent.resize_(0, 2)


def _conv_names(modules: dict[str, nn.Module], root: str, exclude: str | None = None) -> list[str]:
    prefix = root + "."
    return [
        name
        for name, module in modules.items()
        if isinstance(module, nn.Conv2d)
        and (name == root or name.startswith(prefix))
        and not (exclude and (name == exclude or name.startswith(exclude + ".")))
    ]


def check_sites(sites: Iterable[str] | str) -> list[str]:
    """``sites`` as a list (a single name may be a string); ``ValueError`` on unknown names."""
    site_list = [sites] if isinstance(sites, str) else list(sites)
    unknown = [site for site in site_list if site not in SITES]
    if unknown:
        raise ValueError(
            f"unknown CoordConv site(s) {', '.join(map(repr, unknown))}; "
            f"valid sites: {', '.join(SITES)}"
        )
    return site_list


def site_modules(model: GeneralizedRCNN, site: str) -> list[str]:
    """Qualified names of the convs (plain or already CoordConv) at ``site``, model order."""
    if site not in SITES:
        raise ValueError(f"unknown CoordConv site {site!r}; valid sites: {', '.join(SITES)}")
    modules = dict(model.named_modules())
    body = "backbone.body" if "backbone.body" in modules else "backbone"
    if site == "backbone-stem":
        return _conv_names(modules, body, exclude="backbone.fpn")[:1]
    if site == "backbone":
        return _conv_names(modules, body, exclude="backbone.fpn")
    if site == "fpn":
        return _conv_names(modules, "backbone.fpn")
    if site == "rpn-head":
        return _conv_names(modules, "rpn.head.conv")
    if site == "rpn-box":
        return _conv_names(modules, "rpn.head.bbox_pred")
    return _conv_names(modules, "roi_heads.box_head")


def _shared_extent(model: GeneralizedRCNN) -> Tensor:
    """The model's extent tensor, creating it and registering both hooks on first use."""
    transform, roi_heads = model.transform, model.roi_heads
    extent = getattr(transform, EXTENT_ATTRIBUTE, None)
    if extent is None:
        # A plain attribute, not a buffer: not in the state_dict, never moved by .to().
        extent = torch.empty(0, 2, dtype=torch.float64)
        setattr(transform, EXTENT_ATTRIBUTE, extent)
        setattr(roi_heads, EXTENT_ATTRIBUTE, extent)
    if _record_image_extent not in transform._forward_hooks.values():
        transform.register_forward_hook(_record_image_extent)
    if _forget_image_extent not in roi_heads._forward_pre_hooks.values():
        roi_heads.register_forward_pre_hook(_forget_image_extent)
    return extent


def inject_coordconv(
    model: GeneralizedRCNN, sites: Iterable[str] | str = DEFAULT_SITES, with_r: bool = False
) -> list[str]:
    """Replace the ``nn.Conv2d`` modules at ``sites`` with ``CoordConv2d.from_conv`` copies.

    Works on any torchvision ``FasterRCNN`` (``mnist-small``, ``fasterrcnn_resnet50_fpn``,
    ``fasterrcnn_mobilenet_v3_large_fpn``, ...). The model computes exactly what it did
    before until the zero-initialised coordinate weights are trained. Convs that already are
    ``CoordConv2d`` are left alone, so injecting twice changes nothing.

    Args:
        model: the detector, changed in place.
        sites: names from :data:`SITES` (a single name is accepted as a string).
        with_r: also add the radius channel.

    Returns:
        The qualified module names replaced, in model order (e.g. ``"backbone.body.conv1"``).

    Raises:
        ValueError: an unknown site name (the message lists the valid ones), or a site with
            no conv in this model.
    """
    site_list = check_sites(sites)
    chosen: dict[str, bool] = {}  # name -> image-aligned (False for RoI-head convs)
    for site in site_list:
        names = site_modules(model, site)
        if not names:
            raise ValueError(
                f"CoordConv site {site!r} matches no conv in this {type(model).__name__} "
                f"(backbone {type(model.backbone).__name__}); choose other sites"
            )
        chosen.update(dict.fromkeys(names, site != "roi-head"))
    modules = dict(model.named_modules())
    replaced = []
    extent = _shared_extent(model) if any(chosen.values()) else None
    for name in modules:  # model order
        if name not in chosen or isinstance(modules[name], CoordConv2d):
            continue
        layer = CoordConv2d.from_conv(modules[name], with_r=with_r)
        if chosen[name]:
            layer.image_extent = extent
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        replaced.append(name)
    return replaced
