"""Reliability across the three tools, through their real command lines.

This file holds the cases that cross tools: every way a dataset on disk can be wrong, fed to
``python train.py`` and ``python -m coorddet.evaluate`` (both read datasets through
``coorddet.data.CocoDataset``). Each must exit 2 with one stderr line naming the file and the
problem, print no traceback and write nothing.

The rest of the reliability contract sits next to the tool it belongs to, marked
``@pytest.mark.robustness`` so that ``pytest -m robustness`` runs the whole set and the run ends
with one summary line (``tests/conftest.py``):

- bad flags, configs and checkpoints: ``test_data_gen_cli.py``, ``test_train_cli.py``,
  ``test_evaluate.py`` (``BAD_INPUTS`` / ``FAST_ERRORS`` tables);
- SIGKILL mid-run: data_gen leaves no dataset and a rerun succeeds; training resumes with
  ``--resume last`` to the requested epochs; evaluate leaves the old report untouched;
- a NaN loss stops training with one line and keeps ``best.ckpt``;
- no overwriting without ``--overwrite`` (data_gen, train.py, evaluate);
- a checkpoint that runs code when unpickled is refused and its payload never runs;
- one process per output folder, write faults (full disk, read-only or removed folder) and a
  killed DDP worker: ``test_faults.py``, with ``test_locking.py`` and ``test_fileio.py``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import assert_user_error, run_cli

pytestmark = pytest.mark.robustness


def edit_json(split: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        path = root / "annotations" / f"instances_{split}.json"
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    return apply


def write_file(relative: str, content: bytes | None) -> Callable[[Path], None]:
    """Replace ``ROOT/relative`` with ``content``, or delete it when ``content`` is None."""

    def apply(root: Path) -> None:
        path = root / relative
        if content is None:
            path.unlink()
        else:
            path.write_bytes(content)

    return apply


def truncate(relative: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        path = root / relative
        path.write_bytes(path.read_bytes()[:60])

    return apply


def first(key: str, **fields: object) -> Callable[[dict], object]:
    return lambda data: data[key][0].update(fields)


# name -> (tool, how the copied dataset is broken, words the one stderr line must hold).
# evaluate reads the test split, train.py the train and val splits.
EVALUATE, TRAIN = "evaluate", "train"
CASES = {
    "annotations not JSON": (
        EVALUATE, write_file("annotations/instances_test.json", b'{"images": ['),
        ["instances_test.json", "not valid JSON"]),
    "no images key": (
        EVALUATE, edit_json("test", lambda d: d.pop("images")), ["instances_test.json", "'images'"]),
    "no annotations key": (
        TRAIN, edit_json("train", lambda d: d.pop("annotations")),
        ["instances_train.json", "'annotations'"]),
    "no categories key": (
        EVALUATE, edit_json("test", lambda d: d.pop("categories")),
        ["instances_test.json", "'categories'"]),
    "negative box width": (
        EVALUATE, edit_json("test", first("annotations", bbox=[10, 10, -3, 12])),
        ["instances_test.json", "annotation id"]),
    "zero box height": (
        TRAIN, edit_json("val", first("annotations", bbox=[10, 10, 12, 0])),
        ["instances_val.json", "zero or negative"]),
    "box outside the image": (
        EVALUATE, edit_json("test", first("annotations", bbox=[60, 10, 12, 12])),
        ["instances_test.json", "outside"]),
    "unknown image_id": (
        TRAIN, edit_json("train", first("annotations", image_id=999)),
        ["instances_train.json", "image_id 999"]),
    "unknown category_id": (
        EVALUATE, edit_json("test", first("annotations", category_id=42)),
        ["instances_test.json", "category_id 42"]),
    "file_name ../x.png": (
        EVALUATE, edit_json("test", first("images", file_name="../x.png")),
        ["instances_test.json", "'../x.png'"]),
    "file_name /etc/passwd": (
        TRAIN, edit_json("val", first("images", file_name="/etc/passwd")),
        ["instances_val.json", "'/etc/passwd'"]),
    "image missing": (EVALUATE, write_file("test/000000.png", None), ["000000.png", "missing"]),
    "image truncated": (TRAIN, truncate("train/000000.png"), ["000000.png", "not a readable image"]),
    "not an image": (
        EVALUATE, write_file("test/000000.png", b"hello"), ["000000.png", "not a readable image"]),
    "image size differs from the JSON": (
        EVALUATE, edit_json("test", first("images", width=65)), ["000000.png", "64x64 but"]),
    "empty split": (
        TRAIN, edit_json("train", lambda d: d.update(images=[], annotations=[])),
        ["instances_train.json", "empty split"]),
    "no annotations folder (evaluate)": (
        EVALUATE, lambda root: shutil.rmtree(root / "annotations"),
        ["instances_test.json", "python -m data_gen"]),
    "no annotations folder (train)": (
        TRAIN, lambda root: shutil.rmtree(root / "annotations"),
        ["instances_train.json", "python -m data_gen"]),
    "image folder missing": (
        TRAIN, lambda root: shutil.rmtree(root / "val"), ["val", "image folder"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def broken(tmp_path_factory, tiny_dataset, smoke_runs) -> SimpleNamespace:
    """Each case's command line on its own broken copy of the tiny dataset, two at a time (each
    is a fresh interpreter importing torch: seconds on a busy 2-core machine)."""
    tmp = tmp_path_factory.mktemp("broken-datasets")
    checkpoint = smoke_runs["baseline"] / "checkpoints" / "best.ckpt"

    def run(case: str):
        tool, breaks, _ = CASES[case]
        data = tmp / case.replace(" ", "_").replace("/", "_")
        shutil.copytree(tiny_dataset, data)
        breaks(data)
        out = str(data) + "-out"
        if tool == EVALUATE:
            return run_cli("-m", "coorddet.evaluate", "--data", str(data), "--out", out,
                           "--quiet", str(checkpoint))  # fmt: skip
        return run_cli("train.py", "--config", "configs/smoke.yaml", "--data", str(data),
                       "--out", out, "--quiet")  # fmt: skip

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(CASES, pool.map(run, CASES), strict=True))
    return SimpleNamespace(tmp=tmp, results=results)


@pytest.mark.parametrize("case", list(CASES))
def test_broken_dataset_is_one_line_exit_2_and_writes_nothing(case, broken):
    _, _, needles = CASES[case]
    assert_user_error(broken.results[case], *needles)
    assert not [p for p in broken.tmp.iterdir() if p.name.endswith("-out")]
