"""``experiments/paper_protocol.py``: a real (tiny) ladder end to end, rerun safety, and the
committed results matching their Markdown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, load_script, run_cli

SCRIPT = ROOT / "experiments" / "paper_protocol.py"
RECORD_KEYS = {"rung", "arm", "seed", "rpn_iou", "val_rpn_iou_per_epoch", "train_loss_per_epoch"}


@pytest.fixture
def script():
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def quick_ladder(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("protocol")
    args = ["--quick", "--rungs", "R0,R5", "--data-root", str(tmp / "data"),
            "--runs", str(tmp / "runs"), "--out", str(tmp / "results")]  # fmt: skip
    first = run_cli(str(SCRIPT), *args, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    tmp.joinpath("first.json").write_text((tmp / "results" / "paper_protocol.json").read_text())
    again = run_cli(str(SCRIPT), *args, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    tmp.joinpath("again.log").write_text(again.stdout)
    return tmp


@pytest.mark.slow
def test_quick_ladder_writes_one_record_per_run(quick_ladder, script):
    results = json.loads((quick_ladder / "results" / "paper_protocol.json").read_text())
    runs = results["runs"]
    assert sorted((r["rung"], r["arm"], r["seed"]) for r in runs) == [
        ("R0", "baseline", 0), ("R0", "coordconv", 0), ("R5", "baseline", 0), ("R5", "coordconv", 0)
    ]  # fmt: skip
    for record in runs:
        assert RECORD_KEYS <= set(record)
        assert 0 <= record["rpn_iou"] <= 1
        assert len(record["val_rpn_iou_per_epoch"]) == len(record["train_loss_per_epoch"]) == 1
    by_rung = {r["rung"]: r for r in runs if r["arm"] == "baseline"}
    assert by_rung["R0"]["map"] is None  # RPN only: no detection metrics
    assert by_rung["R5"]["map"] is not None and by_rung["R5"]["val_map_per_epoch"]
    config = (quick_ladder / "runs" / "configs" / "R0.yaml").read_text()
    assert "anchor_layout: released" in config and "backbone_padding: valid" in config
    markdown = (quick_ladder / "results" / "paper_protocol.md").read_text()
    assert markdown == script.render_markdown(results)
    assert "not a result" in markdown and script.summary_table(results) in markdown


@pytest.mark.slow
def test_rerun_keeps_finished_runs(quick_ladder):
    log = (quick_ladder / "again.log").read_text()
    assert "4 of 4 runs done earlier; 0 to go" in log and ": training" not in log
    first = json.loads((quick_ladder / "first.json").read_text())
    again = json.loads((quick_ladder / "results" / "paper_protocol.json").read_text())
    assert again["runs"] == first["runs"] and len(again["wall_seconds"]) == 2


def test_bad_arguments_exit_2():
    result = run_cli(str(SCRIPT), "--rungs", "R9")
    assert result.returncode == 2 and "--rungs" in result.stderr


@pytest.mark.skipif(not (ROOT / "results" / "paper_protocol.json").is_file(), reason="no results")
def test_committed_results_match_their_markdown_and_the_readme(script):
    results = json.loads((ROOT / "results" / "paper_protocol.json").read_text())
    assert not results["quick"]
    assert (ROOT / "results" / "paper_protocol.md").read_text() == script.render_markdown(results)
    assert script.summary_table(results) in (ROOT / "README.md").read_text()
    for record in results["runs"]:
        assert RECORD_KEYS <= set(record)
