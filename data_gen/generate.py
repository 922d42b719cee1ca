"""``generate(config) -> GenerationSummary``: render every split, write the dataset atomically.

Determinism: canvas ``i`` of split ``s`` is drawn from its own generator,
``np.random.default_rng([seed, SPLIT_IDS[s], i])``, so the output is byte-identical for
any ``workers``. With mixed canvas sizes, the canvas's side is that generator's first draw;
with one size nothing is drawn for it, so such datasets keep their bytes. Workers each render a chunk of canvases and write their PNGs; the parent
assembles the COCO JSON in index order.
"""

from __future__ import annotations

import ctypes
import json
import math
import multiprocessing
import signal
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from data_gen import coco
from data_gen.canvas import (
    ANYWHERE,
    HELDOUT_QUADRANT,
    INK_THRESHOLD,
    PLACEMENT,
    THREE_QUADRANTS,
    VISIBLE,
    CanvasSpec,
    DigitBank,
    render_canvas,
)
from data_gen.config import FIELD_RATIO, GeneratorConfig
from data_gen.errors import UserError
from data_gen.labels import rule
from data_gen.locking import hold_folder
from data_gen.preview import write_preview
from data_gen.sources import DigitSource, load_source

GENERATOR_VERSION = "1.0.0"
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
PREFLIGHT_CANVASES = 32  # rendered before anything is written, to fail fast on bad layouts
CHUNK_RANGE = (16, 250)  # canvases per worker task
BOX_CONVENTIONS = {
    VISIBLE: "[x, y, w, h] tight box of the digit's visible ink, pixels",
    PLACEMENT: "[x, y, w, h] the rectangle the resized digit was pasted into, shifted by the "
    "crop offset, not clipped (the released CoordConv loader's ground truth), pixels",
}

_STATE: dict = {}  # per-process render state, set by _init_worker


@dataclass(frozen=True)
class GenerationSummary:
    """What ``generate`` wrote: per-split image and box counts, wall time and rate."""

    out: Path
    images: dict[str, int]
    annotations: dict[str, int]
    seconds: float
    canvases_per_s: float

    def line(self) -> str:
        splits = " / ".join(f"{self.images[s]} {s}" for s in coco.SPLITS)
        return (
            f"wrote {sum(self.images.values())} canvases ({splits}), "
            f"{sum(self.annotations.values())} boxes to {self.out} in {self.seconds:.1f} s "
            f"({self.canvases_per_s:,.0f} canvases/s)"
        )


def generate(config: GeneratorConfig, *, progress: bool = False) -> GenerationSummary:
    """Write the dataset described by ``config`` to ``config.out`` (layout in ``coco``).

    ``progress`` shows a Rich progress bar on stderr. Raises ``UserError`` for bad settings
    (or an ``OUT`` another process is writing) before anything is written, ``OSError`` naming
    the file when a write fails; on any failure nothing is left at ``config.out``.
    """
    started = time.perf_counter()
    coco.check_output_dir(config.out, overwrite=config.overwrite)  # writes nothing
    with hold_folder(config.out):  # one data_gen per --out; UserError naming the holder
        coco.check_output_dir(config.out, overwrite=config.overwrite)  # filled meanwhile?
        return _generate(config, progress, started)


def _generate(config: GeneratorConfig, progress: bool, started: float) -> GenerationSummary:
    source = load_source(config.source, mnist_root=config.mnist_root, download=config.download)
    counts = {"train": config.train, "val": config.val, "test": config.test}
    state = _render_state(config, source)
    for split, count in counts.items():
        if count and not len(state["pools"][split]):
            raise UserError(f"the {config.source} source has no digits for the {split} split")
        for index in range(min(count, PREFLIGHT_CANVASES)):
            _render(state, split, index)
    temp = coco.make_temp_dir(config.out)
    try:
        state["temp"] = temp
        records = _render_all(state, counts, config.workers, progress)
        _write_metadata(temp, config, source, records)
        if config.preview:
            write_preview(temp / "train", records["train"][: config.preview],
                          temp / "preview.png", labels=config.labels)  # fmt: skip
        coco.check_output_dir(config.out, overwrite=config.overwrite)  # filled meanwhile?
        coco.publish(temp, config.out)
    except OSError as err:  # a fault, not a usage error: main() prints one line, exit 1
        coco.discard(temp)
        raise coco.named_in_out(err, temp, config.out) from None
    except BaseException:
        coco.discard(temp)
        raise
    seconds = time.perf_counter() - started
    return GenerationSummary(
        out=config.out,
        images=counts,
        annotations={s: sum(len(r[1]) for r in records[s]) for s in coco.SPLITS},
        seconds=seconds,
        canvases_per_s=sum(counts.values()) / max(seconds, 1e-9),
    )


def _render_state(config: GeneratorConfig, source: DigitSource) -> dict:
    quadrant = config.split_mode == "quadrant"
    # every canvas setting but the region is the config field of the same name
    base = {f.name: getattr(config, f.name) for f in fields(CanvasSpec) if f.name != "region"}
    smallest, _ = config.canvas_sizes
    base["canvas_size"] = smallest  # mixed sizes: each canvas replaces it (_render)
    if base["crop_from"] is None:
        base["crop_from"] = round(smallest * FIELD_RATIO)
    train_spec = CanvasSpec(**base, region=THREE_QUADRANTS if quadrant else ANYWHERE)
    test_spec = CanvasSpec(**base, region=HELDOUT_QUADRANT if quadrant else ANYWHERE)
    return {
        "bank": DigitBank(source.images, source.labels),
        "seed": config.seed,
        "pools": {"train": source.train_pool, "val": source.train_pool, "test": source.test_pool},
        "specs": {"train": train_spec, "val": train_spec, "test": test_spec},
        "sizes": config.canvas_sizes,
        "crop_from": config.crop_from,  # None: each canvas's field scales with its side
    }


def _render(state: dict, split: str, index: int):
    rng = np.random.default_rng([state["seed"], SPLIT_IDS[split], index])
    spec = state["specs"][split]
    low, high = state["sizes"]
    if low != high:
        size = int(rng.integers(low, high + 1))
        crop_from = state["crop_from"]
        field = round(size * FIELD_RATIO) if crop_from is None else crop_from
        spec = replace(spec, canvas_size=size, crop_from=field)
    return render_canvas(rng, spec, bank=state["bank"], pool=state["pools"][split])


def _init_worker(state: dict) -> None:
    _STATE.clear()
    _STATE.update(state)


def _init_pool_worker(state: dict) -> None:
    """Pool initializer: also make the worker die with its parent (Linux), so a killed
    run leaves no orphans writing into its abandoned build directory."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # pool.terminate() must just end us
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    _init_worker(state)


def _render_chunk(task: tuple[str, int, int]) -> tuple[str, int, list]:
    """Render canvases ``start..stop-1`` of ``split``, write their PNGs, return their records:
    ``(boxes, labels, source indices, ink RLEs, side)`` per canvas."""
    split, start, stop = task
    folder = _STATE["temp"] / split
    records = []
    for index in range(start, stop):
        canvas = _render(_STATE, split, index)
        coco.write_bytes(folder / coco.image_file_name(index), coco.encode_png(canvas.image))
        records.append(
            (
                canvas.boxes.tolist(),
                canvas.labels.tolist(),
                canvas.source_indices.tolist(),
                coco.encode_masks(canvas.masks),
                canvas.image.shape[0],
            )
        )
    return split, start, records


def _render_all(state: dict, counts: dict[str, int], workers: int, progress: bool) -> dict:
    total = sum(counts.values())
    chunk = min(max(math.ceil(total / (workers * 8)), CHUNK_RANGE[0]), CHUNK_RANGE[1])
    tasks = [
        (split, start, min(start + chunk, count))
        for split, count in counts.items()
        for start in range(0, count, chunk)
    ]
    parts: dict[str, dict[int, list]] = {split: {} for split in counts}
    processes = min(workers, len(tasks))
    # fork the pool before the progress bar starts its refresh thread
    pool = _pool_context().Pool(processes, _init_pool_worker, (state,)) if processes > 1 else None
    try:
        with _Progress(total, enabled=progress) as bar:
            if pool is None:
                _init_worker(state)
                results = map(_render_chunk, tasks)
            else:
                results = pool.imap_unordered(_render_chunk, tasks)
            for split, start, records in results:
                parts[split][start] = records
                bar.advance(len(records))
    finally:
        _STATE.clear()
        if pool is not None:
            pool.terminate()
            pool.join()
    return {
        split: [r for start in sorted(parts[split]) for r in parts[split][start]]
        for split in counts
    }


def _pool_context():
    """fork where available: workers inherit the digit arrays without pickling them."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def _write_metadata(
    temp: Path, config: GeneratorConfig, source: DigitSource, records: dict
) -> None:
    mixed = not isinstance(config.canvas_size, int)
    for split in coco.SPLITS:
        document = coco.coco_document(
            split=split,
            canvas_size=config.canvas_sizes[0],
            records=[(boxes, labels) for boxes, labels, *_ in records[split]],
            version=GENERATOR_VERSION,
            segmentations=[rles for _, _, _, rles, _ in records[split]],
            sizes=[side for *_, side in records[split]] if mixed else None,
            labels=config.labels,
        )
        coco.write_json(temp / "annotations" / f"instances_{split}.json", document)
    indices = {
        split: sorted({i for _, _, used, *_ in records[split] for i in used})
        for split in coco.SPLITS
    }
    meta = {
        "generator": "data_gen",
        "generator_version": GENERATOR_VERSION,
        "source": source.provenance,
        "boxes": config.boxes,  # coorddet.data accepts boxes beyond the image only if "placement"
        "parameters": config.parameters(),
        "conventions": {
            "overlap": "clipped sum: min(sum of digit layers, 255)",
            "ink": f"pixel value > {INK_THRESHOLD}",
            "resize": "ink crop resized with PIL bilinear",
            "bbox": BOX_CONVENTIONS[config.boxes],
            "segmentation": "COCO RLE (pycocotools, compressed counts) of the digit's visible "
            "ink: its own layer's pixels > 0 inside the canvas; masks of overlapping digits "
            "overlap",
            "min_visible": "digits keeping a smaller fraction of their ink pixels are erased"
            if config.boxes == VISIBLE
            else "not applied: every digit is kept and annotated",
            "quadrant_split": "test centres bottom-right; train/val centres in the other three",
            "image_ids": "id = index + 1, file_name = f'{index:06d}.png'",
        },
        "counts": {
            split: {
                "images": len(records[split]),
                "annotations": sum(len(r[1]) for r in records[split]),
            }
            for split in coco.SPLITS
        },
        "source_indices": "@SOURCE_INDICES@",
    }
    if config.labels != "digit":
        meta["conventions"]["labels"] = rule(config.labels)
    if mixed:
        low, high = config.canvas_sizes
        meta["conventions"]["canvas_size"] = (
            f"each canvas's side is drawn uniformly from {low}..{high} px (its generator's "
            "first draw); its field (crop_from null) keeps the 120/64 ratio to that side"
        )
    # one compact line per split keeps the file readable despite thousands of indices
    compact = ",\n".join(f'    "{s}": {json.dumps(indices[s])}' for s in coco.SPLITS)
    text = json.dumps(meta, indent=2).replace('"@SOURCE_INDICES@"', "{\n" + compact + "\n  }")
    (temp / "dataset.json").write_text(text + "\n", encoding="utf-8")


class _Progress:
    """A Rich progress bar on stderr, or nothing."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self.total, self.enabled, self._bar, self._task = total, enabled, None, None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task("generating canvases", total=self.total)
        return self

    def advance(self, amount: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, amount)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
