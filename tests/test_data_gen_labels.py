"""``data_gen --labels position`` and ``--canvas-size LO-HI``: the position rule, crowd boxes at
region lines, images that do not change with the labels, mixed sizes, one size byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from coorddet.data import CocoDataset

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--train", "60", "--val", "4", "--test", "12", "--workers", "1", "--quiet"]
NAMES = ("top-left", "top-right", "bottom-left", "bottom-right")


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_gen", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def split(out: Path, name: str = "train") -> dict:
    return json.loads((out / "annotations" / f"instances_{name}.json").read_text())


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return {**os.environ, "COORDDET_CACHE": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="module")
def made(tmp_path_factory, env) -> dict[str, Path]:
    """Datasets from the same seed: digit labels (default and explicit), position labels, one
    size given as a range, and mixed sizes (twice, with 1 and 2 workers)."""
    root = tmp_path_factory.mktemp("labels")
    flags = {
        "digit": [],
        "digit-explicit": ["--labels", "digit", "--canvas-size", "64"],
        "one-size-range": ["--canvas-size", "64-64"],
        "position": ["--labels", "position"],
        "mixed": ["--labels", "position", "--canvas-size", "48-96"],
        "mixed-2-workers": ["--labels", "position", "--canvas-size", "48-96", "--workers", "2"],
    }
    for name, extra in flags.items():
        result = run("--out", str(root / name), *SMALL, *extra, env=env)
        assert result.returncode == 0, result.stderr
    return {name: root / name for name in flags}


def test_one_size_stays_byte_for_byte(made):
    digit = tree(made["digit"])
    assert tree(made["digit-explicit"]) == digit
    assert tree(made["one-size-range"]) == digit
    meta = json.loads((made["digit"] / "dataset.json").read_text())
    assert "labels" not in meta["parameters"] and meta["parameters"]["canvas_size"] == 64


def test_position_labels_follow_the_rule_and_boundary_boxes_are_crowd(made):
    crowd = regular = 0
    for name in ("train", "test"):
        doc = split(made["position"], name)
        assert [(c["id"], c["name"]) for c in doc["categories"]] == list(enumerate(NAMES, 1))
        for ann in doc["annotations"]:
            x, y, w, h = ann["bbox"]
            centre_x, centre_y = x + w / 2, y + h / 2
            near_line = abs(centre_x - 32) <= 2 or abs(centre_y - 32) <= 2
            assert ann["iscrowd"] == int(near_line), ann
            expected = 1 + (centre_x >= 32) + 2 * (centre_y >= 32)
            assert ann["category_id"] == expected, ann
            crowd, regular = crowd + near_line, regular + (not near_line)
    assert crowd and regular  # both kinds occur, so both branches were checked
    meta = json.loads((made["position"] / "dataset.json").read_text())
    assert meta["parameters"]["labels"] == "position"
    assert "within 2 px" in meta["conventions"]["labels"]


def test_position_labels_change_no_pixel_and_no_box(made):
    digit, position = made["digit"], made["position"]
    for name in ("train", "test"):
        assert [a["bbox"] for a in split(digit, name)["annotations"]] == [
            a["bbox"] for a in split(position, name)["annotations"]
        ]
        for image in sorted((digit / name).glob("*.png")):
            assert image.read_bytes() == (position / name / image.name).read_bytes()


def test_crowd_boxes_are_not_trained_on(made):
    dataset = CocoDataset(made["position"], "train")
    doc = split(made["position"])
    for index in range(len(dataset)):
        _, target = dataset[index]
        image_id = int(target["image_id"])
        kept = [a for a in doc["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]
        assert sorted(target["labels"].tolist()) == sorted(a["category_id"] for a in kept)


def test_mixed_sizes_are_square_in_range_deterministic_and_recorded(made):
    mixed = made["mixed"]
    assert tree(mixed) == tree(made["mixed-2-workers"])
    sizes = set()
    for name in ("train", "val", "test"):
        doc = split(mixed, name)
        for image in doc["images"]:
            with Image.open(mixed / name / image["file_name"]) as png:
                assert png.size == (image["width"], image["height"])
            assert image["width"] == image["height"] and 48 <= image["width"] <= 96
            sizes.add(image["width"])
        for ann in doc["annotations"]:  # region lines at each canvas's own half
            side = doc["images"][ann["image_id"] - 1]["width"]
            x, y, w, h = ann["bbox"]
            assert 0 <= x and x + w <= side and 0 <= y and y + h <= side
            right, bottom = x + w / 2 >= side / 2, y + h / 2 >= side / 2
            if not ann["iscrowd"]:
                assert ann["category_id"] == 1 + right + 2 * bottom
    assert len(sizes) > 10
    meta = json.loads((mixed / "dataset.json").read_text())
    assert meta["parameters"]["canvas_size"] == [48, 96] and meta["parameters"]["crop_from"] is None


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--labels", "position", "--split-mode", "quadrant"], "--labels position"),
        (["--canvas-size", "96-48"], "--canvas-size"),
        (["--canvas-size", "0-64"], "--canvas-size"),
        (["--canvas-size", "48-96", "--crop-from", "80"], "--crop-from"),
        (["--labels", "region"], "--labels"),
    ],
)
def test_bad_label_and_size_flags_are_one_line_usage_errors(tmp_path, env, flags, needle):
    result = run("--out", str(tmp_path / "out"), *SMALL, *flags, env=env)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr
    assert not (tmp_path / "out").exists()
