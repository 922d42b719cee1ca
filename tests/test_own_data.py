"""A user's own COCO dataset: RGB JPEGs of different sizes, category ids 3/7/11/19/42, a crowd
region, an image without annotations, file names in a sub-folder. The suite writes it itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from coorddet.checkpoint import load_checkpoint
from coorddet.data import CocoDataset
from tests.conftest import assert_user_error, run_cli
from tests.test_evaluate import evaluate_cli, rescore

CATEGORIES = [(3, "cat"), (7, "dog"), (11, "car"), (19, "bus"), (42, "kite")]
COLOURS = {
    3: (230, 40, 40),
    7: (40, 220, 60),
    11: (50, 80, 240),
    19: (240, 220, 30),
    42: (200, 60, 220),
}
SPLITS = {"train": 12, "val": 4, "test": 4}


def write_photo_dataset(root: Path, *, seed: int = 0) -> Path:
    """Coloured rectangles on dark noise, 96-200 px a side, as JPEGs in ``{split}/photos/``.

    Image 0 of each split has no annotations; image 1 also holds a crowd region."""
    rng = np.random.default_rng(seed)
    ann_id = 0
    for split, count in SPLITS.items():
        images, annotations = [], []
        for index in range(count):
            width, height = (int(v) for v in rng.integers(96, 201, size=2))
            pixels = rng.integers(0, 50, size=(height, width, 3), dtype=np.uint8)
            for _ in range(0 if index == 0 else int(rng.integers(1, 4))):
                category = int(rng.choice([c for c, _ in CATEGORIES]))
                w, h = (int(v) for v in rng.integers(20, 41, size=2))
                x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
                pixels[y : y + h, x : x + w] = COLOURS[category]
                ann_id += 1
                annotations.append({"id": ann_id, "image_id": index + 1, "category_id": category,
                                    "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})  # fmt: skip
            if index == 1:
                ann_id += 1
                annotations.append({"id": ann_id, "image_id": 2, "category_id": 42,
                                    "bbox": [0, 0, 30, 30], "area": 900, "iscrowd": 1})  # fmt: skip
            name = f"photos/{split}_{index:03d}.jpg"
            (root / split / "photos").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, "RGB").save(root / split / name, quality=95)
            images.append({"id": index + 1, "file_name": name, "width": width, "height": height})
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        document = {"images": images, "annotations": annotations,
                    "categories": [{"id": i, "name": n} for i, n in CATEGORIES]}  # fmt: skip
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(document))
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_photo_dataset(tmp_path_factory.mktemp("own") / "photos")


def test_photos_stay_colour_with_the_datasets_own_ids(photos):
    memory, lazy = CocoDataset(photos, "train"), CocoDataset(photos, "train", decode="lazy")
    assert memory.in_memory and not lazy.in_memory
    assert memory.channels == lazy.channels == 3
    assert memory.category_ids == [3, 7, 11, 19, 42] and memory.num_classes == 6
    assert len(memory.image_sizes) > 1
    for index in range(len(memory)):
        (image, target), (same, same_target) = memory[index], lazy[index]
        torch.testing.assert_close(image, same, rtol=0, atol=0)
        for key in target:
            assert torch.equal(target[key], same_target[key])
        file = photos / "train" / memory.coco.imgs[memory.image_ids[index]]["file_name"]
        with Image.open(file) as im:
            expected = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) / 255.0
        assert image.shape == (3, im.height, im.width) and image.is_contiguous()
        torch.testing.assert_close(image, expected, rtol=0, atol=0)
    assert len(memory[0][1]["boxes"]) == 0  # the image without annotations
    assert len(memory[1][1]["boxes"]) == len(memory.coco.imgToAnns[2]) - 1  # crowd left out


@pytest.fixture(scope="module")
def photo_runs(tmp_path_factory, photos) -> dict[tuple[str, str], Path]:
    """Both arms of mnist-small and mobilenet-v3-fpn, a few steps each, on the photos."""
    runs = tmp_path_factory.mktemp("photo-runs")
    out = {}
    for backbone in ("mnist-small", "mobilenet-v3-fpn"):
        for arm in ("baseline", "coordconv"):
            run = runs / f"{backbone}-{arm}"
            result = run_cli(
                "train.py", "--config", "configs/smoke.yaml", "--data", str(photos),
                "--out", str(run), "--backbone", backbone, f"--{'no-' * (arm == 'baseline')}coordconv",
                "--batch-size", "2", "--limit-train-batches", "2", "--limit-val-batches", "1",
            )  # fmt: skip
            assert result.returncode == 0, result.stderr[-3000:]
            out[backbone, arm] = run
            out[backbone, arm, "stdout"] = result.stdout
    return out


@pytest.mark.parametrize("backbone", ["mnist-small", "mobilenet-v3-fpn"])
def test_both_arms_train_on_rgb_photos_and_the_first_conv_sees_3_channels(photo_runs, backbone):
    for arm in ("baseline", "coordconv"):
        run = photo_runs[backbone, arm]
        config = yaml.safe_load((run / "config.yaml").read_text())["model"]
        largest = (200, 200) if backbone == "mnist-small" else (800, 1333)
        assert config["image_channels"] == 3 and config["num_classes"] == 6
        assert config["min_size"] <= largest[0] and config["max_size"] <= largest[1]
        if backbone == "mobilenet-v3-fpn":  # images of several sizes: torchvision's default
            assert (config["min_size"], config["max_size"]) == (800, 1333)
        assert (
            f"colour): model.image_channels 3, model.min_size {config['min_size']}"
            in (photo_runs[backbone, arm, "stdout"])
        )
        checkpoint = load_checkpoint(run / "checkpoints" / "best.ckpt")
        assert checkpoint.category_ids == [3, 7, 11, 19, 42]
        model = checkpoint.build_model()
        first = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
        assert first.in_channels == 3 and first.weight.shape[1] == 3, first  # + coordinates
        assert type(first).__name__ == ("CoordConv2d" if arm == "coordconv" else "Conv2d")
        images = [torch.rand(3, 120, 150)]
        with torch.no_grad():
            assert model(images)[0]["boxes"].shape[-1] == 4


def test_evaluation_writes_the_datasets_own_ids_and_rescores_identically(
    photo_runs, photos, tmp_path
):
    checkpoints = [photo_runs["mnist-small", arm] / "checkpoints" / "best.ckpt"
                   for arm in ("baseline", "coordconv")]  # fmt: skip
    result = evaluate_cli("--data", photos, "--out", tmp_path, "--quiet", *checkpoints)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for run in ("baseline", "coordconv"):
        results = json.loads((tmp_path / f"predictions_{run}.json").read_text())
        assert results and {r["category_id"] for r in results} <= {c for c, _ in CATEGORIES}
        assert metrics[run]["map"] == pytest.approx(rescore(photos, results)[0], abs=1e-12)


def test_a_broken_jpeg_found_by_a_worker_is_one_line(photos, tmp_path):
    data = tmp_path / "photos"
    write_photo_dataset(data)
    document = json.loads((data / "annotations" / "instances_train.json").read_text())
    broken = data / "train" / document["images"][5]["file_name"]
    content = broken.read_bytes()
    broken.write_bytes(content[: len(content) // 2])  # the header survives, the pixels do not
    config = tmp_path / "lazy.yaml"
    smoke = yaml.safe_load(Path("configs/smoke.yaml").read_text())
    smoke["data"].update(decode="lazy", num_workers=1, batch_size=2)
    smoke["trainer"].update(limit_train_batches=1.0)
    config.write_text(yaml.safe_dump(smoke))
    result = run_cli("train.py", "--config", str(config), "--data", str(data),
                     "--out", str(tmp_path / "run"), "--quiet")  # fmt: skip
    assert_user_error(result, str(broken), "not a readable image")
    # Decoded when the split is opened (memory), the same file fails before training starts.
    result = run_cli("train.py", "--config", "configs/smoke.yaml", "--data", str(data),
                     "--out", str(tmp_path / "run2"), "--quiet")  # fmt: skip
    assert_user_error(result, str(broken), "not a readable image")


def test_gray_data_trains_the_same_decoded_lazily(tiny_dataset, smoke_runs, tmp_path):
    config = tmp_path / "lazy.yaml"
    smoke = yaml.safe_load(Path("configs/smoke.yaml").read_text())
    smoke["data"].update(decode="lazy")
    config.write_text(yaml.safe_dump(smoke))
    run = tmp_path / "run"
    result = run_cli("train.py", "--config", str(config), "--data", str(tiny_dataset),
                     "--out", str(run), "--no-coordconv", "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics, memory = (json.loads((r / "metrics.json").read_text())
                       for r in (run, smoke_runs["baseline"]))  # fmt: skip
    timing = {"train_seconds", "train_img_per_s"}
    assert {k: v for k, v in metrics.items() if k not in timing} == {
        k: v for k, v in memory.items() if k not in timing
    }
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["image_channels"] == 1
