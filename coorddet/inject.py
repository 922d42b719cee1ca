"""Put CoordConv layers into torchvision detectors, without forking torchvision.

:func:`inject_coordconv` swaps the ``nn.Conv2d`` modules at the chosen sites for
:meth:`CoordConv2d.from_conv` copies (same outputs until training moves the coordinate
weights) and returns their qualified names, in the style of torchvision's ``overwrite_eps``.
Checkpoint keys stay stable: an injected conv keeps its ``weight``/``bias`` keys and gains one
``coord_weight`` key (e.g. ``rpn.head.bbox_pred.coord_weight``).

Sites are data: each detector family declares a :class:`SiteTable` (site name -> the modules
it covers -> image-aligned or RoI-relative), and :data:`FAMILIES` maps a model class to its
table. Adding a detector family is adding a table, not code.

Per-image extent: torchvision's transform zero-pads the images of a batch to one size. So that
a pixel's coordinates do not depend on its batch-mates, a forward hook on the family's
transform writes each image's real (height, width) as a fraction of the padded batch into one
small CPU tensor that every image-aligned injected layer shares (its ``image_extent``); a
forward pre-hook on the family's ``extent_ends_at`` module (the first one after every
image-aligned layer) empties it again. Layers derive their stride from their own map size, so
the one tensor serves every pyramid level. The tensor is a plain attribute
(``coordconv_image_extent`` on both hooked modules), not a buffer: not in the ``state_dict``,
not moved by ``.to()``; ``copy.deepcopy`` and ``torch.save`` keep it shared within the copy.
Both hooks are TorchScript-compatible. One model object must not run forwards from several
threads at once (they would share the tensor). ``extent="batch"`` leaves the layers without the
shared tensor: their coordinates then span the padded batch tensor, as other implementations'
do, so a pixel's coordinates depend on its batch-mates (an ablation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.ssd import SSD

from coorddet.coordconv import CoordConv2d


@dataclass(frozen=True)
class Site:
    """The convs of one site: every ``nn.Conv2d`` under the first of ``roots`` that the model
    has (minus those under ``exclude``), or only the first of them (``first_only``).
    ``image_aligned``: its input is the image's map (coordinates span each image); ``False``:
    one RoI crop per row (coordinates relative to the RoI, no extent)."""

    roots: tuple[str, ...]
    image_aligned: bool = True
    first_only: bool = False
    exclude: str | None = None


def _forget_image_extent(
    module: nn.Module,
    inputs: tuple[
        dict[str, Tensor], list[Tensor], list[tuple[int, int]], list[dict[str, Tensor]] | None
    ],
) -> None:
    """Forward pre-hook on ``roi_heads``, which runs after every image-aligned layer of a
    ``GeneralizedRCNN``: later stand-alone calls of those layers use the whole map again.
    (TorchScript wants a hook's types to be its module's, hence one hook per family.)"""
    extent: Tensor = module.coordconv_image_extent
    extent.resize_(0, 2)


def _forget_after_heads(module: nn.Module, inputs: tuple[ImageList, list[Tensor]]) -> None:
    """Forward pre-hook on ``anchor_generator``, which a one-stage detector (RetinaNet, FCOS,
    SSD) runs after its backbone and head."""
    extent: Tensor = module.coordconv_image_extent
    extent.resize_(0, 2)


@dataclass(frozen=True)
class SiteTable:
    """A detector family's sites, and where its per-image extent lives: set by a forward hook
    on ``transform``, emptied by ``forget_hook`` before ``extent_ends_at`` runs."""

    sites: dict[str, Site]
    extent_ends_at: str
    forget_hook: Callable[..., None]
    transform: str = "transform"


_BODY = ("backbone.body", "backbone")  # an FPN backbone's body, else the backbone itself
BACKBONE_SITES = {
    "backbone-stem": Site(_BODY, first_only=True, exclude="backbone.fpn"),
    "backbone": Site(_BODY, exclude="backbone.fpn"),
    "fpn": Site(("backbone.fpn",)),
}
"""The sites every family shares: its backbone's first conv, its body, its FPN."""

GENERALIZED_RCNN = SiteTable(
    sites={
        **BACKBONE_SITES,
        "rpn-head": Site(("rpn.head.conv",)),
        "rpn-box": Site(("rpn.head.bbox_pred",)),
        "roi-head": Site(("roi_heads.box_head",), image_aligned=False),
        "mask-head": Site(("roi_heads.mask_head",), image_aligned=False),
    },
    extent_ends_at="roi_heads",  # after the backbone and the RPN
    forget_hook=_forget_image_extent,
)
"""Faster R-CNN, Mask R-CNN, Keypoint R-CNN, every other ``GeneralizedRCNN`` (coorddet's
RPN-only detector too)."""

ONE_STAGE = SiteTable(
    sites={
        **BACKBONE_SITES,
        "head-cls": Site(("head.classification_head",)),
        "head-box": Site(("head.regression_head",)),
    },
    extent_ends_at="anchor_generator",  # after the backbone and the head, on every level
    forget_hook=_forget_after_heads,
)
"""RetinaNet, FCOS and SSD: a backbone (an FPN, or SSD's own maps) and one head run over
every level, a classification tower and a regression tower (FCOS's centerness conv too)."""

FAMILIES: dict[type[nn.Module], SiteTable] = {
    GeneralizedRCNN: GENERALIZED_RCNN,
    RetinaNet: ONE_STAGE,
    FCOS: ONE_STAGE,
    SSD: ONE_STAGE,
}
"""Model class -> its site table; the first class a model is an instance of wins."""

SITES = tuple(dict.fromkeys(site for table in FAMILIES.values() for site in table.sites))
"""Every site name of every family: ``backbone-stem`` (the backbone's first conv),
``backbone`` (every conv of the backbone body, not the FPN), ``fpn``, ``rpn-head`` (the RPN's
shared conv), ``rpn-box`` (the RPN's box regressor), ``roi-head`` (the box head's convs,
RoI-relative; torchvision's ``TwoMLPHead`` has none), ``mask-head`` (Mask R-CNN's mask head,
RoI-relative), ``head-cls`` (a one-stage detector's classification tower and logits conv) and
``head-box`` (its regression tower and box conv, FCOS's centerness conv too)."""

DEFAULT_SITES = ("backbone-stem", "rpn-head", "rpn-box")
"""The paper's placement for detection: at the input, in the RPN, before its box regressor."""

EXTENTS = ("image", "batch")  # what image-aligned coordinates span: each image, or the batch
EXTENT_ATTRIBUTE = "coordconv_image_extent"  # on the table's transform and extent_ends_at


def site_table(model: nn.Module) -> SiteTable:
    """The :class:`SiteTable` of ``model``'s family; ``ValueError`` for an unknown family."""
    for family, table in FAMILIES.items():
        if isinstance(model, family):
            return table
    known = ", ".join(family.__name__ for family in FAMILIES)
    raise ValueError(f"no CoordConv sites are known for {type(model).__name__} (known: {known})")


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


def site_modules(model: nn.Module, site: str) -> list[str]:
    """Qualified names of the convs (plain or already CoordConv) at ``site``, model order."""
    check_sites([site])
    spec = site_table(model).sites.get(site)
    if spec is None:
        return []
    modules = dict(model.named_modules())
    root = next((root for root in spec.roots if root in modules), None)
    if root is None:
        return []
    names = [
        name
        for name, module in modules.items()
        if isinstance(module, nn.Conv2d)
        and _under(name, root)
        and not (spec.exclude and _under(name, spec.exclude))
    ]
    return names[:1] if spec.first_only else names


def model_sites(model: nn.Module) -> list[str]:
    """The sites of ``model`` that hold at least one conv, in table order."""
    return [site for site in site_table(model).sites if site_modules(model, site)]


def _under(name: str, root: str) -> bool:
    return name == root or name.startswith(root + ".")


def _record_image_extent(
    module: nn.Module,
    inputs: tuple[list[Tensor], list[dict[str, Tensor]] | None],
    output: tuple[ImageList, list[dict[str, Tensor]] | None],
) -> None:
    """Forward hook on the transform: per-image extent as fractions of the padded batch."""
    image_list = output[0]
    height, width = image_list.tensors.shape[-2:]
    fractions: list[list[float]] = []
    for image_height, image_width in image_list.image_sizes:
        fractions.append([image_height / height, image_width / width])
    extent: Tensor = module.coordconv_image_extent
    new = torch.tensor(fractions, dtype=torch.float64).reshape(-1, 2)
    extent.resize_(new.shape).copy_(new)


def _shared_extent(model: nn.Module, table: SiteTable) -> Tensor:
    """The model's extent tensor, creating it and registering both hooks on first use."""
    start = model.get_submodule(table.transform)
    end = model.get_submodule(table.extent_ends_at)
    extent = getattr(start, EXTENT_ATTRIBUTE, None)
    if extent is None:
        # A plain attribute, not a buffer: not in the state_dict, never moved by .to().
        extent = torch.empty(0, 2, dtype=torch.float64)
        setattr(start, EXTENT_ATTRIBUTE, extent)
        setattr(end, EXTENT_ATTRIBUTE, extent)
    if _record_image_extent not in start._forward_hooks.values():
        start.register_forward_hook(_record_image_extent)
    if table.forget_hook not in end._forward_pre_hooks.values():
        end.register_forward_pre_hook(table.forget_hook)
    return extent


def inject_coordconv(
    model: nn.Module,
    sites: Iterable[str] | str = DEFAULT_SITES,
    with_r: bool = False,
    extent: str = "image",
) -> list[str]:
    """Replace the ``nn.Conv2d`` modules at ``sites`` with ``CoordConv2d.from_conv`` copies.

    Works on any model of a family in :data:`FAMILIES`: coorddet's detectors and
    torchvision's (``fasterrcnn_*``, ``maskrcnn_*``, ``keypointrcnn_*``, ``retinanet_*``,
    ``fcos_*``, ``ssd300_vgg16``, ``ssdlite320_*``). Grouped and depthwise convs take
    CoordConv too: the coordinate channels are an ungrouped term added to the output. The model
    computes exactly what it did before until the zero-initialised coordinate weights are
    trained. Convs that already are ``CoordConv2d`` are left alone: injecting twice changes
    nothing.

    Args:
        model: the detector, changed in place.
        sites: names from :data:`SITES` (a single name is accepted as a string).
        with_r: also add the radius channel.
        extent: ``"image"``: image-aligned coordinates span each image's own extent in the
            padded batch; ``"batch"``: the whole padded tensor (:data:`EXTENTS`).

    Returns:
        The qualified module names replaced, in model order (e.g. ``"backbone.body.conv1"``).

    Raises:
        ValueError: an unknown site name (the message lists the valid ones), a model of an
            unknown family, a site with no conv in this model, or an unknown ``extent``.
    """
    if extent not in EXTENTS:
        raise ValueError(f"unknown CoordConv extent {extent!r}; valid: {', '.join(EXTENTS)}")
    site_list = check_sites(sites)
    table = site_table(model)
    chosen: dict[str, bool] = {}  # name -> image-aligned
    for site in site_list:
        names = site_modules(model, site)
        if not names:
            backbone = type(getattr(model, "backbone", model)).__name__
            raise ValueError(
                f"CoordConv site {site!r} matches no conv in this {type(model).__name__} "
                f"(backbone {backbone}); its sites: {', '.join(model_sites(model))}"
            )
        chosen.update(dict.fromkeys(names, table.sites[site].image_aligned))
    modules = dict(model.named_modules())
    replaced = []
    per_image = extent == "image" and any(chosen.values())
    shared = _shared_extent(model, table) if per_image else None
    for name in modules:  # model order
        if name not in chosen or isinstance(modules[name], CoordConv2d):
            continue
        layer = CoordConv2d.from_conv(modules[name], with_r=with_r)
        if chosen[name] and shared is not None:
            layer.image_extent = shared
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        replaced.append(name)
    return replaced
