"""Reliability across the three tools, through their real command lines.

This file holds the cases that cross tools: a dataset on disk that is wrong, fed to
``python train.py`` and ``python -m coorddet.evaluate`` (both read datasets through
``coorddet.data.CocoDataset``). Each must exit 2 with one stderr line starting with
``error:`` that names the file and the problem, print no traceback and write nothing.

Only a few such cases run here, one per layer a command goes through: the checks train.py
makes before its slow imports, the hint it adds to a dataset error, evaluate's own look for
the split, and ``CocoDataset``'s JSON and image reading. Every way a dataset can be wrong
is tested in-process, against ``CocoDataset`` itself, in ``test_data.py`` (``BAD_INPUTS``).

The rest of the reliability contract sits next to the tool it belongs to, marked
``@pytest.mark.robustness`` so that ``pytest -m robustness`` runs the whole set and the run ends
with one summary line (``tests/conftest.py``):

- bad flags, run directories and checkpoints: ``test_data_gen_cli.py``, ``test_train_cli.py``,
  ``test_evaluate.py`` (``BAD_INPUTS`` / ``FAST_ERRORS`` tables); bad config values and YAML
  in-process in ``test_config.py``;
- SIGKILL mid-run: data_gen leaves no dataset and a rerun succeeds; training resumes with
  ``--resume last`` to the requested epochs; evaluate leaves the old report untouched;
- a NaN loss stops training with one line and keeps ``best.ckpt``;
- no overwriting without ``--overwrite`` (data_gen, train.py, evaluate);
- a checkpoint that runs code when unpickled is refused and its payload never runs;
- one process per output folder, write faults (full disk, read-only or removed folder) and a
  killed DDP worker: ``test_faults.py``, with ``test_locking.py`` and ``test_fileio.py``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import assert_user_error, run_cli

pytestmark = pytest.mark.robustness


def write_file(relative: str, content: bytes) -> Callable[[Path], None]:
    """Replace ``ROOT/relative`` with ``content``."""

    def apply(root: Path) -> None:
        (root / relative).write_bytes(content)

    return apply


# name -> (tool, how the copied dataset is broken, words the one stderr line must hold).
# evaluate reads the test split, train.py the train and val splits.
EVALUATE, TRAIN = "evaluate", "train"
CASES = {
    # train.py's own check, before its slow imports
    "no annotations folder (train)": (
        TRAIN, lambda root: shutil.rmtree(root / "annotations"),
        ["instances_train.json", "python -m data_gen"]),
    # CocoDataset's error, to which train.py adds how to create a dataset
    "annotations not JSON (train)": (
        TRAIN, write_file("annotations/instances_val.json", b'{"images": ['),
        ["instances_val.json", "not valid JSON", "python -m data_gen"]),
    # evaluate's look for the split, then CocoDataset's
    "no annotations folder (evaluate)": (
        EVALUATE, lambda root: shutil.rmtree(root / "annotations"),
        ["instances_test.json", "python -m data_gen"]),
    "annotations not JSON (evaluate)": (
        EVALUATE, write_file("annotations/instances_test.json", b'{"images": ['),
        ["instances_test.json", "not valid JSON"]),
    # PIL's error inside the one line
    "not an image (evaluate)": (
        EVALUATE, write_file("test/000000.png", b"hello"), ["000000.png", "not a readable image"]),
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
    assert broken.results[case].stderr.startswith("error: "), broken.results[case].stderr
    assert not [p for p in broken.tmp.iterdir() if p.name.endswith("-out")]
