"""report.py by hand: t quantiles, seed aggregation, relative changes, the markdown tables and
the report folder that appears whole or not at all."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from coorddet.metrics import METRIC_KEYS
from coorddet.report import (
    aggregate,
    aggregate_groups,
    group_table,
    metrics_table,
    relative_change,
    render_report,
    staged_dir,
    t_quantile_975,
)

# t(0.975, df) from printed Student-t tables
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 5: 2.571, 9: 2.262, 10: 2.228, 20: 2.086, 30: 2.042,
           60: 2.000, 120: 1.980}  # fmt: skip


@pytest.mark.parametrize(("df", "expected"), sorted(T_TABLE.items()))
def test_t_quantile_matches_the_printed_table(df, expected):
    assert t_quantile_975(df) == pytest.approx(expected, abs=6e-4)


def test_t_quantile_tends_to_the_normal_quantile_and_needs_one_degree():
    values = [t_quantile_975(df) for df in range(1, 400)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))  # decreasing
    assert t_quantile_975(100_000) == pytest.approx(1.95996, abs=1e-4)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile_975(0)


def test_t_quantile_against_scipy():
    stats = pytest.importorskip("scipy.stats")  # albumentations brings scipy; not a dependency
    for df in range(1, 301):
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4), df


def test_aggregate_by_hand():
    # mean 0.4; deviations -0.2, 0, 0.2 -> sample variance 0.08 / 2 = 0.04, std 0.2;
    # half width t(0.975, 2) * 0.2 / sqrt(3) = 4.3027 * 0.11547 = 0.49683
    stats = aggregate([0.2, 0.4, None, 0.6, math.nan])
    assert stats["n"] == 3
    assert stats["mean"] == pytest.approx(0.4)
    assert stats["std"] == pytest.approx(0.2)
    low, high = stats["ci95"]
    assert low == pytest.approx(0.4 - 0.49683, abs=1e-5)
    assert high == pytest.approx(0.4 + 0.49683, abs=1e-5)


def test_aggregate_small_samples():
    assert aggregate([0.3]) == {"mean": 0.3, "std": None, "ci95": None, "n": 1}
    assert aggregate([None, math.nan]) == {"mean": None, "std": None, "ci95": None, "n": 0}
    two = aggregate([1.0, 3.0])  # std sqrt(2), half width 12.7062 * sqrt(2) / sqrt(2)
    assert two["std"] == pytest.approx(math.sqrt(2))
    assert two["ci95"] == pytest.approx([2.0 - 12.7062, 2.0 + 12.7062], abs=1e-3)
    same = aggregate([0.5, 0.5, 0.5])
    assert same["std"] == 0.0 and same["ci95"] == [0.5, 0.5]


def test_aggregate_groups_uses_every_pinned_key():
    runs = {
        "a": dict.fromkeys(METRIC_KEYS, 0.2) | {"map_large": None},
        "a-s1": dict.fromkeys(METRIC_KEYS, 0.4) | {"map_large": None},
        "b": dict.fromkeys(METRIC_KEYS, 0.9),
    }
    groups = aggregate_groups(runs, {"a": ["a", "a-s1"], "b": ["b"]})
    assert set(groups) == {"a", "b"} and set(groups["a"]) == set(METRIC_KEYS)
    assert groups["a"]["map"]["mean"] == pytest.approx(0.3)
    assert groups["a"]["map"]["std"] == pytest.approx(math.sqrt(0.02))
    assert groups["a"]["map_large"]["n"] == 0
    assert groups["b"]["gt_iou"] == {"mean": 0.9, "std": None, "ci95": None, "n": 1}


@pytest.mark.parametrize(
    ("value", "reference", "expected"),
    [
        (0.31, 0.25, 0.24),  # the paper's "+24%"
        (0.2, 0.25, -0.2),
        (0.5, 0.5, 0.0),
        (-0.1, -0.2, 0.5),  # relative to |reference|: closer to 0 from below is "up"
        (0.3, 0.0, None),  # undefined
        (None, 0.2, None),
        (0.2, None, None),
        (math.nan, 0.2, None),
    ],
)
def test_relative_change(value, reference, expected):
    change = relative_change(value, reference)
    assert change == (None if expected is None else pytest.approx(expected))


def _rows(lines: list[str]) -> dict[str, list[str]]:
    """Markdown table lines -> {first cell: other cells}, header under "metric"."""
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    return {row[0]: row[1:] for row in cells if not row[0].startswith("---")}


def test_metrics_table_layout_and_changes():
    base = dict.fromkeys(METRIC_KEYS, 0.25) | {"map_large": None, "det_iou": 0.0}
    coord = dict.fromkeys(METRIC_KEYS, 0.31) | {"map_large": None, "det_iou": 0.1}
    rows = _rows(metrics_table({"baseline": base, "coordconv": coord}, "baseline", ["coordconv"]))
    assert rows["metric"] == ["baseline", "coordconv", "coordconv vs baseline"]
    assert list(rows)[1:] == list(METRIC_KEYS)  # metrics as rows, in the pinned order
    assert rows["rpn_iou"] == ["0.2500", "0.3100", "+24.0%"]
    assert rows["map_large"] == ["-", "-", "-"]
    assert rows["det_iou"] == ["0.0000", "0.1000", "-"]  # change from 0 is undefined
    no_baseline = _rows(metrics_table({"coordconv": coord}, None, ["coordconv"]))
    assert no_baseline["metric"] == ["coordconv"]


def test_group_table_cells():
    groups = {
        "baseline": {k: aggregate([0.2, 0.4, 0.6]) for k in METRIC_KEYS},
        "coordconv": {k: aggregate([0.5]) for k in METRIC_KEYS},
    }
    groups["coordconv"]["map_large"] = aggregate([None])
    rows = _rows(group_table(groups, "baseline"))
    assert rows["metric"] == ["baseline", "coordconv", "coordconv vs baseline"]
    assert rows["map"] == ["0.4000 ± 0.2000 [-0.0968, 0.8968] (n=3)", "0.5000 (n=1)", "+25.0%"]
    assert rows["map_large"][1:] == ["-", "-"]


def test_render_report_names_its_inputs():
    metrics = {
        "baseline": dict.fromkeys(METRIC_KEYS, 0.5),
        "coordconv": dict.fromkeys(METRIC_KEYS, 0.6),
    }
    text = render_report(
        runs=metrics,
        baseline="baseline",
        compared=["coordconv"],
        sources={"baseline": "`runs/b/best.ckpt`", "coordconv": "`runs/c/best.ckpt`"},
        data="data/mnist-det",
        split="test",
        settings={"score_thresh": 0.5},
        groups=aggregate_groups(metrics, {"baseline": ["baseline"], "coordconv": ["coordconv"]}),
        group_baseline="baseline",
        plots=["detections.png"],
    )
    for needle in ("`data/mnist-det`, split `test`", "runs/b/best.ckpt", "runs/c/best.ckpt",
                   "score_thresh=0.5", "## Runs", "## Seeds aggregated", "+20.0%",
                   "![detections.png](detections.png)"):  # fmt: skip
        assert needle in text, needle


def test_staged_dir_replaces_the_folder_whole(tmp_path):
    out = tmp_path / "report"
    with staged_dir(out) as folder:
        (folder / "a.txt").write_text("1")
        assert not out.exists()  # nothing visible until the block ends
    assert [p.name for p in out.iterdir()] == ["a.txt"]
    with staged_dir(out) as folder:
        (folder / "b.txt").write_text("2")
    assert [p.name for p in out.iterdir()] == ["b.txt"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no staging leftovers


def test_staged_dir_keeps_the_old_report_on_error(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_dir(out) as folder:
        (folder / "half.txt").write_text("half")
        raise RuntimeError("plotting failed")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_staged_dir_removes_what_killed_runs_left(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = tmp_path / f".report.tmp-{dead.stdout.strip()}"
    stale.mkdir()
    (stale / "metrics.json").write_text("{")
    other = tmp_path / ".other.tmp-1"  # another report's: not ours to remove
    other.mkdir()
    with staged_dir(tmp_path / "report") as folder:
        (folder / "report.md").write_text("#")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1", "report"]
