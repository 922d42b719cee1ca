"""Compare runs and write the report folder.

Relative changes against the baseline, seed aggregation (mean, sample std, 95% Student-t
confidence interval), the markdown tables of ``report.md``, and :func:`staged_dir`, which
builds the report in a hidden sibling folder and moves it into place whole.

Metric values may be ``None`` (undefined, e.g. ``map_large`` when no digit is large, or
``rpn_iou`` for an outside detector without proposals): they are shown as ``-`` and never
averaged as numbers. The rows are :data:`coorddet.metrics.METRIC_KEYS`, then the mask AP keys
(:data:`coorddet.metrics.SEGM_KEYS`) when the runs were scored on masks.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from coorddet.fileio import named
from coorddet.metrics import METRIC_KEYS, SEGM_KEYS

Metrics = Mapping[str, float | None]

# Two-sided 95% Student-t quantiles t(0.975, df) for df = 1..9. From df = 10 on, the
# Cornish-Fisher expansion below matches them to 5 decimals; no scipy for one number.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622)
_Z975 = 1.959963984540054  # the normal quantile


def t_quantile_975(df: int) -> float:
    """``t(0.975, df)``: the 95% two-sided Student-t quantile for ``df >= 1`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
        + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * df**4)
    )


def aggregate(values: Sequence[float | None]) -> dict[str, Any]:
    """``{mean, std, ci95: [low, high], n}`` of the defined ``values`` (``None``/NaN skipped).

    ``std`` is the sample standard deviation (n - 1); ``ci95`` is
    ``mean -+ t(0.975, n - 1) * std / sqrt(n)``. ``std`` and ``ci95`` are ``None`` for n < 2.
    """
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


def metric_keys(columns: Mapping[str, Mapping[str, Any]]) -> tuple[str, ...]:
    """The rows for ``columns`` (run or group -> metrics): ``METRIC_KEYS``, and ``SEGM_KEYS``
    when any column has them (runs scored on masks)."""
    masks = any(key in metrics for metrics in columns.values() for key in SEGM_KEYS)
    return METRIC_KEYS + SEGM_KEYS if masks else METRIC_KEYS


def aggregate_groups(
    runs: Mapping[str, Metrics], groups: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{group: {metric: aggregate}}`` over the runs listed for each group."""
    keys = metric_keys(runs)
    return {
        group: {key: aggregate([runs[name].get(key) for name in names]) for key in keys}
        for group, names in groups.items()
    }


def relative_change(value: float | None, reference: float | None) -> float | None:
    """``(value - reference) / |reference|``; ``None`` when either is undefined or it is 0."""
    if value is None or reference is None or reference == 0:
        return None
    if math.isnan(value) or math.isnan(reference):
        return None
    return (value - reference) / abs(reference)


def format_number(value: float | None) -> str:
    """``0.1234``, or ``-`` for an undefined value."""
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def format_percent(change: float | None) -> str:
    """A relative change as ``+1.2%``, or ``-`` when undefined."""
    return "-" if change is None else f"{change * 100:+.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def metrics_table(
    columns: Mapping[str, Metrics], baseline: str | None, compared: Sequence[str]
) -> list[str]:
    """Markdown lines: metrics as rows, runs as columns, then one `<run> vs <baseline>` column
    of relative changes for each run of ``compared`` (none without a baseline)."""
    names = list(columns)
    others = [n for n in compared if baseline is not None and n != baseline]
    header = ["metric", *names, *(f"{n} vs {baseline}" for n in others)]
    rows = []
    for key in metric_keys(columns):
        cells = [key, *(format_number(columns[n].get(key)) for n in names)]
        cells += [
            format_percent(relative_change(columns[n].get(key), columns[baseline].get(key)))
            for n in others
        ]
        rows.append(cells)
    return _table(header, rows)


def per_class_table(
    columns: Mapping[str, Mapping[str, Any]], baseline: str | None, compared: Sequence[str]
) -> list[str]:
    """Markdown lines: one row per category and per-class metric (``map``, ``map_50``,
    ``gt_iou``), runs as columns, then each compared run's change against ``baseline``; no
    lines when no run has ``per_class``."""
    names = [n for n in columns if "per_class" in columns[n]]
    if not names:
        return []
    others = [n for n in compared if baseline in names and n != baseline and n in names]
    header = ["category", "metric", *names, *(f"{n} vs {baseline}" for n in others)]
    rows = []
    for category, values in columns[names[0]]["per_class"].items():
        for key in values:
            cells = [category, key]
            cells += [format_number(columns[n]["per_class"][category].get(key)) for n in names]
            cells += [
                format_percent(relative_change(columns[n]["per_class"][category].get(key),
                                               columns[baseline]["per_class"][category].get(key)))
                for n in others
            ]  # fmt: skip
            rows.append(cells)
    return _table(header, rows)


def format_stats(stats: Mapping[str, Any], digits: int = 4, *, spread: bool = True) -> str:
    """An :func:`aggregate`'s mean, std and 95% CI: ``0.1234 ± 0.0100 [0.1000, 0.1500] (n=3)``
    (``spread=False``: ``0.1234 [0.1000, 0.1500]``), or ``-`` when undefined."""
    if stats["mean"] is None:
        return "-"
    mean = f"{stats['mean']:.{digits}f}"
    if stats["ci95"] is None:
        return f"{mean} (n=1)" if spread else mean
    low, high = (f"{bound:.{digits}f}" for bound in stats["ci95"])
    if not spread:
        return f"{mean} [{low}, {high}]"
    return f"{mean} ± {stats['std']:.{digits}f} [{low}, {high}] (n={stats['n']})"


def group_table(
    groups: Mapping[str, Mapping[str, dict[str, Any]]], baseline: str | None
) -> list[str]:
    """Markdown lines: per metric, ``mean ± std [95% CI] (n)`` per group, and the relative change
    of each group's mean against the ``baseline`` group's."""
    names = list(groups)
    others = [n for n in names if baseline is not None and n != baseline]
    header = ["metric", *names, *(f"{n} vs {baseline}" for n in others)]
    rows = []
    for key in metric_keys(groups):
        cells = [key, *(format_stats(groups[n][key]) for n in names)]
        cells += [
            format_percent(relative_change(groups[n][key]["mean"], groups[baseline][key]["mean"]))
            for n in others
        ]
        rows.append(cells)
    return _table(header, rows)


def render_report(
    *,
    runs: Mapping[str, Metrics],
    baseline: str | None,
    compared: Sequence[str],
    sources: Mapping[str, str],
    data: str,
    split: str,
    settings: Mapping[str, Any],
    groups: Mapping[str, Mapping[str, dict[str, Any]]] | None = None,
    group_baseline: str | None = None,
    plots: Sequence[str] = (),
) -> str:
    """The whole ``report.md`` text. ``sources``: run name -> where it came from."""
    lines = ["# coorddet evaluation report", ""]
    lines += [f"- dataset: `{data}`, split `{split}`"]
    lines += [f"- {name}: {source}" for name, source in sources.items()]
    lines += ["- settings: " + ", ".join(f"{k}={v}" for k, v in settings.items())]
    reference = f"`{baseline}`" if baseline else "none (no checkpoint without CoordConv)"
    lines += [f"- changes are relative to the baseline run: {reference}", ""]
    if groups:
        lines += ["## Seeds aggregated (mean ± std [95% CI])", ""]
        lines += group_table(groups, group_baseline) + [""]
    lines += ["## Runs", ""]
    lines += metrics_table(runs, baseline, compared) + [""]
    lines += [
        "rpn_iou: mean best IoU of the RPN's top proposals after NMS (the paper's metric; "
        "null for detectors without an RPN, such as RetinaNet, FCOS and SSDlite, and for "
        "outside predictions, which carry no proposals); "
        "det_iou: mean best IoU of detections with score >= score_thresh; gt_iou: mean best "
        "same-class IoU of each ground-truth box (0 when missed); map*/mar*: pycocotools "
        "COCOeval"
        + ("; segm_*: the same on instance masks" if metric_keys(runs) != METRIC_KEYS else "")
        + ". Changes are relative to the baseline.",
        "",
    ]
    classes = per_class_table(runs, baseline, compared)
    if classes:
        lines += ["## Per class", ""] + classes + [""]
        lines += [
            "map, map_50: pycocotools' per-category precision (COCOeval.eval['precision']), "
            "averaged as COCOeval.summarize does; gt_iou: as above, on the category's ground "
            "truth alone. confusion.png: true against predicted category at IoU >= 0.5 "
            "(detections with score >= score_thresh), background for what matched nothing.",
            "",
        ]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield an empty hidden sibling folder of ``out``; on success it replaces ``out`` whole.

    An existing ``out`` (the caller has checked that it may go) is replaced by two renames. On
    an exception the staging folder is removed and ``out`` is left as it was; a killed process
    leaves only a hidden ``.<name>.tmp-<pid>`` folder, which the next call for ``out`` removes.
    """
    out = Path(os.path.abspath(out))  # "." has no name to stage a sibling with
    _remove_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        try:
            yield tmp
        except OSError as error:  # name the report's file, not the staged one (or the report)
            where = str(error.filename or tmp)
            if where.startswith(str(tmp)):
                where = str(out) + where[len(str(tmp)) :]
            raise named(error, where) from None
        old = out.parent / f".{out.name}.old-{os.getpid()}" if out.exists() else None
        if old is not None:
            out.rename(old)
        try:
            tmp.rename(out)
        except OSError as error:
            if old is not None:
                old.rename(out)
            raise named(error, out) from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale(out: Path) -> None:
    """Remove staging folders of ``out`` left by killed processes (POSIX: their pid is gone)."""
    if os.name != "posix" or not out.parent.is_dir():
        return
    prefix = f".{out.name}."
    for folder in out.parent.iterdir():
        kind, _, pid = folder.name.removeprefix(prefix).partition("-")
        stale = folder.name.startswith(prefix) and kind in ("tmp", "old") and pid.isdigit()
        if stale and folder.is_dir() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
