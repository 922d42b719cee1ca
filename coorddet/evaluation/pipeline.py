"""``evaluate(...)``: predict -> score -> write for checkpoints and outside detections.

    from coorddet.evaluation import evaluate
    evaluate(data="data/demo", split="test", out="reports/demo", checkpoints=[...])

is what ``python -m coorddet.evaluate`` runs (flags of the same names). Run names come from
each checkpoint's config (``baseline``, ``coordconv``); clashing names get the seed appended
(``baseline-s1``), then a counter. The baseline is the first checkpoint without CoordConv.
``predictions=[(NAME, FILE)]`` adds detections from any other detector in the COCO results
format; images it has no detections for count as misses. Cheap checks (paths, JSON) run
before torch is imported, so mistakes fail fast; one process at a time writes ``out``
(:func:`coorddet.locking.hold_folder`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coorddet.config import EvalConfig
from coorddet.dataset_layout import require_dataset
from coorddet.errors import UserError
from coorddet.evaluation.inputs import (
    check_out,
    outside_records,
    read_predictions_json,
    unique_name,
)
from coorddet.locking import hold_folder
from coorddet.validate import check_choice, check_int, check_number

LAZY_WORKERS = 4  # default DataLoader workers for a split decoded lazily
PRECISIONS = ("32-true", "bf16-mixed")


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
    compile_models: bool = False,
) -> EvaluationResult:
    """Score every checkpoint and predictions file on ``data``'s ``split``; write the report.

    Args:
        data, split: the dataset folder and the split scored.
        out: the report folder; refused if it exists, is not empty and not ``overwrite``.
        checkpoints: ``train.py`` checkpoints (``best.ckpt``, ``last.ckpt``).
        predictions: ``(name, file)`` pairs: another detector's COCO results files.
        group: aggregate runs of the same name (seeds) into mean, std and a 95% CI.
        batch_size, device: inference (``"auto"``: CUDA when there is one).
        precision: ``"32-true"``, or ``"bf16-mixed"``: inference under bfloat16 autocast.
        num_workers: DataLoader workers decoding images; ``None``: 0 for a split decoded into
            memory, :data:`LAZY_WORKERS` for one decoded lazily (:mod:`coorddet.data`).
        score_thresh, rpn_top_k, rpn_nms_iou: the metric settings (:class:`EvalConfig`).
        trust_checkpoint: allow checkpoints that hold Python objects (can run code).
        quiet: no progress bar or timing lines; compile_models: ``torch.compile`` backbones.
    """
    _check_settings(batch_size, num_workers, precision, rpn_top_k, score_thresh, rpn_nms_iou)
    out, data = Path(out), Path(data)
    with hold_folder(out):
        paths = [path for _, path in predictions]
        check_out(out, overwrite=overwrite, inputs=[data, *checkpoints, *paths])
        outside = [read_predictions_json(path) for path in paths]
        for path in checkpoints:
            if not Path(path).is_file():
                raise UserError(f"checkpoint not found: {path}")
        require_dataset(data, [split], flag="--data")

        from coorddet.checkpoint import load_checkpoint
        from coorddet.evaluation.prediction import resolve_device

        torch_device = resolve_device(device)
        loaded = [load_checkpoint(path, trust=trust_checkpoint) for path in checkpoints]

        from coorddet.data import CocoDataset

        dataset = CocoDataset(data, split)
        if num_workers is None:
            num_workers = 0 if dataset.in_memory else min(LAZY_WORKERS, os.cpu_count() or 1)
        for checkpoint in loaded:
            checkpoint.check_categories(dataset.categories, f"{dataset.root} split {dataset.split}")
        outside_runs = [
            (name, path, outside_records(results, path, dataset))
            for results, (name, path) in zip(outside, predictions, strict=True)
        ]
        settings = {
            "score_thresh": score_thresh,
            "rpn_top_k": rpn_top_k,
            "rpn_nms_iou": rpn_nms_iou,
        }
        inference = {"batch_size": batch_size, "num_workers": num_workers, "device": torch_device,
                     "precision": precision, "rpn_top_k": rpn_top_k, "rpn_nms_iou": rpn_nms_iou,
                     "quiet": quiet, "compile_models": compile_models}  # fmt: skip
        comparison = _compare(loaded, outside_runs, dataset, inference, settings, group=group)

        from coorddet.evaluation.reporting import write_report

        write_report(out, comparison, dataset)
        return EvaluationResult(out, comparison.metrics, comparison.baseline,
                                comparison.compared, comparison.groups,
                                comparison.group_baseline)  # fmt: skip


def _check_settings(
    batch_size: int,
    num_workers: int | None,
    precision: str,
    rpn_top_k: int,
    score_thresh: float,
    rpn_nms_iou: float,
) -> None:
    check_int("batch_size", batch_size, error=UserError)
    if num_workers is not None:
        check_int("num_workers", num_workers, 0, error=UserError)
    check_choice("precision", precision, PRECISIONS, error=UserError)
    check_int("rpn_top_k", rpn_top_k, error=UserError)
    check_number("score_thresh", score_thresh, 0.0, 1.0, error=UserError)
    check_number("rpn_nms_iou", rpn_nms_iou, 1e-9, 1.0, error=UserError)


def _compare(
    loaded: Sequence[Any],
    outside_runs: Sequence[tuple[str, Any, list[Any]]],
    dataset: Any,
    inference: dict[str, Any],
    settings: dict[str, Any],
    *,
    group: bool,
) -> Any:
    """Predict with every checkpoint, add the outside runs, score them all: a Comparison.
    When any run has instance masks, every run is also scored on masks (``segm_*``)."""
    from coorddet.evaluation.prediction import predict
    from coorddet.evaluation.reporting import Comparison
    from coorddet.evaluation.scoring import score_per_class, score_runs
    from coorddet.models import is_rpn_only
    from coorddet.predictions import check_segmentation_sizes, with_category_ids
    from coorddet.report import aggregate_groups

    image_sizes = {i: (image["height"], image["width"]) for i, image in dataset.coco.imgs.items()}
    for _, path, records in outside_runs:  # before the checkpoints' inference: fail fast
        try:
            check_segmentation_sizes(records, image_sizes)
        except UserError as error:
            raise UserError(f"--predictions {path}: {error}") from None
    runs: dict[str, list[Any]] = {}
    sources: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    without_detections: set[str] = set()  # RPN-only: rpn_iou alone, detection metrics null
    baseline = None
    for checkpoint in loaded:
        group_name = re.sub(r"[^A-Za-z0-9._+-]+", "_", checkpoint.name).lstrip("._-") or "run"
        name = unique_name(group_name, checkpoint.seed, list(runs))
        model = checkpoint.build_model()
        if inference.get("compile_models"):
            from coorddet.compiling import compile_backbone

            compile_backbone(model)
        if is_rpn_only(model):
            without_detections.add(name)
        options = {k: v for k, v in inference.items() if k != "compile_models"}
        records = predict(model, dataset, label=name, **options)
        runs[name] = with_category_ids(records, checkpoint.category_ids)
        sources[name] = f"`{checkpoint.path}` ({checkpoint.describe(dataset.image_sizes)})"
        groups.setdefault(group_name, []).append(name)
        if baseline is None and not checkpoint.coordconv:
            baseline = name
    for given, path, records in outside_runs:
        name = unique_name(given, None, list(runs))
        runs[name] = records
        sources[name] = f"`{path}` (outside predictions)"
        groups.setdefault(given, []).append(name)
    scoring = {"image_ids": dataset.image_ids, "score_thresh": settings["score_thresh"],
               "without_detections": without_detections}  # fmt: skip
    metrics: dict[str, Any] = score_runs(dataset.coco, runs, **scoring)
    for name, per_class in score_per_class(dataset.coco, runs, **scoring).items():
        metrics[name]["per_class"] = per_class
    return Comparison(
        runs=runs,
        metrics=metrics,
        sources=sources,
        baseline=baseline,
        groups=aggregate_groups(metrics, groups) if group else None,
        group_baseline=next((g for g, names in groups.items() if baseline in names), None),
        settings=settings,
    )
