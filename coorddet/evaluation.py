"""``evaluate(...)``: score checkpoints (and outside detections) on a dataset, compare, report.

    from coorddet.evaluation import evaluate
    evaluate(data="data/demo", split="test", out="reports/demo", checkpoints=[...])

is what ``python -m coorddet.evaluate`` (:mod:`coorddet.cli.evaluate`, flags of the same names)
runs. It writes into ``out`` (built in a hidden sibling folder and moved into place whole; one
process at a time, see :func:`coorddet.locking.hold_folder`):

- ``metrics.json``: ``{run_name: {metric: value}}`` (``null`` where undefined);
- ``predictions_<run_name>.json``: detections in the COCO results format;
- ``report.md``: metrics x runs, each run's relative change against the baseline;
- ``detections.png`` (the same canvases for every run) and ``iou_distribution.png``;
- with ``--group``: ``groups.json``, ``{name: {metric: {mean, std, ci95, n}}}`` over seeds.

Run names come from each checkpoint's config (``baseline``, ``coordconv``); clashing names get
the seed appended (``baseline-s1``), then a counter. The baseline is the first checkpoint
without CoordConv. ``predictions=[(NAME, FILE)]`` (``--predictions FILE --name NAME``) adds
detections from any other detector in the COCO results format; images it has no detections
for count as misses.

User mistakes raise :class:`coorddet.errors.UserError`, named by the command-line flag that
sets the value (``--out``, ``--predictions``, ...). Cheap checks (paths, JSON) run before
torch is imported, so mistakes fail fast.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coorddet.config import EvalConfig
from coorddet.dataset_layout import require_dataset
from coorddet.errors import UserError
from coorddet.fileio import write_json_atomic, write_text_atomic
from coorddet.locking import hold_folder
from coorddet.validate import check_choice, check_int, check_number

PLOT_SAMPLES = 6  # canvases drawn in detections.png
LAZY_WORKERS = 4  # default DataLoader workers for a split decoded lazily
PRECISIONS = ("32-true", "bf16-mixed")
PLOTS = ("detections.png", "iou_distribution.png")


def _check_out(out: Path, *, overwrite: bool, inputs: Sequence[str | Path]) -> Path:
    """The report folder, if it may be written: never a file, never a folder holding inputs."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a report folder; choose another --out")
    here = Path.cwd().resolve()
    if out.is_dir() and out.resolve() in [here, *here.parents]:  # it is replaced, not filled
        raise UserError(f"--out {out} is or holds the current folder; name a new report folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(
                f"report folder {out} exists and is not empty; pass --overwrite or --out"
            )
        resolved = out.resolve()
        for source in inputs:
            path = Path(source).resolve()
            if path == resolved or resolved in path.parents:
                raise UserError(
                    f"--out {out} holds the input {source}; --overwrite would delete it"
                )
    return out


def _read_predictions_json(path: str | Path) -> Any:
    try:
        with open(path, "rb") as handle:
            return json.load(handle)
    except OSError as error:
        raise UserError(f"--predictions {path}: {error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"--predictions {path}: not valid JSON ({error})") from None


def _outside_records(results: Any, path: str | Path, dataset: Any) -> list[Any]:
    """COCO results (parsed JSON) -> records; UserError naming the file for a malformed entry,
    or an image or category id that ``dataset`` does not have."""
    from coorddet.predictions import records_from_coco_results

    try:
        records = records_from_coco_results(results)
    except UserError as error:
        raise UserError(f"--predictions {path}: {error}") from None
    unknown = sorted({r.image_id for r in records} - set(dataset.image_ids))
    if unknown:
        where = f"{dataset.root} split {dataset.split}"
        raise UserError(f"--predictions {path}: image ids not in {where}: {_listing(unknown)}")
    categories = {int(c["id"]) for c in dataset.categories}
    labels = {int(label) for r in records for label in r.labels.tolist()}
    if labels - categories:
        raise UserError(
            f"--predictions {path}: category ids not in the dataset: "
            f"{_listing(sorted(labels - categories))} (it has {_listing(sorted(categories))})"
        )
    return records


def _listing(values: Sequence[Any], limit: int = 10) -> str:
    shown = ", ".join(map(str, values[:limit]))
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _device(text: str) -> Any:
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda" and (
        not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise UserError(f"--device {text}: no such CUDA device here; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {text}: MPS is not available here; use --device cpu")
    return device


def _predict(
    model: Any,
    dataset: Any,
    device: Any,
    label: str,
    *,
    batch_size: int,
    num_workers: int,
    precision: str,
    rpn_top_k: int,
    rpn_nms_iou: float,
    quiet: bool,
) -> list[Any]:
    """Records (detections + paper proposals) for every image of ``dataset``."""
    import torch
    from rich.console import Console
    from rich.progress import Progress
    from torch.utils.data import DataLoader

    from coorddet.data import collate_detection
    from coorddet.inference import predict_with_proposals
    from coorddet.system import ThreadGovernor

    loader = DataLoader(
        dataset, batch_size=batch_size, collate_fn=collate_detection, num_workers=num_workers
    )
    model.to(device)
    records = []
    governor = ThreadGovernor(active=None if device.type == "cpu" else False)
    started = time.perf_counter()
    console = Console(stderr=True)  # stdout keeps only the results; no bar in CI logs
    bar = Progress(console=console, disable=quiet or not console.is_terminal, transient=True)
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    with bar as progress, torch.inference_mode(), bf16:
        task = progress.add_task(f"{label}: inference", total=len(dataset))
        for images, targets in loader:
            records += predict_with_proposals(
                model,
                [image.to(device) for image in images],
                image_ids=[int(t["image_id"]) for t in targets],
                top_k=rpn_top_k,
                nms_iou=rpn_nms_iou,
            )
            progress.advance(task, len(images))
            governor.step()  # a busy neighbour takes a thread, not 10x the time
    seconds = time.perf_counter() - started
    if not quiet:
        print(f"{label}: {len(dataset)} images in {seconds:.1f} s "
              f"({len(dataset) / seconds:.1f} img/s, batch {batch_size}, {device})")  # fmt: skip
    return records


def _unique_name(name: str, seed: Any, taken: Sequence[str]) -> str:
    suffixes = ([f"-s{seed}"] if seed is not None else []) + [f"-{i}" for i in range(2, 10_000)]
    return next(c for c in [name, *(name + s for s in suffixes)] if c not in taken)


def _json_ready(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: None if v is None or math.isnan(v) else float(v) for k, v in metrics.items()}


@dataclass(frozen=True)
class EvaluationResult:
    """What :func:`evaluate` wrote, for a summary: ``metrics`` is ``metrics.json``'s content."""

    out: Path
    metrics: dict[str, dict[str, float | None]]
    baseline: str | None  # the first checkpoint without CoordConv
    compared: list[str]  # every other run
    groups: dict[str, Any] | None  # groups.json's content (group=True)
    group_baseline: str | None


def evaluate(
    *,
    data: str | Path,
    out: str | Path,
    split: str = "test",
    checkpoints: Sequence[str | Path] = (),
    predictions: Sequence[tuple[str, str | Path]] = (),
    group: bool = False,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str = "auto",
    precision: str = "32-true",
    score_thresh: float = EvalConfig.score_thresh,
    rpn_top_k: int = EvalConfig.rpn_top_k,
    rpn_nms_iou: float = EvalConfig.rpn_nms_iou,
    trust_checkpoint: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> EvaluationResult:
    """Score every checkpoint and predictions file on ``data``'s ``split``; write the report.

    Args:
        data, split: the dataset folder and the split scored.
        out: the report folder; refused if it exists, is not empty and not ``overwrite``.
        checkpoints: ``train.py`` checkpoints (``best.ckpt``, ``last.ckpt``).
        predictions: ``(name, file)`` pairs: another detector's COCO results files.
        group: aggregate runs of the same name (seeds) into mean, std and a 95% CI.
        batch_size, device: inference (``"auto"``: CUDA when there is one).
        precision: ``"32-true"``, or ``"bf16-mixed"``: inference under ``torch.autocast``
            with bfloat16, as Lightning's ``bf16-mixed`` validates (faster on CPUs with
            AVX512_BF16 or AMX; see README "Speed" for its accuracy cost).
        num_workers: DataLoader workers decoding images; ``None``: 0 for a split decoded into
            memory, :data:`LAZY_WORKERS` for one decoded lazily (:mod:`coorddet.data`).
        score_thresh, rpn_top_k, rpn_nms_iou: the metric settings (:class:`EvalConfig`).
        trust_checkpoint: allow checkpoints that hold Python objects (can run code).
        quiet: no progress bar or timing lines.

    The folder ``out`` is held (:func:`coorddet.locking.hold_folder`) while it is written.
    """
    check_int("batch_size", batch_size, error=UserError)
    if num_workers is not None:
        check_int("num_workers", num_workers, 0, error=UserError)
    check_choice("precision", precision, PRECISIONS, error=UserError)
    check_int("rpn_top_k", rpn_top_k, error=UserError)
    check_number("score_thresh", score_thresh, 0.0, 1.0, error=UserError)
    check_number("rpn_nms_iou", rpn_nms_iou, 1e-9, 1.0, error=UserError)
    out, data = Path(out), Path(data)
    with hold_folder(out):
        paths = [path for _, path in predictions]
        _check_out(out, overwrite=overwrite, inputs=[data, *checkpoints, *paths])
        outside = [_read_predictions_json(path) for path in paths]
        for path in checkpoints:
            if not Path(path).is_file():
                raise UserError(f"checkpoint not found: {path}")
        require_dataset(data, [split], flag="--data")

        from coorddet.checkpoint import load_checkpoint

        torch_device = _device(device)
        loaded = [load_checkpoint(path, trust=trust_checkpoint) for path in checkpoints]

        from coorddet.data import CocoDataset
        from coorddet.metrics import evaluate_records, ground_truth, per_gt_ious
        from coorddet.models import is_rpn_only
        from coorddet.plots import plot_detections, plot_iou_distribution
        from coorddet.predictions import ImagePrediction, to_coco_results, with_category_ids
        from coorddet.report import aggregate_groups, render_report, staged_dir

        dataset = CocoDataset(data, split)
        if num_workers is None:
            num_workers = 0 if dataset.in_memory else min(LAZY_WORKERS, os.cpu_count() or 1)
        for checkpoint in loaded:
            checkpoint.check_categories(dataset.categories, f"{dataset.root} split {dataset.split}")
        outside_records = [
            _outside_records(results, path, dataset)
            for results, path in zip(outside, paths, strict=True)
        ]

        runs: dict[str, list[Any]] = {}
        sources: dict[str, str] = {}
        groups: dict[str, list[str]] = {}
        proposals_only: set[str] = set()  # RPN-only: rpn_iou alone, detection metrics null
        baseline = None
        sizes = {(image["width"], image["height"]) for image in dataset.coco.imgs.values()}
        for checkpoint in loaded:
            group_name = re.sub(r"[^A-Za-z0-9._+-]+", "_", checkpoint.name).lstrip("._-") or "run"
            name = _unique_name(group_name, checkpoint.seed, list(runs))
            model = checkpoint.build_model()
            if is_rpn_only(model):
                proposals_only.add(name)
            records = _predict(
                model, dataset, torch_device, name, batch_size=batch_size,
                num_workers=num_workers, precision=precision, rpn_top_k=rpn_top_k,
                rpn_nms_iou=rpn_nms_iou, quiet=quiet,
            )  # fmt: skip
            runs[name] = with_category_ids(records, checkpoint.category_ids)
            sources[name] = f"`{checkpoint.path}` ({checkpoint.describe(sizes)})"
            groups.setdefault(group_name, []).append(name)
            if baseline is None and not checkpoint.coordconv:
                baseline = name
        for records, (given, path) in zip(outside_records, predictions, strict=True):
            name = _unique_name(given, None, list(runs))
            runs[name] = records
            sources[name] = f"`{path}` (outside predictions)"
            groups.setdefault(given, []).append(name)

        ids = dataset.image_ids
        gts = ground_truth(dataset.coco, ids)
        metrics = {
            name: _json_ready(
                evaluate_records(
                    dataset.coco,
                    records,
                    image_ids=ids,
                    score_thresh=score_thresh,
                    detections=name not in proposals_only,
                )
            )
            for name, records in runs.items()
        }
        aggregated = aggregate_groups(metrics, groups) if group else None
        group_baseline = next((g for g, names in groups.items() if baseline in names), None)
        compared = [name for name in runs if name != baseline]

        with staged_dir(out) as tmp:
            write_json_atomic(tmp / "metrics.json", metrics, allow_nan=False)
            for name, records in runs.items():
                write_json_atomic(
                    tmp / f"predictions_{name}.json", to_coco_results(records), allow_nan=False
                )
            if aggregated is not None:
                write_json_atomic(tmp / "groups.json", aggregated, allow_nan=False)
            sample = ids[:: max(len(ids) // PLOT_SAMPLES, 1)][:PLOT_SAMPLES]
            index = {image_id: i for i, image_id in enumerate(ids)}
            by_id = {name: {r.image_id: r for r in records} for name, records in runs.items()}
            plot_detections(
                [(dataset[index[i]][0][0] * 255).round().byte().numpy() for i in sample],
                [gts[i] for i in sample],
                {n: [by_id[n].get(i) or ImagePrediction.empty(i) for i in sample] for n in runs},
                tmp / PLOTS[0],
                score_thresh=score_thresh,
                categories={int(c["id"]): str(c["name"]) for c in dataset.categories},
            )
            plot_iou_distribution(
                {
                    name: per_gt_ious(records, gts, score_thresh=score_thresh).numpy()
                    for name, records in runs.items()
                },
                tmp / PLOTS[1],
            )
            report = render_report(
                runs=metrics,
                baseline=baseline,
                compared=compared,
                sources=sources,
                data=str(data),
                split=split,
                settings={
                    "score_thresh": score_thresh,
                    "rpn_top_k": rpn_top_k,
                    "rpn_nms_iou": rpn_nms_iou,
                },
                groups=aggregated,
                group_baseline=group_baseline,
                plots=PLOTS,
            )
            write_text_atomic(tmp / "report.md", report)
        return EvaluationResult(out, metrics, baseline, compared, aggregated, group_baseline)
