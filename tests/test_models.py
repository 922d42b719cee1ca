"""build_model: backbones, canvas-sized transform, baseline vs CoordConv arms, validation."""

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from coorddet.backbones import MnistSmallBackbone
from coorddet.coordconv import CoordConv2d
from coorddet.models import BACKBONES, GrayscaleTransform, build_model, default_image_sizes
from coorddet.poolers import ChannelsLastTwoMLPHead, MatmulRoIAlign, SingleMapRoIPool


def _batch(count: int = 2, size: int = 64):
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(1, size, size, generator=generator) for _ in range(count)]
    targets = [
        {
            "boxes": torch.tensor([[4.0, 6.0, 24.0, 28.0], [30.0, 32.0, 50.0, 50.0]]),
            "labels": torch.tensor([3, 7]),
        }
        for _ in range(count)
    ]
    return images, targets


def _train_step(model: GeneralizedRCNN) -> dict[str, torch.Tensor]:
    images, targets = _batch()
    model.train()
    losses = model(images, targets)
    sum(losses.values()).backward()
    return losses


@pytest.mark.parametrize("coordconv", [False, True])
def test_mnist_small_trains_and_detects(coordconv):
    torch.manual_seed(0)
    model = build_model(coordconv=coordconv)
    assert isinstance(model, GeneralizedRCNN) and isinstance(model.roi_heads, RoIHeads)
    losses = _train_step(model)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(loss) for loss in losses.values())
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []  # DDP without find_unused_parameters
    model.eval()
    with torch.no_grad():
        detections = model(_batch()[0])
    assert detections[0]["boxes"].shape[1] == 4
    assert detections[0]["labels"].max() <= 10


def test_composed_as_torchvision_s_faster_rcnn_constructor_would_build_it():
    """Same seed, same parts: build_model's detector has the weights and gives the detections
    of torchvision's ``FasterRCNN`` built from those parts (its own transform and heads)."""
    torch.manual_seed(0)
    model = build_model(roi_pool="align-torchvision").eval()
    torch.manual_seed(0)
    body = MnistSmallBackbone()
    rpn_head = RPNHead(64, 9)  # 3 sizes x 3 aspect ratios
    box_head = ChannelsLastTwoMLPHead(64 * 7 * 7, 256)
    theirs = FasterRCNN(
        body,
        num_classes=None,
        min_size=64,
        max_size=64,
        image_mean=[0.06],
        image_std=[0.21],
        rpn_anchor_generator=AnchorGenerator(((12, 18, 24),), ((0.5, 1.0, 2.0),)),
        rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_train=150,
        rpn_post_nms_top_n_test=100,
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
        box_head=box_head,
        box_predictor=FastRCNNPredictor(256, 11),
        box_batch_size_per_image=32,
        box_score_thresh=0.05,
    )
    theirs = theirs.to(memory_format=torch.channels_last).eval()
    mine_state, their_state = model.state_dict(), theirs.state_dict()
    assert mine_state.keys() == their_state.keys()
    for key in mine_state:
        assert torch.equal(mine_state[key], their_state[key]), key
    images = _batch(3)[0]
    with torch.no_grad():
        for mine, other in zip(model(images), theirs(images), strict=True):
            for key in ("boxes", "scores", "labels"):
                assert torch.equal(mine[key], other[key]), key


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_mnist_small_pools_before_relu_with_the_paper_s_numbers(padding):
    """max-pool -> ReLU is the paper's ReLU -> max-pool, forward and backward, bit for bit."""
    torch.manual_seed(0)
    ours = MnistSmallBackbone(padding=padding)
    body = ours.body
    paper = nn.Sequential(body.conv1, body.relu1, body.pool1, body.conv2, body.relu2, body.pool2)
    images = torch.rand(4, 1, 64, 64) - 0.5  # many windows with no positive value
    images[0, 0, :20] = 0.0  # and ties: flat windows
    results = []
    for net in (ours, paper):
        ours.zero_grad(set_to_none=True)
        out = net(images)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        results.append([out, *(p.grad for p in ours.parameters())])
    for mine, theirs in zip(*results, strict=True):
        assert torch.equal(mine, theirs)


def test_mnist_small_layout():
    model = build_model()
    body = model.backbone.body
    assert [name for name, _ in body.named_children()][:3] == ["conv1", "pool1", "relu1"]
    assert body.conv1.in_channels == 1 and body.conv2.out_channels == 64
    assert model.backbone(torch.zeros(2, 1, 64, 64)).shape == (2, 64, 16, 16)
    assert model.rpn.head.conv[0][0].in_channels == 64
    assert model.roi_heads.box_head.fc7.out_features == 256
    assert isinstance(model.roi_heads.box_roi_pool, MatmulRoIAlign)


def test_canvas_is_never_resized():
    model = build_model(canvas_size=64).eval()
    images, _ = _batch(size=64)
    image_list, _ = model.transform(images)
    assert image_list.tensors.shape == (2, 1, 64, 64)
    assert model.transform.min_size == (64,) and model.transform.max_size == 64


def test_coordconv_arm_is_the_baseline_plus_coordinate_weights():
    torch.manual_seed(0)
    baseline = build_model()
    after_baseline = torch.random.get_rng_state()
    torch.manual_seed(0)
    coordconv = build_model(coordconv=True)
    assert torch.equal(torch.random.get_rng_state(), after_baseline)  # same RNG afterwards
    base, coord = baseline.state_dict(), coordconv.state_dict()
    assert set(coord) - set(base) == {
        "backbone.body.conv1.coord_weight",
        "rpn.head.conv.0.0.coord_weight",
        "rpn.head.bbox_pred.coord_weight",
    }
    for key, value in base.items():
        assert torch.equal(coord[key], value), key
    assert all((coord[key] == 0).all() for key in set(coord) - set(base))


def test_default_sites_parameter_overhead_under_one_percent():
    baseline = sum(p.numel() for p in build_model().parameters())
    coordconv = sum(p.numel() for p in build_model(coordconv=True).parameters())
    assert 0 < (coordconv - baseline) / baseline < 0.01


def test_with_r_and_sites_reach_the_layers():
    model = build_model(coordconv=True, coordconv_sites=["backbone"], with_r=True)
    layers = [m for m in model.modules() if isinstance(m, CoordConv2d)]
    assert len(layers) == 2 and all(layer.coord_weight.shape[1] == 3 for layer in layers)


@pytest.mark.parametrize("backbone", ["resnet50-fpn", "mobilenet-v3-fpn"])
def test_imagenet_backbones_take_grayscale_canvases(backbone):
    torch.manual_seed(0)
    model = build_model(backbone=backbone, coordconv=True)
    assert isinstance(model.transform, GrayscaleTransform)
    images, _ = _batch()
    image_list, _ = model.transform(images)
    assert image_list.tensors.shape == (2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        detections = model(images[:1])
    assert detections[0]["boxes"].shape[1] == 4


def test_grayscale_transform_replicates_then_normalises():
    transform = GrayscaleTransform(32, 32, [0.1, 0.2, 0.3], [0.5, 0.5, 0.5]).eval()
    image = torch.rand(1, 32, 32)
    image_list, _ = transform([image])
    expected = (image.expand(3, 32, 32) - torch.tensor([0.1, 0.2, 0.3])[:, None, None]) / 0.5
    assert_close(image_list.tensors[0], expected)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        transform([torch.rand(2, 32, 32)])


def test_colour_images_into_a_gray_model_become_torchvisions_gray():
    from torchvision.transforms.v2.functional import rgb_to_grayscale

    transform = GrayscaleTransform(32, 32, [0.1], [0.5]).eval()
    image = torch.rand(3, 32, 32)
    image_list, _ = transform([image])
    assert_close(image_list.tensors[0], (rgb_to_grayscale(image) - 0.1) / 0.5, rtol=0, atol=0)


def test_colour_mnist_small_takes_3_channels_and_imagenet_statistics():
    model = build_model(image_channels=3)
    assert model.backbone.body[0].in_channels == 3
    assert model.transform.image_mean == [0.485, 0.456, 0.406]
    assert build_model().backbone.body[0].in_channels == 1
    with pytest.raises(ValueError, match="image_channels=2"):
        build_model(image_channels=2)


@pytest.mark.parametrize("roi_pool", ["align", "align-torchvision", "pool"])
def test_roi_pool_choices(roi_pool):
    torch.manual_seed(0)
    model = build_model(roi_pool=roi_pool, sampling_ratio=1)
    pooler = model.roi_heads.box_roi_pool
    assert isinstance(pooler, SingleMapRoIPool) == (roi_pool == "pool")
    assert isinstance(pooler, MatmulRoIAlign) == (roi_pool == "align")
    assert all(torch.isfinite(loss) for loss in _train_step(model).values())


def test_same_seed_same_detections_for_both_align_implementations():
    images, _ = _batch()
    results = []
    for roi_pool in ("align", "align-torchvision"):
        torch.manual_seed(0)
        model = build_model(roi_pool=roi_pool).eval()
        with torch.no_grad():
            results.append(model(images))
    for ours, theirs in zip(*results, strict=True):
        assert_close(ours["scores"], theirs["scores"], atol=1e-5, rtol=1e-4)
        assert_close(ours["boxes"], theirs["boxes"], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("coordconv", [False, True])
def test_channels_last_model_computes_what_the_nchw_model_does(coordconv):
    torch.manual_seed(0)
    model = build_model(coordconv=coordconv)
    assert model.backbone.body.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    nchw = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    assert not nchw.backbone.body.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    images, targets = _batch(3)
    losses = []
    for net in (model, nchw):
        torch.manual_seed(1)  # the RPN and RoI samplers draw
        losses.append(net.train()(images, targets))
    assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        ours, theirs = model.eval()(images), nchw.eval()(images)
    for mine, other in zip(ours, theirs, strict=True):
        assert_close(mine["scores"], other["scores"], atol=1e-5, rtol=1e-4)
        assert_close(mine["boxes"], other["boxes"], atol=1e-3, rtol=1e-4)


def test_detector_options_reach_torchvision():
    """Every option reaches its torchvision part; the others are FasterRCNN's defaults."""
    model = build_model(
        anchor_sizes=[16, 24],
        aspect_ratios=[1.0],
        rpn_pre_nms_top_n_train=111,
        rpn_pre_nms_top_n_test=77,
        rpn_post_nms_top_n_train=33,
        rpn_post_nms_top_n_test=22,
        rpn_batch_size_per_image=64,
        box_batch_size_per_image=48,
        box_head_width=64,
        box_detections_per_img=7,
        box_score_thresh=0.2,
        image_mean=[0.5],
        image_std=[0.25],
    )
    assert model.rpn.anchor_generator.sizes == ((16, 24),)
    assert model.rpn.head.cls_logits.out_channels == 2
    assert model.rpn._pre_nms_top_n["training"] == 111
    assert model.rpn._post_nms_top_n["testing"] == 22
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 48
    assert model.roi_heads.box_predictor.cls_score.in_features == 64
    assert model.roi_heads.detections_per_img == 7 and model.roi_heads.score_thresh == 0.2
    assert model.transform.image_mean == [0.5] and model.transform.image_std == [0.25]
    rpn, heads = model.rpn, model.roi_heads
    assert rpn._pre_nms_top_n["testing"] == 77 and rpn._post_nms_top_n["training"] == 33
    assert rpn.fg_bg_sampler.batch_size_per_image == 64
    assert (rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold) == (0.7, 0.3)
    assert rpn.nms_thresh == 0.7 and rpn.min_size == 1e-3
    assert (heads.detections_per_img, heads.score_thresh, heads.nms_thresh) == (7, 0.2, 0.5)
    assert heads.box_coder.weights == (10.0, 10.0, 5.0, 5.0)
    assert heads.proposal_matcher.high_threshold == 0.5
    fpn = build_model(backbone="mobilenet-v3-fpn", anchor_sizes=[[8, 16]] * 3)
    assert fpn.rpn.anchor_generator.sizes == ((8, 16),) * 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"backbone": "resnet18"}, "backbone='resnet18' is not valid; valid values: mnist-small"),
        ({"roi_pool": "max"}, "roi_pool='max' is not valid; valid values: align"),
        ({"backbone": "resnet50-fpn", "roi_pool": "pool"}, "roi_pool='pool' is not valid"),
        ({"coordconv_sites": ["stem"]}, "unknown CoordConv site.*valid sites: backbone-stem"),
        ({"coordconv": True, "coordconv_sites": ["fpn"]}, "'fpn' matches no conv"),
        ({"coordconv": True, "coordconv_sites": []}, "coordconv_sites=\\[\\] is not valid"),
        ({"num_classes": 1}, "num_classes=1 is not valid"),
        ({"box_head_width": 0}, "box_head_width=0 is not valid"),
        ({"box_batch_size_per_image": 2.5}, "box_batch_size_per_image=2.5 is not valid"),
        ({"box_score_thresh": 1.5}, "box_score_thresh=1.5 is not valid"),
        ({"anchor_sizes": []}, "anchor_sizes=\\[\\] is not valid"),
        ({"anchor_sizes": [[16], [32]]}, "anchor_sizes=.* is not valid for mnist-small"),
        ({"aspect_ratios": [1.0, -2.0]}, "aspect_ratios=-2.0 is not valid"),
        ({"image_mean": [0.1, 0.2, 0.3]}, "expected 1 value"),
        ({"backbone": "resnet50-fpn", "image_std": [0.2]}, "expected 3 value"),
        ({"pretrained": True}, "pretrained=True is not valid for backbone='mnist-small'"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(options, message):
    with pytest.raises(ValueError, match=message):
        build_model(**options)


@pytest.mark.parametrize("backbone", ["resnet50-fpn", "mobilenet-v3-fpn"])
def test_pretrained_never_downloads(backbone, tmp_path):
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))  # an empty cache
    try:
        with pytest.raises(ValueError, match=f"needs {tmp_path}/checkpoints/.*pth.*copy the file"):
            build_model(backbone=backbone, pretrained=True)
    finally:
        torch.hub.set_dir(previous)
    assert not any(tmp_path.rglob("*.pth"))


def test_backbones_constant():
    assert BACKBONES == ("mnist-small", "resnet50-fpn", "mobilenet-v3-fpn")


@pytest.mark.parametrize(
    ("backbone", "sizes", "expected"),
    [
        ("mnist-small", {(64, 64)}, (64, 64)),  # one size: never resized
        ("resnet50-fpn", {(640, 480)}, (480, 640)),
        ("mobilenet-v3-fpn", {(200, 150), (96, 120)}, (800, 1333)),  # torchvision's
        ("mnist-small", {(200, 150), (96, 120)}, (150, 200)),  # no image shrunk
    ],
)
def test_default_image_sizes(backbone, sizes, expected):
    assert default_image_sizes(backbone, sizes) == expected


def test_min_and_max_size_are_torchvision_s():
    model = build_model(min_size=48, max_size=80)
    assert (model.transform.min_size, model.transform.max_size) == ((48,), 80)
    images, _ = model.transform([torch.rand(1, 100, 60)])
    assert images.image_sizes == [(80, 48)]  # short side 48, long side 80 (<= max_size)
    assert build_model().transform.min_size == (64,)  # canvas_size


def test_detectors_are_registered_builders():
    from coorddet.detectors import rpn_only
    from coorddet.models import list_detectors, register_detector

    assert list_detectors()[0] == "faster-rcnn" and "rpn-only" in list_detectors()

    def tiny_rpn(*, image, anchors, proposals):  # a user's own detector: one short builder
        return rpn_only(image=image, anchors=anchors, proposals=proposals)

    register_detector("tiny-rpn", tiny_rpn)
    try:
        assert "tiny-rpn" in list_detectors()
        torch.manual_seed(0)
        mine = build_model(detector="tiny-rpn", coordconv=True)
        torch.manual_seed(0)
        theirs = build_model(detector="rpn-only", coordconv=True)
        assert mine.state_dict().keys() == theirs.state_dict().keys()
        with pytest.raises(ValueError, match="unknown arguments"):
            register_detector("bad", lambda *, backbone: None)
    finally:
        from coorddet import models

        models._BUILDERS.pop(("tiny-rpn", "torchvision"), None)


def test_unknown_model_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="roi_pol"):
        build_model(roi_pol="align")
