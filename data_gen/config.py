"""The generator's one typed config, validated on construction.

Every impossible setting raises :class:`UserError` naming the CLI flag, so the library
(``data_gen.generate(GeneratorConfig(...))``) and the CLI fail the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from data_gen.canvas import BOX_KINDS
from data_gen.errors import UserError
from data_gen.labels import LABELINGS

SOURCES = ("bundled", "mnist")
SPLIT_MODES = ("uniform", "quadrant")
MAX_CANVAS_SIZE = 4096
MAX_DIGITS_PER_IMAGE = 1000
MAX_WORKERS = 8
FIELD_RATIO = 120 / 64  # the paper: digits on a 120x120 field, centre-cropped to 64x64


def parse_range(text: str | int | tuple[int, int] | list[int], *, flag: str) -> tuple[int, int]:
    """``5`` / ``"5"`` -> (5, 5); ``"3-7"`` / ``(3, 7)`` -> (3, 7); inclusive; validated."""
    if isinstance(text, bool):
        raise UserError(f"{flag} must be an integer or a range like 3-7, got {text!r}")
    if isinstance(text, int):
        low = high = text
    elif isinstance(text, (tuple, list)) and len(text) == 2:
        low, high = text
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in text):
            raise UserError(f"{flag} must be two integers, got {text!r}")
    elif isinstance(text, str):
        parts = text.strip().split("-")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise UserError(f"{flag} must be an integer or a range like 3-7, got {text!r}")
        low, high = int(parts[0]), int(parts[-1])
    else:
        raise UserError(f"{flag} must be an integer or a range like 3-7, got {text!r}")
    if low < 0 or high < 0:
        raise UserError(f"{flag} must not be negative, got {text!r}")
    if low > high:
        raise UserError(f"{flag} range {text!r} is reversed; write it low-high, e.g. {high}-{low}")
    return low, high


def default_workers() -> int:
    """CPUs available to this process, capped at :data:`MAX_WORKERS`."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything ``generate`` needs. Sizes in pixels; ranges inclusive ``(low, high)``.

    ``crop_from``: side of the field digits are placed on before the centre crop to
    ``canvas_size``; 0 = no field, every digit lies fully inside the canvas; None = the
    paper's ratio, 120 for a 64 px canvas (``round(canvas_size * 15 / 8)``).
    ``canvas_size``: one side for every canvas, or ``(low, high)`` (``"48-96"``): each canvas
    draws its side from that inclusive range, so a split mixes square sizes (with
    ``crop_from`` None, each canvas's field then keeps the paper's ratio to its own side).
    ``labels``: a box's category is its ``digit`` or its canvas region (``position``,
    :mod:`data_gen.labels`).
    ``max_iou``: largest IoU allowed between two digits' boxes (1.0 allows any overlap).
    ``min_visible``: digits keeping a smaller fraction of their ink pixels after the crop
    are erased. ``boxes``: "visible" (tight box of the visible ink) or "placement" (the
    released CoordConv loader's unclipped paste rectangles; every digit kept, see
    :mod:`data_gen.canvas`). ``split_mode``: "uniform", or "quadrant" (train/val digit centres in the
    top-left, top-right and bottom-left quadrants, test centres in the bottom-right one).
    ``workers``: processes (None = CPUs, capped at 8); never changes the output.
    ``preview``: number of train canvases drawn into ``OUT/preview.png`` (0 = none).
    """

    out: Path = Path("data/mnist-det")
    source: str = "bundled"
    mnist_root: Path | None = None
    download: bool = False
    canvas_size: int | tuple[int, int] = 64
    digits_per_image: tuple[int, int] = (5, 5)
    digit_size: tuple[int, int] = (15, 25)
    crop_from: int | None = None
    max_iou: float = 1.0
    min_visible: float = 0.25
    split_mode: str = "uniform"
    boxes: str = "visible"
    labels: str = "digit"
    train: int = 9000
    val: int = 1000
    test: int = 1000
    seed: int = 0
    workers: int | None = None
    overwrite: bool = False
    preview: int = 0

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "out", Path(self.out))
        low, high = parse_range(self.canvas_size, flag="--canvas-size")
        set_(self, "canvas_size", low if low == high else (low, high))
        if self.mnist_root is not None:
            set_(self, "mnist_root", Path(self.mnist_root))
        set_(
            self, "digits_per_image", parse_range(self.digits_per_image, flag="--digits-per-image")
        )
        set_(self, "digit_size", parse_range(self.digit_size, flag="--digit-size"))
        if self.workers is None:
            set_(self, "workers", default_workers())
        if self.crop_from is None and low == high:
            set_(self, "crop_from", round(self.canvas_size * FIELD_RATIO))
        self._validate()

    def _validate(self) -> None:
        if self.source not in SOURCES:
            raise UserError(f"unknown --source {self.source!r}; choose one of {', '.join(SOURCES)}")
        if self.source == "mnist" and self.mnist_root is None:
            raise UserError("--source mnist needs --mnist-root DIR (add --download to fetch it)")
        if self.source != "mnist" and (self.mnist_root is not None or self.download):
            raise UserError("--mnist-root and --download only apply to --source mnist")
        if self.boxes not in BOX_KINDS:
            raise UserError(f"unknown --boxes {self.boxes!r}; choose {' or '.join(BOX_KINDS)}")
        if self.split_mode not in SPLIT_MODES:
            raise UserError(f"unknown --split-mode {self.split_mode!r}; choose uniform or quadrant")
        if self.labels not in LABELINGS:
            raise UserError(f"unknown --labels {self.labels!r}; choose {' or '.join(LABELINGS)}")
        if self.labels == "position" and self.split_mode == "quadrant":
            raise UserError(
                "--labels position with --split-mode quadrant: the test split's one region "
                "would be a category never seen in training; use --split-mode uniform"
            )
        for flag, value in (
            ("--crop-from", 0 if self.crop_from is None else self.crop_from),
            ("--train", self.train),
            ("--val", self.val),
            ("--test", self.test),
            ("--seed", self.seed),
            ("--workers", self.workers),
            ("--preview", self.preview),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UserError(f"{flag} must be a non-negative integer, got {value!r}")
        low, high = self.canvas_sizes
        if low < 1 or high > MAX_CANVAS_SIZE:
            raise UserError(f"--canvas-size must be in 1..{MAX_CANVAS_SIZE}, got {low}-{high}")
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")
        if self.train + self.val + self.test == 0:
            raise UserError("--train, --val and --test are all 0; nothing to generate")
        if self.preview > self.train:
            raise UserError(f"--preview {self.preview} exceeds --train {self.train} canvases")
        low, high = self.digits_per_image
        if high < 1 or high > MAX_DIGITS_PER_IMAGE:
            raise UserError(
                f"--digits-per-image must allow 1..{MAX_DIGITS_PER_IMAGE} digits, got {low}-{high}"
            )
        self._validate_geometry()
        for flag, value in (("--max-iou", self.max_iou), ("--min-visible", self.min_visible)):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0.0 <= value <= 1.0
            ):
                raise UserError(f"{flag} must be a number in [0, 1], got {value!r}")

    def _validate_geometry(self) -> None:
        low, high = self.digit_size
        if low < 1:
            raise UserError(f"--digit-size must be at least 1 px, got {low}-{high}")
        smallest, largest = self.canvas_sizes
        if self.crop_from and self.crop_from < largest:
            raise UserError(
                f"--crop-from {self.crop_from} is smaller than --canvas-size {largest}; "
                "use 0 (no crop) or a field at least as large as the canvas"
            )
        if self.crop_from is None:  # mixed sizes: each canvas's field keeps the paper's ratio
            field = round(smallest * FIELD_RATIO)
        else:
            field = self.crop_from or smallest
        if high > field:
            where = (
                f"--crop-from {self.crop_from}"
                if self.crop_from
                else "--canvas-size (with --crop-from 0)"
            )
            raise UserError(f"--digit-size {low}-{high} does not fit in {where} = {field} px")

    @property
    def canvas_sizes(self) -> tuple[int, int]:
        """``(low, high)`` canvas side, inclusive; equal for one size."""
        size = self.canvas_size
        return (size, size) if isinstance(size, int) else size

    def parameters(self) -> dict:
        """The output-defining settings, JSON-ready (no paths, workers or overwrite). Digit
        labels are not named (datasets from before ``--labels`` keep their bytes)."""
        skip = {"out", "mnist_root", "download", "workers", "overwrite"}
        if self.labels == "digit":
            skip.add("labels")
        params = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        if not isinstance(self.canvas_size, int):
            params["canvas_size"] = list(self.canvas_size)
        params["digits_per_image"] = list(self.digits_per_image)
        params["digit_size"] = list(self.digit_size)
        return params
