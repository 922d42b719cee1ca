"""Instance masks end to end: data_gen's ink RLEs, reading them (``CocoDataset(masks=True)``),
augmenting and batching them, predictions with segmentations, and mask AP (``segm_*``) as
pycocotools scores it."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_user_error, coco_annotation, run_cli
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from coorddet.data import CocoDataset, collate_detection
from coorddet.errors import UserError
from coorddet.evaluation import score_runs
from coorddet.masks import check_rle, encode
from coorddet.metrics import METRIC_KEYS, SEGM_KEYS, evaluate_records
from coorddet.predictions import (
    ImagePrediction,
    records_from_coco_results,
    to_coco_results,
)
from coorddet.report import metrics_table, render_report
from coorddet.transforms import augment, build_transforms
from data_gen import GeneratorConfig
from data_gen.canvas import CanvasSpec, DigitBank, render_canvas
from data_gen.generate import _render, _render_state
from data_gen.sources import load_source

SPLITS = ("train", "val", "test")
KEYS = ["id", "image_id", "category_id", "bbox", "area", "iscrowd", "segmentation"]


def split_json(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def decoded(segmentation: dict) -> np.ndarray:
    """A COCO RLE -> its (H, W) bool mask."""
    return mask_utils.decode(segmentation).astype(bool)


def tight_box(mask: np.ndarray) -> list[int]:
    """``[x, y, w, h]`` of a non-empty (H, W) mask."""
    ys, xs = np.nonzero(mask)
    return [
        int(xs.min()),
        int(ys.min()),
        int(xs.max() - xs.min() + 1),
        int(ys.max() - ys.min() + 1),
    ]


def coco_stats(coco_gt: COCO, results: list[dict], iou_type: str) -> list[float]:
    """pycocotools' own COCOeval ``stats[0:9]``, -1 as NaN."""
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [math.nan if s < 0 else float(s) for s in evaluator.stats[:9]]


# --- data_gen: each digit's visible ink as its segmentation ----------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_each_rle_is_its_digits_visible_ink_and_its_box_is_the_bbox(tiny_dataset, split):
    doc = split_json(tiny_dataset, split)
    config = GeneratorConfig(out=str(tiny_dataset), train=24, val=8, test=8, seed=0)
    state = _render_state(config, load_source(config.source))
    by_image: dict[int, list[dict]] = {}
    for ann in doc["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for image in doc["images"]:
        pixels = np.asarray(Image.open(tiny_dataset / split / image["file_name"]))
        canvas = _render(state, split, image["id"] - 1)  # the generator's own draws again
        anns = by_image.get(image["id"], [])
        assert np.array_equal(canvas.image, pixels)
        assert len(anns) == len(canvas.masks)
        ink = np.zeros(pixels.shape, dtype=bool)
        for ann, mask in zip(anns, canvas.masks, strict=True):
            assert list(ann) == KEYS  # the old keys in their old order, segmentation last
            assert ann["segmentation"]["size"] == [image["height"], image["width"]]
            assert isinstance(ann["segmentation"]["counts"], str)
            rle_mask = decoded(ann["segmentation"])
            assert np.array_equal(rle_mask, mask)
            assert rle_mask.any() and not (rle_mask & (pixels == 0)).any()  # ink only
            assert tight_box(rle_mask) == ann["bbox"]
            assert ann["area"] == ann["bbox"][2] * ann["bbox"][3]
            ink |= rle_mask
        assert np.array_equal(ink, pixels > 0)  # every inked pixel belongs to some digit


def test_overlapping_digits_each_keep_all_their_ink_and_the_border_cuts_it():
    """Digits are summed, never painted over: overlapping masks overlap; the crop clips them."""
    images = np.zeros((1, 28, 28), dtype=np.uint8)
    images[0, 4:24, 6:22] = 100  # a solid block: its resized ink fills its box
    bank = DigitBank(images, np.array([3]))
    spec = CanvasSpec(canvas_size=32, digits_per_image=(4, 4), digit_size=(12, 16), crop_from=48)
    overlaps = cut = 0
    for seed in range(30):
        canvas = render_canvas(np.random.default_rng(seed), spec, bank=bank, pool=np.array([0]))
        for (x, y, w, h), mask in zip(canvas.boxes.tolist(), canvas.masks, strict=True):
            expected = np.zeros_like(mask)
            expected[y : y + h, x : x + w] = True
            assert np.array_equal(mask, expected)
            cut += x == 0 or y == 0 or x + w == 32 or y + h == 32
        layers = canvas.masks.sum(axis=0)
        assert np.array_equal(canvas.image, np.minimum(layers * 100, 255))  # a clipped sum
        overlaps += int((layers > 1).sum())
    assert overlaps and cut


def test_placement_boxes_keep_their_rectangle_and_get_the_ink_left_by_the_crop(tmp_path):
    from data_gen import generate

    out = tmp_path / "placement"
    generate(GeneratorConfig(out=str(out), train=6, val=0, test=0, boxes="placement", workers=1))
    doc = split_json(out, "train")
    meta = json.loads((out / "dataset.json").read_text())
    assert "segmentation" in meta["conventions"]
    for ann in doc["annotations"]:
        x, y, w, h = ann["bbox"]
        mask = decoded(ann["segmentation"])
        inside = np.zeros_like(mask)
        inside[max(y, 0) : max(y + h, 0), max(x, 0) : max(x + w, 0)] = True
        assert not (mask & ~inside).any()  # ink within its paste rectangle, clipped


# --- reading masks ---------------------------------------------------------------------------


@pytest.mark.parametrize("decode", ["memory", "lazy"])
def test_dataset_masks_align_with_boxes(tiny_dataset, decode):
    dataset = CocoDataset(tiny_dataset, "val", decode=decode, masks=True)
    anns = {a["id"]: a for a in split_json(tiny_dataset, "val")["annotations"]}
    for index in range(len(dataset)):
        image, target = dataset[index]
        masks = target["masks"]
        assert masks.dtype == torch.uint8 and masks.shape == (len(target["boxes"]), 64, 64)
        image_id = int(target["image_id"])
        mine = [a for a in anns.values() if a["image_id"] == image_id]
        for box, mask, ann in zip(target["boxes"].tolist(), masks.numpy(), mine, strict=True):
            x1, y1, x2, y2 = box
            assert tight_box(mask) == [x1, y1, x2 - x1, y2 - y1]  # exactly its box
            assert np.array_equal(mask.astype(bool), decoded(ann["segmentation"]))
    assert "masks" not in CocoDataset(tiny_dataset, "val")[0][1]  # off by default


def write_split(root: Path, annotations: list[dict], size=(40, 30)) -> Path:
    """One blank ``size`` (width, height) image with ``annotations``, as a COCO split "s"."""
    (root / "s").mkdir(parents=True)
    (root / "annotations").mkdir()
    Image.new("L", size).save(root / "s" / "a.png")
    image = {"id": 1, "file_name": "a.png", "width": size[0], "height": size[1]}
    document = {"images": [image], "annotations": annotations,
                "categories": [{"id": 1, "name": "one"}]}  # fmt: skip
    path = root / "annotations" / "instances_s.json"
    path.write_text(json.dumps(document))
    return path


def test_polygons_and_uncompressed_rle_are_read_and_crowds_dropped_with_their_masks(tmp_path):
    square = np.zeros((30, 40), dtype=np.uint8)
    square[5:15, 10:20] = 1
    runs = mask_utils.encode(np.asfortranarray(square[:, :, None]))[0]
    compressed = {"size": [30, 40], "counts": runs["counts"].decode()}
    runs_of, value, length = [], 0, 0  # column-major runs, starting with zeros
    for pixel in square.flatten(order="F").tolist():
        if pixel != value:
            runs_of, value, length = runs_of + [length], pixel, 0
        length += 1
    uncompressed = {"size": [30, 40], "counts": runs_of + [length]}
    polygon = [[10, 5, 20, 5, 20, 15, 10, 15]]
    anns = [
        coco_annotation(1, 1, 1, (10, 5, 10, 10)) | {"segmentation": polygon},
        coco_annotation(2, 1, 1, (0, 0, 40, 30)) | {"segmentation": compressed, "iscrowd": 1},
        coco_annotation(3, 1, 1, (10, 5, 10, 10)) | {"segmentation": uncompressed},
        coco_annotation(4, 1, 1, (10, 5, 10, 10)) | {"segmentation": compressed},
    ]
    write_split(tmp_path, anns)
    _, target = CocoDataset(tmp_path, "s", masks=True)[0]
    assert target["masks"].shape == (3, 30, 40) and len(target["boxes"]) == 3
    for mask in target["masks"].numpy()[1:]:
        assert np.array_equal(mask, square)
    polygon_mask = target["masks"].numpy()[0]
    assert polygon_mask[5:15, 10:20].all()  # pycocotools' rasterization, edges included
    assert polygon_mask[:, :9].sum() == 0 and polygon_mask[17:].sum() == 0


@pytest.mark.parametrize(
    ("segmentation", "needle"),
    [
        (None, "no 'segmentation'"),
        ({"size": [30, 40], "counts": "!!"}, "pycocotools string"),
        ({"size": [30, 40], "counts": "0"}, "summing to 30 x 40"),
        ({"size": [40, 30], "counts": [1200]}, "not its image's"),
        ({"size": [30, 40], "counts": [5, -1]}, "run lengths"),
        ([[1, 2, 3]], "x, y pixel pairs"),
        ("polygon", "COCO RLE"),
    ],
)
def test_bad_or_missing_segmentations_are_one_line_errors_naming_the_file(
    tmp_path, segmentation, needle
):
    ann = coco_annotation(1, 1, 1, (10, 5, 10, 10))
    if segmentation is not None:
        ann["segmentation"] = segmentation
    path = write_split(tmp_path, [ann])
    CocoDataset(tmp_path, "s")  # without masks nobody looks
    with pytest.raises(UserError, match=needle) as error:
        CocoDataset(tmp_path, "s", masks=True)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


# --- augmentation and batches ----------------------------------------------------------------


def test_augmentation_moves_masks_with_their_boxes_and_drops_them_together():
    transform = build_transforms("digits", seed=0)
    boxes = np.array([(0, 0, 10, 12), (54, 50, 10, 14), (26, 24, 12, 16)], dtype=np.float32)
    labels = np.array([7, 1, 9])
    masks = np.zeros((3, 64, 64), dtype=np.uint8)
    image = np.zeros((64, 64), dtype=np.uint8)
    for mask, (x, y, w, h) in zip(masks, boxes.astype(int), strict=True):
        mask[y : y + h, x : x + w] = 1
        image[y : y + h, x : x + w] = 255
    dropped = 0
    for _ in range(100):
        out_image, out_boxes, out_labels, out_masks = augment(
            transform, image.copy(), boxes, labels, masks
        )
        assert out_masks.dtype == np.uint8 and out_masks.shape == (len(out_labels), 64, 64)
        assert len(out_boxes) == len(out_labels)
        assert set(out_labels.tolist()) <= {7, 1, 9} and out_image.shape == (64, 64)
        for (x, y, w, h), mask in zip(out_boxes, out_masks, strict=True):
            mx, my, mw, mh = tight_box(mask)  # each box's own mask, moved with it
            assert abs(mx - x) <= 1.5 and abs(my - y) <= 1.5
            assert abs(mx + mw - x - w) <= 1.5 and abs(my + mh - y - h) <= 1.5
        dropped += len(out_labels) < 3
    assert dropped  # the edge boxes were dropped, with their masks, sometimes


def test_augmented_dataset_items_keep_one_mask_per_box(tiny_dataset):
    dataset = CocoDataset(tiny_dataset, "train", build_transforms("digits", seed=1), masks=True)
    for _ in range(3):
        for index in range(len(dataset)):
            image, target = dataset[index]
            masks, boxes = target["masks"], target["boxes"]
            assert masks.shape == (len(boxes), *image.shape[1:]) and masks.dtype == torch.uint8
            for (x1, y1, x2, y2), mask in zip(boxes.tolist(), masks.numpy(), strict=True):
                ys, xs = np.nonzero(mask)
                if len(xs):  # clipped boxes may keep a sliver of ink, or none
                    assert xs.min() >= x1 - 1.5 and xs.max() + 1 <= x2 + 1.5
                    assert ys.min() >= y1 - 1.5 and ys.max() + 1 <= y2 + 1.5


def test_collate_stacks_masks_of_equal_images_and_keeps_unequal_ones_apart(tiny_dataset):
    dataset = CocoDataset(tiny_dataset, "val", masks=True)
    batch = [dataset[i] for i in range(3)]
    _, targets = collate_detection(batch)
    for (_, target), joined in zip(batch, targets, strict=True):
        torch.testing.assert_close(joined["masks"], target["masks"], rtol=0, atol=0)
    storages = {t["masks"].untyped_storage().data_ptr() for t in targets}
    assert len(storages) == 1  # one shared tensor for the batch
    small = (torch.zeros(1, 32, 48), {"boxes": torch.zeros(1, 4), "labels": torch.ones(1).long(),
             "masks": torch.ones(1, 32, 48, dtype=torch.uint8)})  # fmt: skip
    large = (torch.zeros(1, 64, 64), {"boxes": torch.zeros(2, 4), "labels": torch.ones(2).long(),
             "masks": torch.zeros(2, 64, 64, dtype=torch.uint8)})  # fmt: skip
    _, targets = collate_detection([small, large])
    assert targets[0]["masks"].shape == (1, 32, 48) and targets[1]["masks"].shape == (2, 64, 64)
    assert [len(t["boxes"]) for t in targets] == [1, 2]


# --- predictions with segmentations ----------------------------------------------------------


def mask_detector(dataset: CocoDataset, *, miss_every: int = 0, shift_every: int = 0):
    """Records of a "detector" built from the ground truth masks, through ``from_detections``
    (float ``(D, 1, H, W)`` probabilities, as torchvision returns them): every ``miss_every``-th
    box missed, every ``shift_every``-th mask moved by 2 px, scores falling."""
    records, counter = [], 0
    for index in range(len(dataset)):
        _, target = dataset[index]
        kept, masks = [], []
        for row, mask in enumerate(target["masks"]):
            counter += 1
            if miss_every and counter % miss_every == 0:
                continue
            if shift_every and counter % shift_every == 0:
                mask = torch.roll(mask, shifts=2, dims=1)
            kept.append(row)
            masks.append(mask.float()[None] * 0.9)
        detections = {
            "boxes": target["boxes"][kept],
            "scores": torch.linspace(1.0, 0.5, len(kept)),
            "labels": target["labels"][kept],
            "masks": torch.stack(masks) if masks else torch.zeros(0, 1, 64, 64),
        }
        records.append(ImagePrediction.from_detections(target["image_id"], detections))
    return records


def test_predictions_with_segmentations_round_trip_through_the_coco_results_format(tiny_dataset):
    dataset = CocoDataset(tiny_dataset, "test", masks=True)
    records = mask_detector(dataset)
    for record, index in zip(records, range(len(dataset)), strict=True):
        masks = dataset[index][1]["masks"]
        assert len(record.segmentations) == len(record.boxes) == len(masks)
        for segmentation, mask in zip(record.segmentations, masks.numpy(), strict=True):
            assert np.array_equal(decoded(segmentation), mask.astype(bool))  # 0.9 > 0.5
    results = json.loads(json.dumps(to_coco_results(records)))
    assert list(results[0]) == ["image_id", "category_id", "bbox", "score", "segmentation"]
    again = records_from_coco_results(results)
    kept = [r for r in records if len(r.boxes)]
    assert [r.image_id for r in again] == [r.image_id for r in kept]
    for before, after in zip(kept, again, strict=True):
        assert after.segmentations == before.segmentations
        torch.testing.assert_close(after.boxes, before.boxes)
        torch.testing.assert_close(after.labels, before.labels)
    boxes_only = {"boxes": torch.ones(1, 4), "scores": torch.ones(1), "labels": torch.ones(1)}
    plain = ImagePrediction.from_detections(1, boxes_only)
    assert plain.segmentations is None and "segmentation" not in to_coco_results([plain])[0]


def test_uncompressed_rle_results_are_compressed_and_polygons_refused():
    result = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "score": 0.5}
    uncompressed = {"size": [2, 3], "counts": [1, 2, 3]}
    (record,) = records_from_coco_results([result | {"segmentation": uncompressed}])
    mask = decoded(record.segmentations[0])
    assert mask.flatten(order="F").tolist() == [0, 1, 1, 0, 0, 0]
    assert check_rle(record.segmentations[0], "x") == record.segmentations[0]
    segm_only = {k: v for k, v in result.items() if k != "bbox"}  # COCO's own segm results
    (record,) = records_from_coco_results([segm_only | {"segmentation": uncompressed}])
    assert record.boxes.tolist() == [[0.0, 0.0, 2.0, 2.0]]  # the mask's box, xyxy
    with pytest.raises(UserError, match="polygon") as error:
        records_from_coco_results([result | {"segmentation": [[0, 0, 1, 0, 1, 1]]}])
    assert "detection #0" in str(error.value)


@pytest.mark.parametrize("first_has_mask", [True, False])
def test_a_results_file_mixing_masks_and_none_is_one_line_error(first_has_mask):
    result = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "score": 0.5}
    masked = result | {"segmentation": encode(np.ones((1, 4, 4), dtype=bool))[0]}
    results = [masked, result, masked] if first_has_mask else [result, result, masked]
    with pytest.raises(UserError, match="segmentation") as error:
        records_from_coco_results(results)
    message = str(error.value)
    assert "\n" not in message and f"detection #{1 if first_has_mask else 2}" in message


# --- mask AP ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored(tiny_dataset):
    dataset = CocoDataset(tiny_dataset, "test", masks=True)
    records = mask_detector(dataset, miss_every=4, shift_every=3)
    metrics = evaluate_records(dataset.coco, records, image_ids=dataset.image_ids, masks=True)
    return dataset, records, metrics


def test_segm_metrics_equal_pycocotools_on_the_written_results(scored, tmp_path):
    dataset, records, metrics = scored
    assert list(metrics) == [*METRIC_KEYS, *SEGM_KEYS]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(to_coco_results(records)))
    written = json.loads(path.read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(tiny_dataset_file(dataset)))
    segm_only = [{k: v for k, v in r.items() if k != "bbox"} for r in written]  # COCO's segm form
    expected = coco_stats(coco_gt, segm_only, "segm")
    for key, stat in zip(SEGM_KEYS, expected, strict=True):
        if math.isnan(stat):
            assert math.isnan(metrics[key]), key
        else:
            assert metrics[key] == pytest.approx(stat, abs=1e-12), key
    assert 0.0 < metrics["segm_map"] < 1.0  # the misses and shifted masks cost something
    # the three IoU-threshold stats do not depend on the detections' areas: with their bbox too
    with_bbox = coco_stats(coco_gt, written, "segm")
    assert with_bbox[:3] == pytest.approx(expected[:3], abs=1e-12)
    # and the box metrics are what they are without masks
    plain = evaluate_records(dataset.coco, records, image_ids=dataset.image_ids)
    assert list(plain) == list(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert metrics[key] == pytest.approx(plain[key], nan_ok=True), key


def tiny_dataset_file(dataset: CocoDataset) -> Path:
    return dataset.root / "annotations" / f"instances_{dataset.split}.json"


def test_perfect_masks_score_1_and_runs_without_masks_get_none(scored):
    dataset, _, _ = scored
    perfect = mask_detector(dataset)
    boxes_only = [ImagePrediction(r.image_id, r.boxes, r.scores, r.labels) for r in perfect]
    metrics = score_runs(dataset.coco, {"masks": perfect, "boxes": boxes_only},
                         image_ids=dataset.image_ids)  # fmt: skip
    assert metrics["masks"]["segm_map"] == pytest.approx(1.0)
    assert metrics["masks"]["segm_map_50"] == pytest.approx(1.0)
    assert all(metrics["boxes"][key] is None for key in SEGM_KEYS)
    assert metrics["boxes"]["map"] == pytest.approx(metrics["masks"]["map"])
    table = "\n".join(metrics_table(metrics, "boxes", ["masks"]))
    assert "| segm_map |" in table and "| segm_mar_100 |" in table
    text = render_report(runs=metrics, baseline="boxes", compared=["masks"], sources={},
                         data="d", split="test", settings={})  # fmt: skip
    assert "segm_*" in text
    without = score_runs(dataset.coco, {"boxes": boxes_only}, image_ids=dataset.image_ids)
    assert list(without["boxes"]) == list(METRIC_KEYS)  # no masks anywhere: today's keys
    assert "segm" not in "\n".join(metrics_table(without, "boxes", []))
    rpn_only = evaluate_records(dataset.coco, perfect, detections=False, masks=True)
    assert all(math.isnan(rpn_only[key]) for key in SEGM_KEYS)


def test_mask_ap_needs_segmentations_in_the_ground_truth(scored):
    dataset, records, _ = scored
    with contextlib.redirect_stdout(io.StringIO()):
        bare = COCO()
        bare.dataset = json.loads(tiny_dataset_file(dataset).read_text())
        for ann in bare.dataset["annotations"]:
            del ann["segmentation"]
        bare.createIndex()
    with pytest.raises(UserError, match="has no 'segmentation'"):
        evaluate_records(bare, records, image_ids=dataset.image_ids, masks=True)


def test_evaluate_command_scores_segmentation_results(tiny_dataset, tmp_path):
    """``--predictions`` with segmentations beside one without: segm_* for both, null for the
    boxes-only run; a mixed file is one line and exit 2."""
    annotations = split_json(tiny_dataset, "test")["annotations"]
    truth = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
              "score": 1.0, "segmentation": a["segmentation"]} for a in annotations]  # fmt: skip
    boxes = [{k: v for k, v in r.items() if k != "segmentation"} for r in truth]
    (tmp_path / "masks.json").write_text(json.dumps(truth))
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    result = run_cli(
        "-m", "coorddet.evaluate", "--data", str(tiny_dataset), "--split", "test",
        "--out", str(tmp_path / "report"), "--device", "cpu",
        "--predictions", str(tmp_path / "masks.json"), "--name", "masks",
        "--predictions", str(tmp_path / "boxes.json"), "--name", "boxes",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| segm_map |" in result.stdout
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["masks"]["segm_map"] == pytest.approx(1.0)
    assert all(metrics["boxes"][key] is None for key in SEGM_KEYS)
    assert "| segm_map_50 |" in (tmp_path / "report" / "report.md").read_text()
    written = json.loads((tmp_path / "report" / "predictions_masks.json").read_text())
    assert all("segmentation" in r for r in written)

    (tmp_path / "mixed.json").write_text(json.dumps(truth[:2] + boxes[2:]))
    mixed = run_cli(
        "-m", "coorddet.evaluate", "--data", str(tiny_dataset), "--split", "test",
        "--out", str(tmp_path / "mixed"), "--predictions", str(tmp_path / "mixed.json"),
        "--name", "mixed",
    )  # fmt: skip
    assert_user_error(mixed, "mixed.json", "detection #2", "segmentation")
