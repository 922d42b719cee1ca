"""Report plots: detections side by side on the same canvases, per-ground-truth IoU curves, the
confusion matrix; and one image with its detections drawn at its own size (``coorddet.predict
--draw``).

Uses matplotlib's object API (``Figure``, no pyplot): no display, no global backend switch;
single images are drawn with Pillow, pixel for pixel. Files are written whole (temp file +
rename).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

CELL_INCHES = 2.2
GT_COLOR = "#4cff4c"
DET_COLOR = "#ff7f0e"
LABEL_BOX = {"facecolor": "black", "alpha": 0.6, "pad": 0.5, "linewidth": 0}  # text inside the box


def plot_detections(
    images: Sequence[np.ndarray],
    gts: Sequence[tuple[Any, Any]],
    runs: Mapping[str, Sequence[Any]],
    path: str | Path,
    *,
    score_thresh: float = 0.5,
    categories: Mapping[int, str] | None = None,
) -> Path:
    """A grid PNG: one row per canvas; columns ground truth, then each run.

    Args:
        images: ``H x W`` uint8 canvases.
        gts: per canvas ``(boxes, labels)``: ``(K, 4)`` xyxy pixels, ``(K,)`` category ids
            (tensors or arrays).
        runs: run name -> records (``coorddet.predictions.ImagePrediction``), ``runs[name][i]``
            being the prediction for ``images[i]``; detections below ``score_thresh`` are hidden.
        categories: category id -> name; default ``str(id - 1)`` (data_gen's digits).
    Returns the path written.
    """
    names = dict(categories) if categories is not None else {}
    columns = ["ground truth", *runs]
    rows = max(len(images), 1)
    fig = Figure(figsize=(CELL_INCHES * len(columns), CELL_INCHES * rows), dpi=100)
    axes = fig.subplots(rows, len(columns), squeeze=False)
    for row, image in enumerate(images):
        height, width = image.shape[:2]
        panels = [(np.asarray(gts[row][0]), np.asarray(gts[row][1]), None)]
        for predictions in runs.values():
            record = predictions[row]
            keep = np.asarray(record.scores) >= score_thresh
            boxes, labels, scores = (
                np.asarray(t)[keep] for t in (record.boxes, record.labels, record.scores)
            )
            panels.append((boxes, labels, scores))
        for column, (boxes, labels, scores) in enumerate(panels):
            ax = axes[row, column]
            # extent: pixel i covers [i, i + 1], as box coordinates do
            ax.imshow(image, cmap="gray", vmin=0, vmax=255, extent=(0, width, height, 0))
            color = GT_COLOR if scores is None else DET_COLOR
            for index, (box, label) in enumerate(
                zip(boxes.reshape(-1, 4), labels.reshape(-1), strict=True)
            ):
                x1, y1, x2, y2 = (float(v) for v in box)
                ax.add_patch(
                    Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=1)
                )
                text = names.get(int(label), str(int(label) - 1))
                if scores is not None:
                    text += f" {float(scores[index]):.2f}"
                ax.text(
                    x1, y1, text, color=color, fontsize=7, va="top", clip_on=True, bbox=LABEL_BOX
                )
            ax.set_axis_off()
            if row == 0:
                ax.set_title(columns[column], fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_iou_distribution(per_gt_ious_by_run: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Histogram and CDF PNG of each run's per-ground-truth best IoU (``(G,)`` values in [0, 1]).

    Returns the path written.
    """
    fig = Figure(figsize=(10, 4), dpi=100)
    histogram, cdf = fig.subplots(1, 2)
    bins = np.linspace(0.0, 1.0, 21)
    for name, values in per_gt_ious_by_run.items():
        values = np.sort(np.asarray(values, dtype=float).reshape(-1))
        if len(values) == 0:
            continue
        label = f"{name} (mean {values.mean():.3f}, n={len(values)})"
        histogram.hist(values, bins=bins, histtype="step", linewidth=1.5, label=label)
        fraction = np.arange(1, len(values) + 1) / len(values)
        cdf.step(
            np.concatenate([[0.0], values]),
            np.concatenate([[0.0], fraction]),
            where="post",
            label=label,
        )
    histogram.set(xlabel="best IoU per ground-truth box", ylabel="boxes", xlim=(0, 1))
    cdf.set(
        xlabel="best IoU per ground-truth box",
        ylabel="fraction of boxes <= IoU",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    for ax in (histogram, cdf):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(
    matrices: Mapping[str, np.ndarray], names: Sequence[str], path: str | Path
) -> Path:
    """One panel per run: counts of true (rows) against predicted (columns) categories,
    ``names`` in matrix order (background last). Returns the path written."""
    size = max(3.0, 0.45 * len(names) + 1.5)
    fig = Figure(figsize=(size * max(len(matrices), 1), size), dpi=100)
    axes = fig.subplots(1, max(len(matrices), 1), squeeze=False)[0]
    for ax, (run, matrix) in zip(axes, matrices.items(), strict=False):
        ax.imshow(np.log1p(matrix), cmap="Blues")
        for (row, column), count in np.ndenumerate(matrix):
            if count:
                ax.text(column, row, str(count), ha="center", va="center", fontsize=6)
        ticks = np.arange(len(names))
        ax.set_xticks(ticks, names, rotation=90, fontsize=7)
        ax.set_yticks(ticks, names, fontsize=7)
        ax.set(xlabel="predicted", ylabel="true", title=run)
    fig.tight_layout()
    return _save(fig, path)


def draw_detections(
    pixels: np.ndarray,
    record: Any,
    path: str | Path,
    *,
    categories: Mapping[int, str],
    score_thresh: float = 0.5,
) -> Path:
    """A PNG of ``pixels`` (uint8 ``(H, W)`` or ``(H, W, 3)``) at its own size, in colour,
    with ``record``'s detections scoring at least ``score_thresh`` (an
    ``ImagePrediction``, category ids) as boxes labelled ``name score``."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(pixels).convert("RGB")
    drawing = ImageDraw.Draw(image)
    keep = np.asarray(record.scores) >= score_thresh
    boxes, labels, scores = (
        np.asarray(t)[keep] for t in (record.boxes, record.labels, record.scores)
    )
    for box, label, score in zip(boxes.reshape(-1, 4), labels, scores, strict=True):
        x1, y1, x2, y2 = (float(v) for v in box)
        drawing.rectangle((x1, y1, x2, y2), outline=DET_COLOR, width=1)
        text = f"{categories.get(int(label), str(int(label)))} {float(score):.2f}"
        left, top, right, bottom = drawing.textbbox((x1, y1), text)
        drawing.rectangle((left, top, right, bottom), fill="black")
        drawing.text((x1, y1), text, fill=DET_COLOR)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(temporary, format="PNG")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(temporary, format="png")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
