"""COCO reading, checks and loaders, on tiny real datasets written to disk here.

The fixture draws white rectangles ("digits") into 64x64 grayscale PNGs and writes the COCO
JSON the way ``data_gen`` does (the lead may switch it to ``data_gen`` itself later).
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import coco_annotation
from PIL import Image, ImageDraw

from coorddet.data import CocoDataset, collate_detection
from coorddet.datamodule import CocoDataModule
from coorddet.dataset_layout import annotation_file
from coorddet.errors import UserError
from coorddet.transforms import build_transforms

SIZE = 64
Box = tuple[int, float, float, float, float]  # (category_id, x, y, w, h), COCO pixels

TRAIN: list[list[Box]] = [
    [(1, 4, 4, 10, 14), (9, 30, 20, 12, 16)],
    [(4, 50, 48, 14, 16)],  # touches the right and bottom edges
    [],  # an image without digits
    [(10, 0, 0, 9, 12), (6, 20, 40, 11, 13), (3, 44, 6, 13, 15)],
    [(2, 40.5, 10.25, 8.5, 12.75)],  # float box
    [(8, 12, 30, 10, 14), (5, 52.5, 0, 11.5, 9)],  # float box touching the right edge
]
VAL: list[list[Box]] = [
    [(5, 10, 10, 12, 12)],
    [(8, 33, 28, 10, 16), (7, 5, 40, 13, 14)],
]


def write_split(root: Path, split: str, canvases: list[list[Box]], *, crowd_on: int = -1) -> None:
    """Write ``root/split/*.png`` and ``root/annotations/instances_{split}.json``."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for index, boxes in enumerate(canvases):
        image_id = index + 1
        canvas = Image.new("L", (SIZE, SIZE), 0)
        draw = ImageDraw.Draw(canvas)
        for category_id, x, y, w, h in boxes:
            draw.rectangle([int(x), int(y), int(np.ceil(x + w)) - 1, int(np.ceil(y + h)) - 1], 255)
            annotations.append(
                coco_annotation(len(annotations) + 1, image_id, category_id, (x, y, w, h))
            )
        if index == crowd_on:
            bbox = [20, 20, 20, 20]
            crowd = {"id": len(annotations) + 1, "image_id": image_id, "category_id": 1}
            annotations.append(crowd | {"bbox": bbox, "area": 400, "iscrowd": 1})
        canvas.save(root / split / f"{index:06d}.png")
        images.append(
            {"id": image_id, "file_name": f"{index:06d}.png", "width": SIZE, "height": SIZE}
        )
    categories = [{"id": digit + 1, "name": str(digit)} for digit in range(10)]
    data = {"info": {}, "images": images, "annotations": annotations, "categories": categories}
    annotation_file(root, split).write_text(json.dumps(data))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mnist-det")
    write_split(root, "train", TRAIN, crowd_on=0)
    write_split(root, "val", VAL)
    return root


def test_boxes_round_trip_from_xywh_to_xyxy(root):
    dataset = CocoDataset(root, "train")
    assert len(dataset) == len(TRAIN)
    assert dataset.image_ids == list(range(1, len(TRAIN) + 1))
    for index, boxes in enumerate(TRAIN):
        _, target = dataset[index]
        expected = torch.tensor(
            [[x, y, x + w, y + h] for _, x, y, w, h in boxes], dtype=torch.float32
        ).reshape(-1, 4)
        torch.testing.assert_close(target["boxes"], expected, rtol=0, atol=0)
        assert target["labels"].tolist() == [c for c, *_ in boxes]  # crowd annotation left out
        torch.testing.assert_close(target["area"], expected[:, 2:].sub(expected[:, :2]).prod(1))
        assert target["image_id"].dtype == torch.int64 and target["image_id"].ndim == 0
        assert target["image_id"].item() == index + 1
        assert target["iscrowd"].tolist() == [0] * len(boxes)
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64


def test_crowd_annotations_stay_in_coco_but_not_in_targets(root):
    dataset = CocoDataset(root, "train")
    crowd = [a for a in dataset.coco.anns.values() if a["iscrowd"]]
    assert [a["image_id"] for a in crowd] == [1]
    assert len(dataset[0][1]["labels"]) == len(TRAIN[0])


def test_images_are_float_in_unit_range_and_match_the_files(root):
    dataset = CocoDataset(root, "val")
    for index in range(len(dataset)):
        image, _ = dataset[index]
        assert image.shape == (1, SIZE, SIZE) and image.dtype == torch.float32
        on_disk = np.asarray(Image.open(root / "val" / f"{index:06d}.png"), dtype=np.float32) / 255
        torch.testing.assert_close(image[0], torch.from_numpy(on_disk), rtol=0, atol=0)
    assert dataset[0][0][0, 15, 15] == 1.0 and dataset[0][0][0, 0, 0] == 0.0


def test_metadata_and_silence(root, capsys):
    dataset = CocoDataset(root, "val")
    assert capsys.readouterr().out == ""  # pycocotools' progress prints are swallowed
    assert dataset.num_classes == 11
    assert [c["id"] for c in dataset.categories] == list(range(1, 11))
    assert sorted(dataset.coco.getImgIds()) == dataset.image_ids


def test_empty_image_gives_empty_targets(root):
    _, target = CocoDataset(root, "train")[2]
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64


def test_augmentation_dropping_every_box_gives_empty_targets(tmp_path):
    """The real policy, on a canvas whose one small box sits in the corner: some draws drop it."""
    write_split(tmp_path, "train", [[(8, 0, 0, 5, 5)]])
    dataset = CocoDataset(tmp_path, "train", build_transforms("digits", seed=0))
    targets = [dataset[0][1] for _ in range(100)]
    empty = [t for t in targets if len(t["labels"]) == 0]
    assert empty, "the corner box was never dropped"
    assert empty[0]["boxes"].shape == (0, 4) and empty[0]["boxes"].dtype == torch.float32
    assert empty[0]["labels"].dtype == torch.int64 and empty[0]["area"].shape == (0,)
    assert empty[0]["iscrowd"].shape == (0,)
    assert all(t["labels"].tolist() in ([], [8]) for t in targets)


def test_augmented_items_keep_labels_and_boxes_inside(root):
    dataset = CocoDataset(root, "train", build_transforms("digits", seed=1))
    for _ in range(10):
        for index, boxes in enumerate(TRAIN):
            image, target = dataset[index]
            assert image.shape == (1, SIZE, SIZE) and 0 <= image.min() <= image.max() <= 1
            remaining = iter([c for c, *_ in boxes])
            assert all(label in remaining for label in target["labels"].tolist())
            xyxy = target["boxes"]
            assert (xyxy >= 0).all() and (xyxy <= SIZE).all()
            assert (xyxy[:, 2:] > xyxy[:, :2]).all()
    plain = CocoDataset(root, "train", None)
    dataset.transforms = None  # the decoded pixels were not changed by augmenting them
    for index in range(len(TRAIN)):
        torch.testing.assert_close(dataset[index][0], plain[index][0], rtol=0, atol=0)


def test_dataset_pickles_for_worker_processes(root):
    """Spawned workers (macOS, Windows, ddp_spawn) receive the dataset pickled."""
    dataset = CocoDataset(root, "train", build_transforms("digits"))
    clone = pickle.loads(pickle.dumps(dataset))
    dataset.reseed(5)
    clone.reseed(5)
    for index in (0, -1):
        torch.testing.assert_close(clone[index], dataset[index])
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_collate_keeps_images_and_targets_apart(root):
    dataset = CocoDataset(root, "train")
    batch = [dataset[i] for i in (0, 2, 3)]  # 2, 0 and 3 boxes
    images, targets = collate_detection(batch)
    assert len(images) == len(targets) == 3
    for (image, target), image_out, target_out in zip(batch, images, targets, strict=True):
        torch.testing.assert_close(image_out, image, rtol=0, atol=0)
        assert set(target_out) == set(target)
        for key in target:
            torch.testing.assert_close(target_out[key], target[key], rtol=0, atol=0)


def test_collate_accepts_images_of_different_sizes():
    def item(height, width, boxes):
        target = {
            "boxes": torch.zeros((boxes, 4)),
            "labels": torch.ones(boxes, dtype=torch.int64),
            "image_id": torch.tensor(height),
        }
        return torch.rand(1, height, width), target

    batch = [item(32, 48, 1), item(64, 64, 0)]
    images, targets = collate_detection(batch)
    assert [tuple(i.shape) for i in images] == [(1, 32, 48), (1, 64, 64)]
    assert [len(t["boxes"]) for t in targets] == [1, 0]
    assert [t["image_id"].item() for t in targets] == [32, 64]


# --- bad inputs: each raises one UserError line naming the file and the problem -------------


def edit_json(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        path = annotation_file(root, "val")
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    return apply


def set_bbox(bbox):
    return edit_json(lambda d: d["annotations"][0].update(bbox=bbox))


def set_image(**fields):
    return edit_json(lambda d: d["images"][0].update(fields))


def truncate_png(root: Path) -> None:
    png = root / "val" / "000000.png"
    png.write_bytes(png.read_bytes()[:60])


BAD_INPUTS = {
    "json missing": (
        lambda r: annotation_file(r, "val").unlink(),
        "json",
        "python -m data_gen --out",
    ),
    "not json": (
        lambda r: annotation_file(r, "val").write_text("{images: ["),
        "json",
        "not valid JSON",
    ),
    "json not an object": (
        lambda r: annotation_file(r, "val").write_text("[]"),
        "json",
        "JSON object",
    ),
    "no images": (edit_json(lambda d: d.pop("images")), "json", "'images'"),
    "no annotations": (edit_json(lambda d: d.pop("annotations")), "json", "'annotations'"),
    "no categories": (edit_json(lambda d: d.pop("categories")), "json", "'categories'"),
    "empty split": (
        edit_json(lambda d: d.update(images=[], annotations=[])),
        "json",
        "empty split",
    ),
    "negative width": (set_bbox([10, 10, -3, 12]), "json", "annotation id 1"),
    "zero height": (set_bbox([10, 10, 12, 0]), "json", "zero or negative"),
    "box past right": (set_bbox([60, 10, 12, 12]), "json", "outside"),
    "box past bottom": (set_bbox([10, 60.5, 12, 4]), "json", "outside"),
    "negative x": (set_bbox([-2, 10, 12, 12]), "json", "outside"),
    "bbox not 4 numbers": (set_bbox([10, 10, 12]), "json", "4 numbers"),
    "bbox nan": (set_bbox([10, 10, float("nan"), 12]), "json", "4 numbers"),
    "unknown image_id": (
        edit_json(lambda d: d["annotations"][0].update(image_id=999)),
        "json",
        "image_id 999",
    ),
    "unknown category_id": (
        edit_json(lambda d: d["annotations"][0].update(category_id=42)),
        "json",
        "category_id 42",
    ),
    "category id 0": (
        edit_json(lambda d: d["categories"][0].update(id=0)),
        "json",
        "category id 0",
    ),
    "category id string": (
        edit_json(lambda d: d["categories"][0].update(id="1")),
        "json",
        "integer 'id'",
    ),
    "duplicate image id": (
        edit_json(lambda d: d["images"][1].update(id=1)),
        "json",
        "id 1 twice",
    ),
    "file_name ../": (set_image(file_name="../x.png"), "json", "'../x.png'"),
    "file_name absolute": (set_image(file_name="/etc/passwd"), "json", "'/etc/passwd'"),
    "file_name sneaky": (set_image(file_name="a/../../x.png"), "json", "file_name"),
    "file_name windows": (set_image(file_name="C:\\x.png"), "json", "file_name"),
    "image missing": (lambda r: (r / "val" / "000000.png").unlink(), "000000.png", "missing"),
    "image truncated": (truncate_png, "000000.png", "not a readable image"),
    "not an image": (
        lambda r: (r / "val" / "000000.png").write_text("hello"),
        "000000.png",
        "not a readable image",
    ),
    "size mismatch": (set_image(width=65), "000000.png", "64x64 but"),
    "image folder missing": (lambda r: shutil.rmtree(r / "val"), "val", "image folder"),
}


@pytest.mark.robustness
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_one_clear_line(root, tmp_path, case):
    break_it, names, problem = BAD_INPUTS[case]
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    break_it(copy)
    with pytest.raises(UserError) as caught:
        CocoDataset(copy, "val")
    message = str(caught.value)
    assert "\n" not in message
    assert problem in message
    assert names in message and str(copy) in message  # names the file


def test_missing_dataset_directory_names_the_generator(tmp_path):
    with pytest.raises(UserError, match=r"does not exist.*python -m data_gen --out"):
        CocoDataset(tmp_path / "nowhere", "train")


def test_edge_touching_float_boxes_are_accepted(root):
    # TRAIN[5] has a float box ending exactly at x = 64
    _, target = CocoDataset(root, "train")[5]
    assert target["boxes"][1, 2].item() == SIZE


# --- the DataModule ----------------------------------------------------------------------------


def test_datamodule_batches(root):
    module = CocoDataModule(str(root), batch_size=4)
    module.setup("fit")
    train, val = module.train_dataset, module.val_dataset
    module.setup("fit")  # opened once
    assert module.train_dataset is train and module.val_dataset is val
    assert train.transforms is not None and val.transforms is None

    images, targets = next(iter(module.train_dataloader()))
    assert len(images) == len(targets) == 4
    assert all(i.shape == (1, SIZE, SIZE) and i.dtype == torch.float32 for i in images)
    assert all(set(t) == {"boxes", "labels", "image_id", "area", "iscrowd"} for t in targets)
    assert sum(len(b[0]) for b in module.train_dataloader()) == len(TRAIN)  # drop_last=False

    val_ids = [t["image_id"].item() for _, ts in module.val_dataloader() for t in ts]
    assert val_ids == val.image_ids  # not shuffled


def test_datamodule_without_augmentation(root):
    module = CocoDataModule(str(root), augment=False)
    module.setup("validate")
    assert module.train_dataset is None  # validate needs only val
    module.setup("fit")
    assert module.train_dataset.transforms is None


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"augment_policy": "flips"}, "augment_policy"),
    ],
)
def test_datamodule_rejects_bad_settings(kwargs, field):
    with pytest.raises(UserError, match=field):
        CocoDataModule("data", **kwargs)


def test_datamodule_missing_dataset_is_a_user_error(tmp_path):
    module = CocoDataModule(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="python -m data_gen"):
        module.setup("fit")


def epoch_images(module: CocoDataModule) -> list[torch.Tensor]:
    return [image for images, _ in module.train_dataloader() for image in images]


def test_two_workers_are_reproducible_and_augment_differently(tmp_path):
    """All canvases identical: equal outputs would mean workers share one random stream."""
    write_split(tmp_path, "train", [[(3, 20, 20, 12, 14)]] * 6)
    write_split(tmp_path, "val", VAL)

    def run_epochs():
        torch.manual_seed(0)
        module = CocoDataModule(str(tmp_path), batch_size=1, num_workers=2)
        module.setup("fit")
        loader = module.train_dataloader()
        first = [images[0] for images, _ in loader]
        second = [images[0] for images, _ in loader]  # persistent workers, streams continue
        return first, second

    first, second = run_epochs()
    assert len(first) == 6
    assert not torch.equal(first[0], first[1])  # worker 0 vs worker 1, same source image
    assert any(not torch.equal(a, b) for a, b in zip(first, second, strict=True))
    again, _ = run_epochs()
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_main_process_loading_is_reproducible_under_torch_seed(root):
    def one_epoch(seed):
        torch.manual_seed(seed)
        module = CocoDataModule(str(root), batch_size=2)
        module.setup("fit")
        return [t["boxes"] for _, ts in module.train_dataloader() for t in ts]

    for a, b in zip(one_epoch(0), one_epoch(0), strict=True):
        torch.testing.assert_close(a, b)
    assert any(
        a.shape != b.shape or not torch.equal(a, b)
        for a, b in zip(one_epoch(0), one_epoch(1), strict=True)
    )


def remap_category_ids(root: Path, ids: list[int], splits=("train", "val", "test")) -> None:
    """Give ``root``'s categories 1..K the ids ``ids`` (in the same order), in every split."""
    for split in splits:
        path = annotation_file(root, split)
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        new = dict(zip(range(1, len(ids) + 1), ids, strict=True))
        for category in data["categories"]:
            category["id"] = new[category["id"]]
        for annotation in data["annotations"]:
            annotation["category_id"] = new[annotation["category_id"]]
        path.write_text(json.dumps(data))


def test_non_contiguous_category_ids_become_contiguous_labels(root, tmp_path):
    shutil.copytree(root, tmp_path / "data")
    ids = [3, 7, 11, 19, 42, 50, 61, 70, 85, 90]
    remap_category_ids(tmp_path / "data", ids)
    original, remapped = CocoDataset(root, "train"), CocoDataset(tmp_path / "data", "train")
    assert remapped.category_ids == ids and remapped.num_classes == 11
    for index in range(len(original)):  # the same labels 1..10 as the ids 1..10 gave
        assert torch.equal(original[index][1]["labels"], remapped[index][1]["labels"])
    few = tmp_path / "few"
    shutil.copytree(root, few)
    data = json.loads(annotation_file(few, "val").read_text())
    data["categories"] = data["categories"][:3]
    kept = {c["id"] for c in data["categories"]}
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] in kept]
    annotation_file(few, "val").write_text(json.dumps(data))
    assert CocoDataset(few, "val").num_classes == 4  # three categories + the background
