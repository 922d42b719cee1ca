"""The released CoordConv protocol: placement boxes, both anchor layouts, 'valid'
padding, the released sampler, and an RPN-only model through the real command lines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_user_error, run_cli

from coorddet.models import build_model, is_rpn_only
from coorddet.released import (
    TEMPLATES,
    NoRoIHeads,
    ReleasedRegionProposalNetwork,
    receptive_field_centres,
    released_sample,
    released_smooth_l1,
    template_anchors,
)
from data_gen import GeneratorConfig, generate
from data_gen.canvas import PLACEMENT, CanvasSpec, DigitBank, render_canvas

RELEASED = {
    "detector": "rpn-only",
    "rpn": "released",
    "anchor_layout": "released",
    "backbone_padding": "valid",
    "backbone_init": "he-normal",
    "image_mean": [0.0],
    "image_std": [1.0],
}


# -- placement boxes ---------------------------------------------------------------------------


class ChosenDraws:
    """A stand-in for ``np.random.Generator`` whose ``random`` returns the draws given."""

    def __init__(self, first: np.ndarray) -> None:
        self.first = first

    def random(self, shape):  # noqa: ANN001
        assert shape == self.first.shape, "only the first try's draws are planned"
        return self.first


def loader_rectangle(i_center, j_center, height, width, offset):  # noqa: ANN001
    """``field_of_mnist/loader.py``: the placement (ic, jc, h, w) shifted by the crop offset,
    as a COCO ``[x, y, w, h]``."""
    i_center, j_center = i_center - offset, j_center - offset
    return [j_center - width / 2, i_center - height / 2, width, height]


def test_placement_boxes_are_the_loaders_rectangles_cut_or_outside_the_canvas():
    digit = np.zeros((1, 28, 28), dtype=np.uint8)
    digit[0, 4:24, 6:22] = 200  # a solid 20x16 ink block
    bank = DigitBank(digit, np.array([7]))
    spec = CanvasSpec(digits_per_image=(3, 3), boxes=PLACEMENT)  # 120 field -> 64, offset 28
    size, field, offset, low, span = 64, 120, 28, 15, 11
    # field top-left (x, y) and (h, w) of three digits: wholly outside (top-left corner of the
    # field), cut by the left border, inside
    planned = [((0, 0), (20, 20)), ((20, 40), (25, 15)), ((50, 55), (15, 25))]
    draws = np.zeros((6, 3))
    for k, ((x, y), (h, w)) in enumerate(planned):
        draws[1, k], draws[2, k] = (h - low + 0.5) / span, (w - low + 0.5) / span
        draws[4, k] = (x + 0.5) / (field - w + 1)  # x_lo = -offset, x_hi = field - offset - w
        draws[5, k] = (y + 0.5) / (field - h + 1)
    canvas = render_canvas(ChosenDraws(draws), spec, bank=bank, pool=np.array([0]))

    expected = [loader_rectangle(y + h / 2, x + w / 2, h, w, offset) for (x, y), (h, w) in planned]
    assert canvas.boxes.tolist() == expected  # every digit kept, none clipped
    assert canvas.labels.tolist() == [7, 7, 7]
    image = canvas.image
    ink = np.argwhere(image > 0)
    x0, y0, w, h = canvas.boxes[1].tolist()  # the cut digit: [-8, 12, 15, 25]
    assert x0 < 0 and image[y0 : y0 + h, : x0 + w].all()  # its visible part is drawn
    x2, y2, w2, h2 = canvas.boxes[2].tolist()
    assert image[y2 : y2 + h2, x2 : x2 + w2].all()
    drawn = np.zeros_like(image, dtype=bool)
    for x, y, w, h in canvas.boxes[1:].tolist():
        drawn[max(y, 0) : y + h, max(x, 0) : x + w] = True
    assert drawn[tuple(ink.T)].all() and size == image.shape[0]  # no ink outside those two


def test_placement_dataset_records_its_boxes_and_keeps_boxes_outside(tmp_path):
    out = tmp_path / "placement"
    generate(GeneratorConfig(out=str(out), train=6, val=2, test=2, boxes="placement", workers=1))
    info = json.loads((out / "dataset.json").read_text())
    assert info["boxes"] == "placement" and info["parameters"]["boxes"] == "placement"
    anns = json.loads((out / "annotations" / "instances_train.json").read_text())["annotations"]
    assert len(anns) == 6 * 5  # every digit annotated
    assert any(
        x < 0 or y < 0 or x + w > 64 or y + h > 64 for x, y, w, h in (a["bbox"] for a in anns)
    )

    from coorddet.data import CocoDataset

    dataset = CocoDataset(out, "train")
    assert dataset.box_kind == "placement"
    boxes = torch.cat([dataset[i][1]["boxes"] for i in range(len(dataset))])
    assert len(boxes) == 30 and ((boxes < 0) | (boxes > 64)).any()  # read back, not refused


@pytest.mark.robustness
def test_visible_dataset_with_a_box_outside_is_still_refused(tiny_dataset, tmp_path):
    import shutil

    data = tmp_path / "visible"
    shutil.copytree(tiny_dataset, data)
    path = data / "annotations" / "instances_train.json"
    coco = json.loads(path.read_text())
    coco["annotations"][0]["bbox"] = [-5, 3, 20, 20]
    path.write_text(json.dumps(coco))
    result = run_cli("train.py", "--config", "configs/smoke.yaml", "--data", str(data),
                     "--out", str(tmp_path / "run"), "--quiet")  # fmt: skip
    assert_user_error(result, "lies outside its 64x64 image", "instances_train.json")


# -- anchors, padding, sampler -----------------------------------------------------------------


def test_receptive_field_centres_are_the_released_ones():
    assert receptive_field_centres("valid") == (8.0, 4.0)  # make_anchors_mnist
    assert receptive_field_centres("same") == (2.0, 4.0)  # make_anchors_mnist_same


def _xyxy(i, j, h, w):  # noqa: ANN001 - released (i_centre, j_centre, h, w) -> xyxy
    return [j - w / 2, i - h / 2, j + w / 2, i + h / 2]


def test_both_anchor_layouts_on_a_2x2_map_by_hand():
    # cells centred at rows / columns 8 and 12 (first 8, stride 4)
    intended = template_anchors(2, 2, first=8, stride=4, layout="intended").view(2, 2, 9, 4)
    released = template_anchors(2, 2, first=8, stride=4, layout="released").view(2, 2, 9, 4)
    for r, i in enumerate((8, 12)):
        for c, j in enumerate((8, 12)):
            want = [_xyxy(i, j, h, w) for h, w in TEMPLATES]
            assert intended[r, c].tolist() == want
            # component t of anchor n is coordinate (4n + t) // 9 of template (4n + t) % 9
            h, w = [t[0] for t in TEMPLATES], [t[1] for t in TEMPLATES]
            want = [
                _xyxy(i, i, i, i),
                _xyxy(i, i, i, i),
                _xyxy(i, j, j, j),
                _xyxy(j, j, j, j),
                _xyxy(j, j, h[0], h[1]),
                _xyxy(h[2], h[3], h[4], h[5]),
                _xyxy(h[6], h[7], h[8], w[0]),
                _xyxy(w[1], w[2], w[3], w[4]),
                _xyxy(w[5], w[6], w[7], w[8]),
            ]
            assert released[r, c].tolist() == want
    assert released[0, 0, 5].tolist() == _xyxy(25, 15, 20, 20)  # fixed, whatever the cell
    assert released[1, 1, 5].tolist() == _xyxy(25, 15, 20, 20)


def test_valid_padding_gives_the_13x13_map():
    valid = build_model(**RELEASED)
    same = build_model(**{**RELEASED, "backbone_padding": "same"})
    image = torch.zeros(1, 1, 64, 64)
    assert valid.backbone(image).shape == (1, 64, 13, 13)
    assert same.backbone(image).shape == (1, 64, 16, 16)


def test_released_sampler_on_a_hand_built_image():
    gt = torch.tensor([[10.0, 10.0, 30.0, 30.0], [100.0, 100.0, 120.0, 120.0]])  # 2nd: off canvas
    moved = torch.tensor(
        [
            [10.0, 10.0, 30.0, 31.0],  # IoU 0.95 with gt 0: positive
            [11.0, 11.0, 31.0, 31.0],  # IoU 0.82 with gt 0: positive
            [40.0, 40.0, 60.0, 60.0],  # IoU 0: negative candidate
            [-5.0, 40.0, 10.0, 60.0],  # outside the image: never negative
        ]
        + [[40.0 + k, 0.0, 50.0 + k, 10.0] for k in range(8)]  # 8 more negative candidates
    )
    torch.manual_seed(0)
    positive, matched, negative = released_sample(moved, gt, 64, 64)
    pairs = sorted(zip(positive.tolist(), matched.tolist(), strict=True))
    # gt 1's best box is box 0 (all IoUs 0: the first), whatever its IoU
    assert pairs == [(0, 0), (0, 1), (1, 0)]
    assert len(negative) == 6 and not {0, 1, 3} & set(negative.tolist())
    few = released_sample(moved[:6], gt, 64, 64)[2]
    assert len(few) == 0  # 3 candidates, not more than 6: the released code draws none
    assert released_smooth_l1(torch.tensor([[0.5, -2.0, 1.0, 0.0]])).item() == 0.25 + 2.0 + 1.0


# -- the RPN-only model ------------------------------------------------------------------------


def test_released_model_is_rpn_only_with_the_released_coordconv_sites():
    torch.manual_seed(0)
    baseline = build_model(**RELEASED)
    torch.manual_seed(0)
    coordconv = build_model(**RELEASED, coordconv=True)
    assert is_rpn_only(baseline) and isinstance(baseline.roi_heads, NoRoIHeads)
    assert isinstance(baseline.rpn, ReleasedRegionProposalNetwork)
    added = {k for k in coordconv.state_dict() if k not in baseline.state_dict()}
    assert added == {
        "backbone.body.conv1.coord_weight",  # before the first conv
        "rpn.head.conv.0.coord_weight",  # before another_conv
        "rpn.head.bbox_pred.coord_weight",  # before box_mover's 1x1
    }
    for key, value in baseline.state_dict().items():  # same seed, same initial weights
        torch.testing.assert_close(coordconv.state_dict()[key], value)
    assert not baseline.rpn.head.bbox_pred.weight.any()  # box_mover starts at zero


def test_rpn_only_training_losses_and_proposals():
    torch.manual_seed(0)
    model = build_model(**RELEASED, coordconv=True).train()
    image = torch.rand(1, 64, 64)
    target = {"boxes": torch.tensor([[-6.0, 3.0, 14.0, 27.0], [30.0, 30.0, 52.0, 48.0]]),
              "labels": torch.tensor([1, 2])}  # fmt: skip
    losses = model([image], [target])
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert model.rpn.head.bbox_pred.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        (output,) = model([image])
    assert output["boxes"].shape == (0, 4)  # no RoI head, no detections


@pytest.mark.parametrize("bad, message", [
    ({"rpn": "released"}, "detector='rpn-only'"),
    ({"backbone_padding": "valid"}, "needs rpn='released'"),
    ({"anchor_layout": "diagonal"}, "anchor_layout='diagonal'"),
    ({"detector": "yolo"}, "detector='yolo'"),
])  # fmt: skip
def test_bad_released_options_raise(bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        build_model(**bad)


@pytest.mark.slow
def test_released_config_trains_and_evaluates_an_rpn_only_model(tmp_path):
    data = tmp_path / "placement"
    generate(GeneratorConfig(out=str(data), train=16, val=4, test=4, boxes="placement", workers=1))
    out = tmp_path / "run"
    result = run_cli("train.py", "--config", "configs/paper_released.yaml", "--data", str(data),
                     "--out", str(out), "--coordconv", "--max-epochs", "1", "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["rpn_iou"]) and 0 <= metrics["rpn_iou"] <= 1
    assert metrics["map"] is None and metrics["det_iou"] is None and metrics["gt_iou"] is None
    assert (out / "checkpoints" / "best.ckpt").is_file()  # chosen by rpn_iou
    header = (out / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "train_loss_epoch" in header
    report = tmp_path / "report"
    result = run_cli("-m", "coorddet.evaluate", "--data", str(data), "--split", "test",
                     "--out", str(report), "--quiet", str(out / "checkpoints" / "last.ckpt"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (scored,) = json.loads((report / "metrics.json").read_text()).values()
    assert math.isfinite(scored["rpn_iou"]) and scored["map"] is None
    predictions = json.loads(next(Path(report).glob("predictions_*.json")).read_text())
    assert predictions == []
    usage = run_cli("experiments/anchor_usage.py", "--data", str(data), "--images", "4",
                    str(out / "checkpoints" / "last.ckpt"))  # fmt: skip
    assert usage.returncode == 0, usage.stderr[-3000:]
    row = usage.stdout.strip().splitlines()[-1].split("|")[2:-1]  # 9 anchors, inside, IoU
    shares = [float(cell.strip().rstrip("%")) for cell in row[:9]]
    assert len(row) == 11 and abs(sum(shares) - 100) <= 5  # rounded percentages
