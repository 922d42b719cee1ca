"""Compare runs: relative changes, seed aggregation (mean, std, 95% CI) and ``report.md``.

Metric values may be ``None`` (undefined, e.g. ``map_large`` when no digit is large, or
``rpn_iou`` for an outside detector without proposals): they are shown as ``-`` and never
averaged as numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from coorddet.metrics import METRIC_KEYS

Metrics = Mapping[str, float | None]

# Two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30; beyond, the normal 1.96 is
# within 2%. A table keeps scipy out of the dependencies for one number.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def t_quantile_975(df: int) -> float:
    return _T975[df - 1] if df <= len(_T975) else 1.96


def aggregate(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample std and the 95% t-interval of the defined ``values``."""
    defined = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(defined)
    if n == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    mean = sum(defined) / n
    if n == 1:
        return {"mean": mean, "std": None, "ci95": None, "n": 1}
    std = math.sqrt(sum((v - mean) ** 2 for v in defined) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "n": n}


def aggregate_groups(
    runs: Mapping[str, Metrics], groups: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{group: {metric: aggregate}}`` over the runs listed for each group."""
    return {
        group: {key: aggregate([runs[name].get(key) for name in names]) for key in METRIC_KEYS}
        for group, names in groups.items()
    }


def relative_change(value: float | None, reference: float | None) -> float | None:
    """``(value - reference) / reference`` or ``None`` when undefined."""
    if value is None or reference is None or reference == 0:
        return None
    if math.isnan(value) or math.isnan(reference):
        return None
    return (value - reference) / abs(reference)


def _number(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def _percent(change: float | None) -> str:
    return "-" if change is None else f"{change * 100:+.1f}%"


def metrics_table(
    columns: Mapping[str, Metrics], baseline: str | None, compared: Sequence[str]
) -> list[str]:
    """Markdown rows: metrics as rows, runs as columns, then `<run> vs <baseline>` changes."""
    names = list(columns)
    change_names = [n for n in compared if baseline is not None and n != baseline]
    header = ["metric", *names, *(f"{n} vs {baseline}" for n in change_names)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in METRIC_KEYS:
        cells = [key, *(_number(columns[n].get(key)) for n in names)]
        cells += [
            _percent(relative_change(columns[n].get(key), columns[baseline].get(key)))
            for n in change_names
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def group_table(groups: Mapping[str, Mapping[str, dict[str, Any]]], baseline: str | None) -> list[str]:
    """Markdown rows: per metric, mean +- std [95% CI] (n) per group, and the change of means."""
    names = list(groups)
    others = [n for n in names if baseline is not None and n != baseline]
    header = ["metric", *names, *(f"{n} vs {baseline}" for n in others)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in METRIC_KEYS:
        cells = [key]
        for name in names:
            stats = groups[name][key]
            if stats["mean"] is None:
                cells.append("-")
            elif stats["std"] is None:
                cells.append(f"{stats['mean']:.4f} (n=1)")
            else:
                low, high = stats["ci95"]
                cells.append(
                    f"{stats['mean']:.4f} ± {stats['std']:.4f} [{low:.4f}, {high:.4f}] "
                    f"(n={stats['n']})"
                )
        for name in others:
            change = relative_change(groups[name][key]["mean"], groups[baseline][key]["mean"])
            cells.append(_percent(change))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_report(
    *,
    runs: Mapping[str, Metrics],
    baseline: str | None,
    coordconv_runs: Sequence[str],
    sources: Mapping[str, str],
    data: str,
    split: str,
    settings: Mapping[str, Any],
    groups: Mapping[str, Mapping[str, dict[str, Any]]] | None = None,
    group_baseline: str | None = None,
    plots: Sequence[str] = (),
) -> str:
    """The whole ``report.md`` text."""
    lines = ["# coorddet evaluation report", ""]
    lines += [f"- dataset: `{data}`, split `{split}`"]
    lines += [f"- {name}: `{source}`" for name, source in sources.items()]
    lines += ["- settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), ""]
    if groups:
        lines += ["## Seeds aggregated (mean ± std [95% CI])", ""]
        lines += group_table(groups, group_baseline) + [""]
    lines += ["## Runs", ""]
    lines += metrics_table(runs, baseline, coordconv_runs) + [""]
    lines += [
        "rpn_iou: mean best IoU of the RPN's top proposals after NMS (the paper's metric); "
        "det_iou: mean best IoU of detections with score >= score_thresh; gt_iou: mean best "
        "same-class IoU of each ground-truth box (0 when missed); map*/mar*: pycocotools "
        "COCOeval. Changes are relative to the baseline.",
        "",
    ]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)
