"""CoordConv in every torchvision detector family: exact until trained, sites as data, each
pyramid level's and each image's own coordinates in one-stage heads, grouped convs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from torchvision.models import detection

from coorddet._coordinate_term import coordinate_grid
from coorddet.coordconv import CoordConv2d
from coorddet.inject import inject_coordconv, model_sites

SMALL = {"min_size": 64, "max_size": 96}
FEW = {**SMALL, "rpn_post_nms_top_n_test": 20, "box_detections_per_img": 5}  # RoI heads: cheap
# builder -> (its keyword arguments, the sites injected, the attribute holding score_thresh)
BUILDERS = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": (SMALL, ["backbone", "fpn", "rpn-head", "rpn-box"]),
    "maskrcnn_resnet50_fpn": (FEW, ["backbone-stem", "fpn", "rpn-box", "mask-head"]),
    "keypointrcnn_resnet50_fpn": (FEW, ["backbone-stem", "rpn-head", "rpn-box"]),
    "retinanet_resnet50_fpn": (SMALL, ["backbone-stem", "fpn", "head-cls", "head-box"]),
    "retinanet_resnet50_fpn_v2": (SMALL, ["backbone-stem", "head-cls", "head-box"]),
    "fcos_resnet50_fpn": (SMALL, ["backbone-stem", "fpn", "head-cls", "head-box"]),
    "ssd300_vgg16": ({}, ["backbone-stem", "head-cls", "head-box"]),
    "ssdlite320_mobilenet_v3_large": ({}, ["backbone", "head-cls", "head-box"]),
}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    options, _ = BUILDERS[name]
    classes = {"keypointrcnn_resnet50_fpn": 2}.get(name, 4)
    model = getattr(detection, name)(
        weights=None, weights_backbone=None, num_classes=classes, **options
    )
    heads = getattr(model, "roi_heads", model)
    heads.score_thresh = 0.0  # an untrained detector's scores are low
    return model.eval()


def _images(*shapes: tuple[int, int]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.rand(3, h, w, generator=generator) for h, w in shapes]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_torchvision_detector_keeps_its_detections(name):
    model = _build(name)
    images = _images((64, 64), (48, 80))
    with torch.no_grad():
        before = model(images)
        replaced = inject_coordconv(model, BUILDERS[name][1])
        after = model(images)
    assert replaced and all(isinstance(model.get_submodule(n), CoordConv2d) for n in replaced)
    for expected, actual in zip(before, after, strict=True):
        assert len(expected["boxes"]) > 0
        for key in expected:
            assert_close(actual[key], expected[key])


@pytest.mark.parametrize(
    ("name", "sites"),
    [
        ("retinanet_resnet50_fpn", ["backbone-stem", "backbone", "fpn", "head-cls", "head-box"]),
        ("fcos_resnet50_fpn", ["backbone-stem", "backbone", "fpn", "head-cls", "head-box"]),
        ("ssdlite320_mobilenet_v3_large", ["backbone-stem", "backbone", "head-cls", "head-box"]),
        ("maskrcnn_resnet50_fpn",
         ["backbone-stem", "backbone", "fpn", "rpn-head", "rpn-box", "roi-head", "mask-head"]),
    ],
)  # fmt: skip
def test_a_site_the_model_lacks_is_one_value_error_listing_its_sites(name, sites):
    model = _build(name)
    if name.startswith("maskrcnn"):  # a conv box head, so that roi-head has convs
        model.roi_heads.box_head = detection.faster_rcnn.FastRCNNConvFCHead(
            (256, 7, 7), [16], [1024]
        )
    assert model_sites(model) == sites
    missing = "rpn-box" if "head-box" in sites else "head-cls"
    with pytest.raises(
        ValueError, match=f"'{missing}' matches no conv.*its sites: {', '.join(sites)}"
    ):
        inject_coordconv(model, [missing])


def test_head_box_covers_fcos_centerness():
    model = _build("fcos_resnet50_fpn")
    replaced = inject_coordconv(model, ["head-box"])
    assert "head.regression_head.bbox_ctrness" in replaced
    assert "head.regression_head.bbox_reg" in replaced
    assert not any(name.startswith("head.classification_head") for name in replaced)


@pytest.mark.parametrize("name", ["retinanet_resnet50_fpn", "fcos_resnet50_fpn"])
def test_one_stage_heads_see_each_level_and_each_image(name):
    """The head is shared by every pyramid level: each call gets that level's resolution and
    each image of a padded batch its own extent (padding 0), exactly as computed alone."""
    model = _build(name)
    inject_coordconv(model, ["head-cls", "head-box"])
    layer = model.head.classification_head.cls_logits
    seen = []
    handle = layer.register_forward_pre_hook(
        lambda module, inputs: seen.append(module.coordinates(inputs[0]))
    )
    images = _images((64, 64), (32, 96))
    with torch.no_grad():
        model(images)
    handle.remove()
    assert model.transform.coordconv_image_extent.numel() == 0  # emptied after the head
    batch = model.transform(images)[0]
    padded, transformed = batch.tensors.shape[-2:], batch.image_sizes
    assert len(seen) == 5  # P3-P7
    sizes = set()
    for coords in seen:
        assert coords.shape[0] == 2  # one grid per image: their extents differ
        height, width = coords.shape[-2:]
        sizes.add((height, width))
        for image, (h, w) in enumerate(transformed):
            extent = torch.tensor([[h / padded[0], w / padded[1]]], dtype=torch.float64)
            assert_close(coords[image], coordinate_grid(height, width, extent, False)[0])
    assert len(sizes) == 5
    assert not torch.equal(seen[0][0], seen[0][1])  # on the finest level the images differ


@pytest.mark.parametrize("groups", [4, 16])
def test_grouped_and_depthwise_convs_add_an_ungrouped_coordinate_term(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1, groups=groups)
    layer = CoordConv2d.from_conv(conv)
    x = torch.randn(2, 16, 12, 10)
    with torch.no_grad():
        assert_close(layer(x), conv(x))  # exact until the coordinate weights train
        layer.coord_weight.normal_()
        coords = layer.coordinates(x).expand(2, -1, -1, -1)
        expected = conv(x) + F.conv2d(coords, layer.coord_weight, None, 1, 1)
        assert_close(layer(x), expected)
