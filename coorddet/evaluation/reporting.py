"""Evaluation, stage three: scored runs -> the report folder, written whole or not at all.

Writes ``metrics.json``, ``predictions_<run>.json`` (COCO results), ``groups.json`` (seeds
aggregated), ``detections.png``, ``iou_distribution.png``, ``confusion.png`` and ``report.md`` into a hidden
sibling folder that replaces ``out`` only once everything is written
(:func:`coorddet.report.staged_dir`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coorddet.class_metrics import category_names, confusion_matrix
from coorddet.data import CocoDataset
from coorddet.fileio import write_json_atomic, write_text_atomic
from coorddet.metrics import ground_truth, per_gt_ious
from coorddet.plots import plot_confusion, plot_detections, plot_iou_distribution
from coorddet.predictions import ImagePrediction, to_coco_results
from coorddet.report import render_report, staged_dir

PLOT_SAMPLES = 6  # canvases drawn in detections.png
PLOTS = ("detections.png", "iou_distribution.png", "confusion.png")


@dataclass(frozen=True)
class Comparison:
    """Scored runs, ready to write: each run's predictions (dataset category ids), metrics
    (``None`` where undefined) and source line; which run is the baseline; seeds aggregated
    per group (``groups.json``'s content) when asked for."""

    runs: dict[str, list[ImagePrediction]]
    metrics: dict[str, dict[str, float | None]]
    sources: dict[str, str]
    baseline: str | None
    groups: dict[str, Any] | None = None
    group_baseline: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # the metric settings, for the report

    @property
    def compared(self) -> list[str]:
        """Every run but the baseline."""
        return [name for name in self.runs if name != self.baseline]


def write_report(out: str | Path, comparison: Comparison, dataset: CocoDataset) -> Path:
    """Write ``comparison`` on ``dataset`` (its ground truth and canvases) into ``out``."""
    out = Path(out)
    with staged_dir(out) as tmp:
        write_json_atomic(tmp / "metrics.json", comparison.metrics, allow_nan=False)
        for name, records in comparison.runs.items():
            results = to_coco_results(records)
            write_json_atomic(tmp / f"predictions_{name}.json", results, allow_nan=False)
        if comparison.groups is not None:
            write_json_atomic(tmp / "groups.json", comparison.groups, allow_nan=False)
        _plot(tmp, comparison, dataset)
        report = render_report(
            runs=comparison.metrics,
            baseline=comparison.baseline,
            compared=comparison.compared,
            sources=comparison.sources,
            data=str(dataset.root),
            split=dataset.split,
            settings=comparison.settings,
            groups=comparison.groups,
            group_baseline=comparison.group_baseline,
            plots=PLOTS,
        )
        write_text_atomic(tmp / "report.md", report)
    return out


def _plot(folder: Path, comparison: Comparison, dataset: CocoDataset) -> None:
    """``detections.png`` (the same canvases for every run) and ``iou_distribution.png``."""
    ids = dataset.image_ids
    gts = ground_truth(dataset.coco, ids)
    score_thresh = comparison.settings.get("score_thresh", 0.5)
    sample = ids[:: max(len(ids) // PLOT_SAMPLES, 1)][:PLOT_SAMPLES]
    index = {image_id: i for i, image_id in enumerate(ids)}
    by_id = {name: {r.image_id: r for r in records} for name, records in comparison.runs.items()}
    plot_detections(
        [(dataset[index[i]][0][0] * 255).round().byte().numpy() for i in sample],
        [gts[i] for i in sample],
        {n: [by_id[n].get(i) or ImagePrediction.empty(i) for i in sample] for n in by_id},
        folder / PLOTS[0],
        score_thresh=score_thresh,
        categories={int(c["id"]): str(c["name"]) for c in dataset.categories},
    )
    ious = {
        name: per_gt_ious(records, gts, score_thresh=score_thresh).numpy()
        for name, records in comparison.runs.items()
    }
    plot_iou_distribution(ious, folder / PLOTS[1])
    names = category_names(dataset.categories)
    matrices = {
        name: confusion_matrix(records, gts, list(names), score_thresh=score_thresh)
        for name, records in comparison.runs.items()
    }
    plot_confusion(matrices, [*names.values(), "background"], folder / PLOTS[2])
