"""``python -m data_gen`` end to end: COCO validity, tight boxes, determinism, pools,
quadrant split, bad input, refusing to overwrite, and SIGKILL safety."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_gen import GenerationSummary, GeneratorConfig, UserError, generate
from data_gen.sources import load_bundled

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--train", "20", "--val", "5", "--test", "5"]
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, "COORDDET_CACHE": str(tmp_path_factory.mktemp("cache"))}


def run(env, *args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "data_gen", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def load_split(out: Path, split: str):
    doc = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
    images = {
        img["id"]: np.asarray(Image.open(out / split / img["file_name"])) for img in doc["images"]
    }
    return doc, images


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("gen") / "ds"
    result = run(env, "--out", out, *TINY, "--workers", "2", "--preview", "4")
    assert result.returncode == 0, result.stderr
    assert "canvases/s" in result.stdout
    return out


def test_layout_is_the_pinned_one(dataset):
    assert sorted(p.name for p in dataset.iterdir()) == [
        "annotations",
        "dataset.json",
        "preview.png",
        "test",
        "train",
        "val",
    ]
    for split, count in zip(SPLITS, (20, 5, 5), strict=True):
        names = sorted(p.name for p in (dataset / split).iterdir())
        assert names == [f"{i:06d}.png" for i in range(count)]
        with Image.open(dataset / split / names[0]) as image:
            assert image.mode == "L" and image.size == (64, 64) and image.format == "PNG"
    with Image.open(dataset / "preview.png") as preview:
        assert preview.width > 4 * 64  # upscaled grid


@pytest.mark.parametrize("split", SPLITS)
def test_pycocotools_loads_each_split_and_ground_truth_scores_ap_1(dataset, split):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(dataset / "annotations" / f"instances_{split}.json"))
    assert len(gt.getImgIds()) == {"train": 20, "val": 5, "test": 5}[split]
    assert sorted(gt.getCatIds()) == list(range(1, 11))
    anns = gt.loadAnns(gt.getAnnIds())
    assert anns, "tiny split without boxes"
    detections = gt.loadRes([{**a, "score": 1.0} for a in anns])
    evaluator = COCOeval(gt, detections, iouType="bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)  # AP@[.5:.95]
    assert evaluator.stats[1] == pytest.approx(1.0)  # AP@.5


@pytest.mark.parametrize("split", SPLITS)
def test_boxes_touch_ink_on_every_edge_stay_inside_and_cover_all_ink(dataset, split):
    doc, images = load_split(dataset, split)
    covered = {image_id: np.zeros((64, 64), dtype=bool) for image_id in images}
    for ann in doc["annotations"]:
        x, y, w, h = ann["bbox"]
        assert all(isinstance(v, int) for v in (x, y, w, h)) and w >= 1 and h >= 1
        assert x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
        assert ann["area"] == w * h and ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= 10
        ink = images[ann["image_id"]][y : y + h, x : x + w] > 0
        assert ink[0].any() and ink[-1].any() and ink[:, 0].any() and ink[:, -1].any()
        covered[ann["image_id"]][y : y + h, x : x + w] = True
    for image_id, image in images.items():
        assert not (image[~covered[image_id]] > 0).any(), "unannotated ink"


def test_dataset_json_records_parameters_counts_and_disjoint_pools(dataset, env, monkeypatch):
    meta = json.loads((dataset / "dataset.json").read_text())
    params = meta["parameters"]
    assert params["canvas_size"] == 64 and params["digits_per_image"] == [5, 5]
    assert params["digit_size"] == [15, 25] and params["crop_from"] == 120
    assert params["max_iou"] == 1.0 and params["min_visible"] == 0.25 and params["seed"] == 0
    assert meta["source"]["name"] == "bundled" and meta["source"]["version"]
    assert meta["generator_version"]
    assert "date" not in json.dumps(meta).lower() and "time" not in json.dumps(meta).lower()
    for split, count in zip(SPLITS, (20, 5, 5), strict=True):
        doc = json.loads((dataset / "annotations" / f"instances_{split}.json").read_text())
        assert meta["counts"][split] == {"images": count, "annotations": len(doc["annotations"])}
    used = meta["source_indices"]
    for split in SPLITS:
        assert used[split] == sorted(set(used[split])) and used[split]
    assert not set(used["train"] + used["val"]) & set(used["test"])
    monkeypatch.setenv("COORDDET_CACHE", env["COORDDET_CACHE"])
    heldout = set(load_bundled().test_pool.tolist())
    assert set(used["test"]) <= heldout and not set(used["train"] + used["val"]) & heldout


def test_same_arguments_give_identical_files_whatever_the_workers(dataset, env, tmp_path):
    again = tmp_path / "again"
    result = run(env, "--out", again, *TINY, "--workers", "1", "--preview", "4", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    assert tree_hashes(again) == tree_hashes(dataset)
    other_seed = tmp_path / "seed1"
    assert run(env, "--out", other_seed, *TINY, "--seed", "1").returncode == 0
    assert tree_hashes(other_seed)["train/000000.png"] != tree_hashes(dataset)["train/000000.png"]


def test_quadrant_split_keeps_test_centres_in_the_heldout_quadrant(env, tmp_path):
    out = tmp_path / "quad"
    result = run(env, "--out", out, *TINY, "--split-mode", "quadrant")
    assert result.returncode == 0, result.stderr
    for split in SPLITS:
        doc = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
        assert doc["annotations"]
        for ann in doc["annotations"]:
            x, y, w, h = ann["bbox"]
            in_heldout = x + w / 2 >= 32 and y + h / 2 >= 32
            assert in_heldout == (split == "test"), (split, ann["bbox"])


BAD_INPUTS = {
    "negative count": (["--train", "-1"], "--train"),
    "count not a number": (["--val", "abc"], "--val"),
    "max-iou above 1": (["--max-iou", "1.5"], "--max-iou"),
    "max-iou nan": (["--max-iou", "nan"], "--max-iou"),
    "min-visible negative": (["--min-visible", "-0.1"], "--min-visible"),
    "reversed size range": (["--digit-size", "25-15"], "--digit-size"),
    "zero digit size": (["--digit-size", "0-5"], "--digit-size"),
    "size not a range": (["--digit-size", "big"], "--digit-size"),
    "reversed digit count": (["--digits-per-image", "7-3"], "--digits-per-image"),
    "zero digits": (["--digits-per-image", "0"], "--digits-per-image"),
    "digit larger than canvas": (
        ["--canvas-size", "32", "--crop-from", "0", "--digit-size", "40"],
        "--digit-size",
    ),
    "field smaller than canvas": (["--crop-from", "50"], "--crop-from"),
    "zero canvas": (["--canvas-size", "0"], "--canvas-size"),
    "unknown source": (["--source", "imagenet"], "--source"),
    "unknown split mode": (["--split-mode", "diagonal"], "--split-mode"),
    "mnist without root": (["--source", "mnist"], "--mnist-root"),
    "mnist files missing": (["--source", "mnist", "--mnist-root", "{tmp}/nowhere"], "--download"),
    "root without mnist": (["--mnist-root", "{tmp}"], "--mnist-root"),
    "digits do not fit": (
        [
            "--canvas-size",
            "32",
            "--crop-from",
            "0",
            "--digit-size",
            "20",
            "--max-iou",
            "0",
            "--digits-per-image",
            "6",
        ],
        "--max-iou",
    ),
    "zero workers": (["--workers", "0"], "--workers"),
    "negative seed": (["--seed", "-3"], "--seed"),
    "preview beyond train": (["--preview", "50"], "--preview"),
    "nothing to generate": (["--train", "0", "--val", "0", "--test", "0"], "--train"),
    "unknown flag": (["--bogus"], "--bogus"),
    "out is a file": (["--out", "{tmp}/file.txt"], "--out"),
}


@pytest.mark.robustness
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(env, tmp_path, case):
    args, named = BAD_INPUTS[case]
    (tmp_path / "file.txt").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = run(env, "--out", tmp_path / "ds", *TINY, *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("data_gen: error: "), result.stderr
    assert named in lines[0] and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


@pytest.mark.robustness
def test_non_empty_out_is_refused_unless_overwrite(env, tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    refused = run(env, "--out", out, *TINY)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    replaced = run(env, "--out", out, *TINY, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert not (out / "mine.txt").exists() and (out / "dataset.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


@pytest.mark.robustness
def test_sigkill_mid_run_leaves_nothing_at_out_and_a_rerun_succeeds(env, tmp_path):
    out = tmp_path / "ds"
    command = [sys.executable, "-m", "data_gen", "--out", str(out), "--train", "200000", "--quiet"]
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".ds.tmp-*/train/000100.png")):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not out.exists()
    rerun = run(env, "--out", out, *TINY)
    assert rerun.returncode == 0, rerun.stderr
    deadline = time.monotonic() + 10  # orphaned workers die with their parent
    while list(tmp_path.glob(".ds.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_help_describes_every_flag_with_defaults(env):
    result = run(env, "--help")
    assert result.returncode == 0
    for flag in (
        "--out",
        "--source",
        "--mnist-root",
        "--download",
        "--canvas-size",
        "--digits-per-image",
        "--digit-size",
        "--crop-from",
        "--max-iou",
        "--min-visible",
        "--split-mode",
        "--train",
        "--val",
        "--test",
        "--seed",
        "--workers",
        "--overwrite",
        "--preview",
    ):
        assert flag in result.stdout
    assert "default: 9000" in result.stdout and "clipped" in result.stdout


def test_library_api_generates_without_the_cli(env, tmp_path, monkeypatch):
    monkeypatch.setenv("COORDDET_CACHE", env["COORDDET_CACHE"])
    config = GeneratorConfig(
        out=tmp_path / "lib", train=3, val=1, test=2, workers=1, digit_size="10-12"
    )
    summary = generate(config)
    assert isinstance(summary, GenerationSummary)
    assert summary.images == {"train": 3, "val": 1, "test": 2} and summary.canvases_per_s > 0
    assert (tmp_path / "lib" / "test" / "000001.png").exists()
    with pytest.raises(UserError, match="--max-iou"):
        GeneratorConfig(max_iou=2.0)
    with pytest.raises(UserError, match="--digit-size"):
        GeneratorConfig(digit_size=(25, 15))
