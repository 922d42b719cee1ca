"""``predict_images(...)``: a checkpoint's detections on image files, written for pycocotools.

    from coorddet.evaluation.new_images import predict_images
    predict_images(checkpoint="runs/demo/baseline/checkpoints/best.ckpt", inputs=["photos/"],
                   out="predictions/photos")

is what ``python -m coorddet.predict`` runs. It writes into ``out``, whole or not at all (a
hidden sibling folder renamed into place):

- ``predictions.json``: the detections in the COCO results format with the checkpoint's own
  category ids (``image_id, category_id, bbox [x, y, w, h], score``; a ``segmentation`` RLE
  for Mask R-CNN), streamed as batches finish, so memory does not grow with the images;
- ``images.json``: the COCO ``images`` list (``id, file_name, width, height``) of the images
  predicted, so the pair scores with pycocotools against your own ground truth;
- ``drawn/<file_name>.png`` with ``draw``: each image at its own size with the detections
  scoring at least ``draw_thresh``, their category names and scores.

A file that is not a readable image is skipped (one line naming it, and the count in the
result): one broken file should not cost the predictions on thousands of others.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from coorddet.errors import UserError
from coorddet.evaluation.inputs import check_out
from coorddet.locking import hold_folder

LAZY_WORKERS = 4  # default DataLoader workers decoding the files, inference on a GPU
DRAWN = "drawn"


@dataclass(frozen=True)
class ImagesResult:
    """What :func:`predict_images` wrote: images predicted, detections, files skipped."""

    out: Path
    images: int
    detections: int
    skipped: list[tuple[Path, str]]  # (file, why)


def predict_images(
    *,
    checkpoint: str | Path,
    inputs: Sequence[str],
    out: str | Path,
    coco: str | Path | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str = "auto",
    precision: str = "32-true",
    score_thresh: float = 0.0,
    draw: bool = False,
    draw_thresh: float = 0.5,
    trust_checkpoint: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> ImagesResult:
    """Predict with ``checkpoint`` on the image files of ``inputs`` (files, folders searched
    recursively, glob patterns) and write ``out`` (see the module's docstring).

    ``coco``: a COCO file whose ``images`` give the ids (matched by ``file_name``, the path
    below the folder given); default ids 1, 2, ... in path order. ``score_thresh``:
    detections below it are not written (0: all the model returns, what COCO mAP needs).
    ``num_workers``: DataLoader workers decoding images (``None``: 0 for inference on the
    CPU, where workers would take its cores, up to 4 on a GPU). The other
    arguments are :func:`coorddet.evaluation.evaluate`'s.
    """
    from coorddet.image_files import find_images, ids_from_coco, read_headers

    out = Path(out)
    with hold_folder(out):
        check_out(out, overwrite=overwrite, inputs=[checkpoint, *inputs])
        files = find_images(inputs)
        if coco is not None:
            files = ids_from_coco(files, coco)
        readable, skipped = read_headers(files)
        for path, why in skipped:
            _report_skip(path, why)
        if not readable:
            raise UserError(f"none of the {len(files)} input files is a readable image")

        from coorddet.checkpoint import load_checkpoint
        from coorddet.evaluation.prediction import resolve_device
        from coorddet.models import is_rpn_only
        from coorddet.report import staged_dir

        torch_device = resolve_device(device)
        loaded = load_checkpoint(checkpoint, trust=trust_checkpoint)
        model = loaded.build_model()
        if is_rpn_only(model):
            raise UserError(f"{checkpoint}: an RPN-only model has no detections to predict")
        if num_workers is None:  # on a CPU, workers would take cores from the inference
            cpu = torch_device.type == "cpu"
            num_workers = 0 if cpu else min(LAZY_WORKERS, os.cpu_count() or 1)
        settings = {"batch_size": batch_size, "num_workers": num_workers, "device": torch_device,
                    "precision": precision, "score_thresh": score_thresh, "quiet": quiet,
                    "draw_thresh": draw_thresh if draw else None}  # fmt: skip
        with staged_dir(out) as tmp:
            written, late = _predict_into(tmp, model, loaded, readable, settings)
        return ImagesResult(out, written[0], written[1], skipped + late)


def _report_skip(path: Path, why: str) -> None:
    """One line on stderr, even with ``quiet``: a skip changes what is written."""
    import sys

    print(f"skipped {path}: {why.removeprefix(f'{path}: ')}", file=sys.stderr)


def _predict_into(
    folder: Path, model: Any, loaded: Any, files: list[Any], settings: dict[str, Any]
) -> tuple[tuple[int, int], list[tuple[Path, str]]]:
    """Run the model over ``files`` and stream ``predictions.json`` and ``images.json`` into
    ``folder`` (and the drawings): ((images, detections) written, files skipped at decoding)."""
    from torch.utils.data import DataLoader

    from coorddet.evaluation.prediction import run_batches
    from coorddet.image_files import ImageFiles, collate_files
    from coorddet.predictions import to_coco_results

    dataset = ImageFiles(files)
    loader = DataLoader(dataset, batch_size=settings["batch_size"], collate_fn=collate_files,
                        num_workers=settings["num_workers"])  # fmt: skip
    late: list[tuple[Path, str]] = []
    batch_files: list[list[Any]] = []  # the files of the batch run_batches is on

    def batches():
        for images, targets in loader:
            for image, target in zip(images, targets, strict=True):
                if image is None:
                    late.append((files[target["index"]].path, target["error"]))
                    _report_skip(*late[-1])
            kept = [(i, t) for i, t in zip(images, targets, strict=True) if i is not None]
            if kept:  # run_batches yields records for a batch with images only
                batch_files.append([files[t["index"]] for _, t in kept])
            yield [i for i, _ in kept], [files[t["index"]].image_id for _, t in kept], len(images)

    categories = {int(c["id"]): str(c["name"]) for c in loaded.categories or []}
    counts = [0, 0]

    def write(records: list[Any], batch: list[Any]) -> None:
        records = _with_ids(records, loaded.category_ids, settings["score_thresh"])
        listed.extend([{"id": file.image_id, "file_name": file.file_name,
                        "width": file.size[0], "height": file.size[1]} for file in batch])  # fmt: skip
        results.extend(to_coco_results(records))
        counts[0] += len(records)
        counts[1] += sum(len(record.boxes) for record in records)
        if settings["draw_thresh"] is not None:
            for file, record in zip(batch, records, strict=True):
                _draw(folder, file, record, categories, settings["draw_thresh"])

    # One writer thread, in batch order: formatting the results overlaps the next batch's
    # inference (torch computes without the GIL), so writing costs the loop almost nothing.
    with (
        _JsonList(folder / "predictions.json") as results,
        _JsonList(folder / "images.json") as listed,
        ThreadPoolExecutor(max_workers=1) as writer,
    ):
        pending: list[Future] = []
        for records in run_batches(model, batches(), total=len(dataset), label=loaded.name,
                                   proposals=False, **_inference(settings)):  # fmt: skip
            pending.append(writer.submit(write, records, batch_files.pop(0)))
            while pending and pending[0].done():
                pending.pop(0).result()  # a failed write stops the run here
        for future in pending:
            future.result()
    return (counts[0], counts[1]), late


def _inference(settings: dict[str, Any]) -> dict[str, Any]:
    keys = ("batch_size", "device", "precision", "quiet")
    return {key: settings[key] for key in keys}


def _with_ids(records: list[Any], category_ids: Any, score_thresh: float) -> list[Any]:
    """Records with the checkpoint's category ids, detections below ``score_thresh`` dropped."""
    import dataclasses

    from coorddet.predictions import with_category_ids

    records = with_category_ids(records, category_ids)
    if score_thresh <= 0:
        return records
    kept = []
    for record in records:
        keep = record.scores >= score_thresh
        masks = record.segmentations
        kept.append(dataclasses.replace(
            record, boxes=record.boxes[keep], scores=record.scores[keep],
            labels=record.labels[keep],
            segmentations=None if masks is None else [m for m, k in zip(masks, keep.tolist(), strict=True) if k],
        ))  # fmt: skip
    return kept


def _draw(folder: Path, file: Any, record: Any, categories: dict[int, str], thresh: float) -> None:
    from coorddet.images import read_image
    from coorddet.plots import draw_detections

    pixels = read_image(file.path, file.size, "input of coorddet.predict")
    target = folder / DRAWN / Path(file.file_name).with_suffix(".png")
    draw_detections(pixels, record, target, categories=categories, score_thresh=thresh)


class _JsonList:
    """A JSON list written item by item into a file (the staging folder makes it whole)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: IO[str] | None = None
        self.first = True

    def __enter__(self) -> _JsonList:
        self.file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
        self.file.write("[")
        return self

    def extend(self, items: list[Any]) -> None:
        """Append ``items``: one ``json.dumps`` of the batch (C-encoded), not one per item."""
        assert self.file is not None
        if items:
            self.file.write(
                ("\n" if self.first else ",\n") + json.dumps(items, allow_nan=False)[1:-1]
            )
            self.first = False

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        assert self.file is not None
        try:
            if kind is None:
                self.file.write("\n]\n")
                self.file.flush()
                os.fsync(self.file.fileno())
        finally:
            self.file.close()
