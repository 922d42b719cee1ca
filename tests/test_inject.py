"""inject_coordconv on torchvision detectors: exact conversion, sites, per-image extent,
TorchScript, copies and checkpoints."""

import copy
import io
import warnings

import pytest
import torch
from torch.testing import assert_close
from torchvision.models.detection import (
    fasterrcnn_mobilenet_v3_large_fpn,
    fasterrcnn_resnet50_fpn,
)
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead

from coorddet.coordconv import CoordConv2d
from coorddet.inject import DEFAULT_SITES, SITES, inject_coordconv
from coorddet.models import build_model

TORCHVISION_BUILDERS = {
    "resnet50-fpn": fasterrcnn_resnet50_fpn,
    "mobilenet-v3-fpn": fasterrcnn_mobilenet_v3_large_fpn,
}


def _torchvision_model(name: str):
    torch.manual_seed(0)
    builder = TORCHVISION_BUILDERS[name]
    model = builder(
        weights=None,
        weights_backbone=None,
        num_classes=11,
        min_size=64,
        max_size=64,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=50,  # 1000 RoIs x a 12544 -> 1024 head would take seconds
    )
    return model.eval()


def _images(*shapes: tuple[int, int], channels: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.rand(channels, h, w, generator=generator) for h, w in shapes]


def _randomise_coordinate_weights(model: torch.nn.Module) -> None:
    """Non-zero coordinate weights, so coordinates change what the model computes."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, CoordConv2d):
                module.coord_weight.copy_(
                    torch.randn(module.coord_weight.shape, generator=generator) * 0.1
                )


def _assert_same_detections(before, after):
    assert len(before) == len(after)
    for expected, actual in zip(before, after, strict=True):
        assert expected["boxes"].shape[0] > 0
        for key in ("boxes", "scores", "labels"):
            assert_close(actual[key], expected[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(TORCHVISION_BUILDERS))
def test_torchvision_detectors_give_the_same_detections_after_injection(name):
    model = _torchvision_model(name)
    images = _images((64, 64), (48, 64), channels=3)
    with torch.no_grad():
        before = model(images)
        replaced = inject_coordconv(model, ["backbone", "fpn", "rpn-head", "rpn-box"])
        after = model(images)
    _assert_same_detections(before, after)
    assert "rpn.head.conv.0.0" in replaced and "rpn.head.bbox_pred" in replaced
    assert any(name.startswith("backbone.fpn.") for name in replaced)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(isinstance(model.get_submodule(n), CoordConv2d) for n in replaced)
    assert (
        len(replaced) == len([n for n in convs if n.startswith(("backbone.", "rpn.head.conv"))]) + 1
    )


@pytest.mark.parametrize(
    ("name", "stem"),
    [("resnet50-fpn", "backbone.body.conv1"), ("mobilenet-v3-fpn", "backbone.body.0.0")],
)
def test_default_sites_are_the_stem_and_the_rpn(name, stem):
    model = _torchvision_model(name)
    replaced = inject_coordconv(model)
    assert replaced == [stem, "rpn.head.conv.0.0", "rpn.head.bbox_pred"]
    assert DEFAULT_SITES == ("backbone-stem", "rpn-head", "rpn-box")


def test_mnist_small_sites_names():
    model = build_model()
    assert inject_coordconv(model, ["backbone"]) == ["backbone.body.conv1", "backbone.body.conv2"]
    assert inject_coordconv(model, ["backbone-stem", "rpn-box"]) == ["rpn.head.bbox_pred"]
    assert inject_coordconv(model, "rpn-head") == ["rpn.head.conv.0.0"]
    assert inject_coordconv(model, ["rpn-head"]) == []  # already CoordConv: left alone


def test_bad_site_names():
    model = build_model()
    with pytest.raises(ValueError, match="valid sites: " + ", ".join(SITES)):
        inject_coordconv(model, ["backbone-stem", "rpn_head"])
    with pytest.raises(ValueError, match="'fpn' matches no conv"):
        inject_coordconv(model, ["fpn"])
    with pytest.raises(ValueError, match="'roi-head' matches no conv"):
        inject_coordconv(model, ["roi-head"])  # TwoMLPHead has no conv
    assert not any(isinstance(m, CoordConv2d) for m in model.modules())


def test_roi_head_convs_use_roi_relative_coordinates():
    torch.manual_seed(0)
    model = build_model(box_head_width=32)
    model.roi_heads.box_head = FastRCNNConvFCHead((64, 7, 7), [16], [32])
    assert inject_coordconv(model, ["roi-head"]) == ["roi_heads.box_head.0.0"]
    layer = model.roi_heads.box_head[0][0]
    assert layer.image_extent.numel() == 0
    assert not hasattr(model.transform, "coordconv_image_extent")  # no hooks needed
    model.eval()
    with torch.no_grad():
        model(_images((64, 64), (40, 64)))  # batch of RoIs, not images: must not fail


def _coordinates_seen(model, images):
    """{layer name: (N, 2, H, W) coordinates each injected layer used} for one forward."""
    seen, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, CoordConv2d):

            def record(module, inputs, output, name=name):
                seen[name] = module.coordinates(inputs[0]).expand(inputs[0].shape[0], -1, -1, -1)

            handles.append(module.register_forward_hook(record))
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return seen


def test_coordinates_follow_the_image_not_the_padded_batch():
    torch.manual_seed(0)
    model = build_model(coordconv=True, coordconv_sites=["backbone", "rpn-head", "rpn-box"])
    model.eval()
    small, large = _images((32, 64), (64, 64))
    alone = _coordinates_seen(model, [small])
    batched = _coordinates_seen(model, [small, large])
    assert set(alone) == set(batched) and len(alone) == 4
    for name, coords in alone.items():
        rows, columns = coords.shape[-2:]
        assert batched[name].shape[-2] == 2 * rows  # padded to the large image
        assert_close(batched[name][0, :, :rows, :columns], coords[0])
        assert coords[0, 1, -1, 0] == 1  # the small image's last row
        assert (batched[name][0, :, rows:] == 0).all()  # padding: as if the image were alone
    assert model.transform.coordconv_image_extent.numel() == 0  # emptied after the forward


def test_stem_output_on_an_image_does_not_depend_on_its_batch_mates():
    torch.manual_seed(0)
    model = build_model(coordconv=True).eval()
    _randomise_coordinate_weights(model)
    outputs = []
    handle = model.backbone.body.conv1.register_forward_hook(
        lambda module, inputs, output: outputs.append(output[0])
    )
    small, large = _images((32, 64), (64, 64))
    with torch.no_grad():
        model([small])
        model([small, large])
    handle.remove()
    alone, batched = outputs
    assert_close(batched[:, :32], alone)


def _without_extent_hooks(model):
    plain = copy.deepcopy(model)
    plain.transform._forward_hooks.clear()
    return plain


def test_script_whole_injected_model_keeps_the_extent():
    torch.manual_seed(0)
    model = build_model(coordconv=True).eval()
    _randomise_coordinate_weights(model)
    images = _images((32, 64), (64, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
        with torch.no_grad():
            _, scripted_detections = scripted(images)
            eager = model(images)
            padded_coordinates = _without_extent_hooks(model)(images)
    _assert_same_detections(eager, scripted_detections)
    with pytest.raises(AssertionError):  # the extent matters, so the scripted model uses it
        _assert_same_detections(padded_coordinates[:1], scripted_detections[:1])


def test_deepcopy_and_torch_save_keep_one_extent_per_model():
    torch.manual_seed(0)
    model = build_model(coordconv=True).eval()
    copied = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for clone in (copied, loaded):
        extent = clone.transform.coordconv_image_extent
        assert extent is not model.transform.coordconv_image_extent
        assert clone.backbone.body.conv1.image_extent is extent
        assert clone.rpn.head.bbox_pred.image_extent is extent
        assert clone.roi_heads.coordconv_image_extent is extent


def test_checkpoint_keys_are_the_baseline_keys_plus_coord_weight():
    torch.manual_seed(0)
    baseline = build_model()
    model = copy.deepcopy(baseline)
    replaced = inject_coordconv(model)
    keys, baseline_keys = set(model.state_dict()), set(baseline.state_dict())
    assert keys - baseline_keys == {f"{name}.coord_weight" for name in replaced}
    assert baseline_keys <= keys
    model.load_state_dict(model.state_dict())  # strict round trip
