"""``python -m coorddet.predict``: new images in, COCO results out, scored with pycocotools
against a generated COCO file exactly as ``coorddet.evaluate`` scores the same checkpoint."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_user_error, run_cli
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


@pytest.fixture(scope="module")
def mixed_dataset(tiny_dataset, tmp_path_factory) -> Path:
    """The generated test split as PNG, JPEG and RGB files, two in a subfolder, with its COCO
    file naming them: the same annotations, other files."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "annotations").mkdir()
    (root / "test" / "sub").mkdir(parents=True)
    shutil.copy(tiny_dataset / "dataset.json", root / "dataset.json")
    coco = json.loads((tiny_dataset / "annotations" / "instances_test.json").read_text())
    for index, image in enumerate(sorted(coco["images"], key=lambda image: image["id"])):
        pixels = np.asarray(Image.open(tiny_dataset / "test" / image["file_name"]))
        stem = Path(image["file_name"]).stem
        if index in (2, 3):  # JPEG
            name = f"sub/{stem}.jpg"
            Image.fromarray(pixels).save(root / "test" / name, quality=90)
        elif index in (5, 6):  # RGB: the digits tinted
            name = f"{stem}.png"
            rgb = np.stack([pixels, pixels // 2, (pixels // 4) * 3], axis=2).astype(np.uint8)
            Image.fromarray(rgb, "RGB").save(root / "test" / name)
        else:
            name = f"{stem}.png"
            shutil.copy(tiny_dataset / "test" / image["file_name"], root / "test" / name)
        image["file_name"] = name
    (root / "annotations" / "instances_test.json").write_text(json.dumps(coco))
    return root


def rescore(ground_truth: Path, predictions: Path, images: Path) -> float:
    """pycocotools' bbox AP of ``predictions`` over the images of ``images``."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ground_truth))
        evaluator = COCOeval(coco, coco.loadRes(str(predictions)), "bbox")
        evaluator.params.imgIds = [image["id"] for image in json.loads(images.read_text())]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


@pytest.mark.slow
def test_predictions_rescore_to_evaluates_map(smoke_runs, mixed_dataset, tmp_path):
    checkpoint = str(smoke_runs["coordconv"] / "checkpoints" / "best.ckpt")
    coco_file = mixed_dataset / "annotations" / "instances_test.json"
    report = tmp_path / "report"
    result = run_cli("-m", "coorddet.evaluate", "--data", str(mixed_dataset), "--split", "test",
                     checkpoint, "--out", str(report), "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((report / "metrics.json").read_text())["coordconv"]["map"]

    out = tmp_path / "predicted"
    result = run_cli("-m", "coorddet.predict", checkpoint, str(mixed_dataset / "test"),
                     "--coco", str(coco_file), "--out", str(out), "--draw")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "img/s" in result.stdout and "8 images" in result.stdout
    assert rescore(coco_file, out / "predictions.json", out / "images.json") == evaluated
    # the very detections coorddet.evaluate wrote, with the checkpoint's category ids
    ours = json.loads((out / "predictions.json").read_text())
    theirs = json.loads((report / "predictions_coordconv.json").read_text())
    key = lambda r: (r["image_id"], -r["score"], r["category_id"], r["bbox"])  # noqa: E731
    assert sorted(ours, key=key) == sorted(theirs, key=key)
    listed = json.loads((out / "images.json").read_text())
    expected = json.loads(coco_file.read_text())["images"]
    assert sorted(listed, key=lambda i: i["id"]) == sorted(
        [{k: image[k] for k in ("id", "file_name", "width", "height")} for image in expected],
        key=lambda i: i["id"],
    )
    for image in listed:  # one drawing per image, at the image's size
        drawn = out / "drawn" / Path(image["file_name"]).with_suffix(".png")
        with Image.open(drawn) as picture:
            assert picture.size == (image["width"], image["height"])
            assert picture.mode == "RGB"


def test_unreadable_files_are_skipped_and_counted(smoke_runs, tiny_dataset, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(tiny_dataset / "test", folder)
    (folder / "notes.png").write_text("not an image")
    whole = (folder / "000001.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "out"
    checkpoint = str(smoke_runs["baseline"] / "checkpoints" / "best.ckpt")
    result = run_cli("-m", "coorddet.predict", checkpoint, str(folder), "--out", str(out),
                     "--quiet", "--num-workers", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 2 and "Traceback" not in result.stderr
    assert any("notes.png" in line for line in skipped)
    assert any("truncated.png" in line for line in skipped)
    assert "2 file(s) skipped" in result.stdout
    listed = json.loads((out / "images.json").read_text())
    assert [image["file_name"] for image in listed] == sorted(
        p.name for p in (tiny_dataset / "test").glob("*.png")
    )
    assert [image["id"] for image in listed] == list(range(1, len(listed) + 1))
    ids = {r["image_id"] for r in json.loads((out / "predictions.json").read_text())}
    assert ids <= {image["id"] for image in listed}


def test_refusals_are_one_line(smoke_runs, tiny_dataset, tmp_path):
    checkpoint = str(smoke_runs["baseline"] / "checkpoints" / "best.ckpt")
    images = str(tiny_dataset / "test")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    result = run_cli("-m", "coorddet.predict", checkpoint, images, "--out", str(taken))
    assert_user_error(result, "--overwrite")
    assert (taken / "keep.txt").read_text() == "mine"
    result = run_cli("-m", "coorddet.predict", checkpoint, str(tmp_path / "nothing"),
                     "--out", str(tmp_path / "o1"))  # fmt: skip
    assert_user_error(result, "no such file or folder")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_text("no")
    result = run_cli("-m", "coorddet.predict", checkpoint, str(junk), "--out", str(tmp_path / "o2"))
    assert result.returncode == 2 and "none of the 1 input files" in result.stderr
    assert not (tmp_path / "o2").exists()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.png", "width": 64,
                                             "height": 64}]}))  # fmt: skip
    result = run_cli("-m", "coorddet.predict", checkpoint, images, "--coco", str(other),
                     "--out", str(tmp_path / "o3"))  # fmt: skip
    assert_user_error(result, "does not list", "000000.png")
