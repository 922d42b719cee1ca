"""data_gen.coco: PNG encoding, COCO documents and the atomic output directory."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_gen import coco
from data_gen.errors import UserError


@pytest.mark.parametrize("shape", [(64, 64), (1, 1), (3, 17), (120, 40)])
def test_encode_png_is_8bit_grayscale_lossless_and_deterministic(shape):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = coco.encode_png(image)
    assert data == coco.encode_png(image.copy())
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.mode == "L" and decoded.format == "PNG"
        assert decoded.size == (shape[1], shape[0])
        assert np.array_equal(np.asarray(decoded), image)


def test_coco_document_ids_categories_and_areas():
    records = [([[1, 2, 3, 4], [0, 0, 1, 1]], [7, 0]), ([], []), ([[5, 5, 10, 2]], [9])]
    doc = coco.coco_document(split="val", canvas_size=64, records=records, version="x")
    assert [img["file_name"] for img in doc["images"]] == ["000000.png", "000001.png", "000002.png"]
    assert [img["id"] for img in doc["images"]] == [1, 2, 3]
    assert all(img["width"] == img["height"] == 64 for img in doc["images"])
    anns = doc["annotations"]
    assert [a["id"] for a in anns] == [1, 2, 3]
    assert [a["image_id"] for a in anns] == [1, 1, 3]
    assert [a["category_id"] for a in anns] == [8, 1, 10]
    assert [a["area"] for a in anns] == [12, 1, 20]
    assert all(a["iscrowd"] == 0 for a in anns)
    assert [(c["id"], c["name"]) for c in doc["categories"]] == [(d + 1, str(d)) for d in range(10)]


def test_non_empty_or_file_out_is_refused_and_nothing_changes(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="--overwrite"):
        coco.check_output_dir(out, overwrite=False)
    coco.check_output_dir(out, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        coco.check_output_dir(tmp_path / "file", overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"


def test_overwrite_never_replaces_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "x").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="refusing"):
        coco.check_output_dir(tmp_path, overwrite=True)


def test_publish_swaps_in_the_new_tree_and_removes_the_old(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "old.txt").write_text("old")
    temp = coco.make_temp_dir(out)
    assert temp.parent == tmp_path and temp.name.startswith(".ds.tmp-")
    assert sorted(p.name for p in temp.iterdir()) == ["annotations", "test", "train", "val"]
    (temp / "new.txt").write_text("new")
    coco.publish(temp, out)
    assert (out / "new.txt").exists() and not (out / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_stale_build_dirs_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f".ds.tmp-{int(dead.stdout)}"
    (stale / "train").mkdir(parents=True)
    alive = tmp_path / f".ds.tmp-{os.getppid()}"  # a live process: left alone
    alive.mkdir()
    other = tmp_path / ".other.tmp-1"
    other.mkdir()
    temp = coco.make_temp_dir(tmp_path / "ds")
    assert not stale.exists() and alive.exists() and other.exists()
    coco.discard(temp)
    assert not temp.exists()
