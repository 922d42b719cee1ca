"""Every detector by name: both arms start alike, train, detect, and run end to end through
train.py and coorddet.evaluate on generated data."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from torch.testing import assert_close

from coorddet.coordconv import CoordConv2d
from coorddet.models import build_model, default_sites, list_detectors, uses_masks

ONE_STAGE = ["retinanet", "fcos", "ssdlite"]
NEW = ["mask-rcnn", *ONE_STAGE]


def _batch(count: int = 2) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(1, 64, 64, generator=generator) for _ in range(count)]
    boxes = torch.tensor([[4.0, 6.0, 24.0, 28.0], [30.0, 32.0, 50.0, 50.0]])
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    for index, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
        masks[index, y0:y1, x0:x1] = 1
    targets = [{"boxes": boxes, "labels": torch.tensor([3, 7]), "masks": masks}] * count
    return images, targets


def test_every_detector_is_registered_with_its_default_sites():
    assert list_detectors() == ["faster-rcnn", "mask-rcnn", "rpn-only", *ONE_STAGE]
    for detector in ("faster-rcnn", "mask-rcnn", "rpn-only"):
        assert default_sites(detector) == ("backbone-stem", "rpn-head", "rpn-box")
    for detector in ONE_STAGE:
        assert default_sites(detector) == ("backbone-stem", "head-box")
    assert [d for d in list_detectors() if uses_masks(d)] == ["mask-rcnn"]


@pytest.mark.parametrize("detector", NEW)
def test_both_arms_start_alike_train_and_detect(detector):
    torch.manual_seed(0)
    baseline = build_model(detector=detector, box_score_thresh=0.0)
    torch.manual_seed(0)
    coordconv = build_model(detector=detector, coordconv=True, box_score_thresh=0.0)
    injected = [n for n, m in coordconv.named_modules() if isinstance(m, CoordConv2d)]
    assert injected and injected[0] == "backbone.body.conv1"
    plain, coord = baseline.state_dict(), coordconv.state_dict()
    assert set(coord) - set(plain) == {f"{name}.coord_weight" for name in injected}
    assert all(torch.equal(plain[key], coord[key]) for key in plain)
    images, targets = _batch()
    with torch.no_grad():
        before = baseline.eval()(images)
        after = coordconv.eval()(images)
    for expected, actual in zip(before, after, strict=True):
        assert len(expected["boxes"]) > 0
        assert_close(actual["boxes"], expected["boxes"])
        assert_close(actual["scores"], expected["scores"])
    assert ("masks" in after[0]) == (detector == "mask-rcnn")
    coordconv.train()
    losses = coordconv(images, targets)
    assert all(torch.isfinite(loss) for loss in losses.values())
    sum(losses.values()).backward()
    unused = [n for n, p in coordconv.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []  # DDP without find_unused_parameters


@pytest.mark.slow
def test_every_detector_trains_and_one_report_compares_them(tiny_dataset, tmp_path):
    """train.py --detector for each new detector (the CoordConv arm; both arms train in the
    test above), then one coorddet.evaluate over checkpoints of different detectors."""
    checkpoints = []
    for detector in NEW:
        out = tmp_path / detector
        result = run_cli(
            "train.py", "--config", "configs/smoke.yaml", "--data", str(tiny_dataset),
            "--detector", detector, "--coordconv", "--name", detector, "--out", str(out),
            "--quiet",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"detector: {detector}" in (out / "config.yaml").read_text()
        checkpoints.append(str(out / "checkpoints" / "last.ckpt"))
    report = tmp_path / "report"
    result = run_cli(
        "-m", "coorddet.evaluate", "--data", str(tiny_dataset), "--out", str(report), "--quiet",
        *checkpoints,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((report / "metrics.json").read_text())
    assert list(metrics) == NEW
    for detector, run in metrics.items():
        assert run["map"] is not None and run["gt_iou"] is not None
        assert (run["rpn_iou"] is None) == (detector in ONE_STAGE)  # no RPN, no proposals
        assert (run["segm_map"] is None) == (detector != "mask-rcnn")  # masks: mask AP
    text = (report / "report.md").read_text()
    assert all(f"{detector}, CoordConv, seed 0" in text for detector in NEW)


@pytest.mark.parametrize("detector", NEW)
def test_new_detectors_take_an_imagenet_backbone(detector):
    """With torchvision's FPN backbone for real data: colour images of two sizes, CoordConv at
    the detector's default sites, one training step and detections."""
    torch.manual_seed(0)
    model = build_model(detector=detector, backbone="mobilenet-v3-fpn", coordconv=True,
                        num_classes=3, min_size=96, max_size=128, box_score_thresh=0.0)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    images = [
        torch.rand(3, 96, 128, generator=generator),
        torch.rand(3, 80, 80, generator=generator),
    ]
    _, (target, _) = _batch()
    targets = []
    for image in images:
        masks = torch.zeros(2, *image.shape[-2:], dtype=torch.uint8)
        masks[:, 10:40, 10:40] = 1
        targets.append({**target, "labels": torch.tensor([1, 2]), "masks": masks})
    losses = model.train()(images, targets)
    assert all(torch.isfinite(loss) for loss in losses.values())
    sum(losses.values()).backward()
    with torch.no_grad():
        detections = model.eval()(images)
    assert len(detections) == 2 and len(detections[0]["boxes"]) > 0
