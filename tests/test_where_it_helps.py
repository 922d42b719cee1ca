"""``experiments/where_it_helps.py``: the run order, a real (tiny) study end to end, a rerun that
keeps finished runs (and refuses ones trained with other flags), and the committed results
matching their Markdown and the README."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, load_script, run_cli

SCRIPT = ROOT / "experiments" / "where_it_helps.py"
RESULTS = ROOT / "results" / "where_it_helps.json"


@pytest.fixture(scope="module")
def script():
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("where")
    args = ["--quick", "--groups", "a", "--data-root", str(tmp / "data"),
            "--runs", str(tmp / "runs"), "--out", str(tmp / "results")]  # fmt: skip
    first = run_cli(str(SCRIPT), *args, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    tmp.joinpath("first.json").write_text((tmp / "results" / "where_it_helps.json").read_text())
    again = run_cli(str(SCRIPT), *args, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    tmp.joinpath("again.log").write_text(again.stdout)
    changed = run_cli(str(SCRIPT), *args, "--threads", "2", timeout=600)
    tmp.joinpath("changed.err").write_text(changed.stderr + f"\nexit {changed.returncode}")
    # a finished run whose recorded train.py flags are not what the code gives it now
    stale = json.loads((tmp / "first.json").read_text())
    stale["scores"]["position/faster-rcnn/coordconv-s0"]["train_flags"][-1] = "--no-coordconv"
    (tmp / "stale").mkdir()
    (tmp / "stale" / "where_it_helps.json").write_text(json.dumps(stale))
    refused = run_cli(str(SCRIPT), *args[:-2], "--out", str(tmp / "stale"), timeout=600)
    tmp.joinpath("stale.err").write_text(refused.stderr + f"\nexit {refused.returncode}")
    return tmp


def test_runs_start_with_the_positive_control_then_mixed_sizes_pairs_first(script):
    args = script.parse_args(["--seeds", "0,1"])
    keys = [run.key for run in script.plan(args)]
    assert keys[:4] == [
        "position/faster-rcnn/baseline-s0", "position/faster-rcnn/coordconv-s0",
        "position/faster-rcnn/baseline-s1", "position/faster-rcnn/coordconv-s1",
    ]  # fmt: skip
    assert keys[4:7] == [f"position-mixed/faster-rcnn/{arm}-s0"
                         for arm in ("baseline", "coordconv", "coordconv-batch")]  # fmt: skip
    assert len(keys) == script.run_count([0, 1]) == 50
    groups = [run.cell.group for run in script.plan(args)]
    assert groups == sorted(groups, key="abdc".index)


def test_quick_study_scores_both_arms_and_their_change(quick_study, script):
    results = json.loads((quick_study / "results" / "where_it_helps.json").read_text())
    assert results["quick"] is True and results["setup"]["seeds"] == [0]
    cell = results["cells"]["position/faster-rcnn"]
    baseline, coordconv = cell["runs"]["baseline-s0"], cell["runs"]["coordconv-s0"]
    change = cell["changes"]["coordconv vs baseline"]
    assert change["seeds"] == [0]
    assert change["map"]["mean"] == pytest.approx(coordconv["map"] - baseline["map"])
    markdown = (quick_study / "results" / "where_it_helps.md").read_text()
    assert markdown == script.render_markdown(results)
    assert "**H1**" in markdown and "not a result" in markdown and "pending" in markdown
    assert (quick_study / "results" / "where_it_helps.png").stat().st_size > 10_000


def test_rerun_keeps_finished_runs_and_refuses_another_setup(quick_study):
    log = (quick_study / "again.log").read_text()
    assert log.count("done earlier, kept") == 2 and ": training" not in log
    first = json.loads((quick_study / "first.json").read_text())
    again = json.loads((quick_study / "results" / "where_it_helps.json").read_text())
    assert again["scores"] == first["scores"]
    refused = (quick_study / "changed.err").read_text()
    assert refused.endswith("exit 2") and "another setup" in refused
    assert first["scores"]["position/faster-rcnn/baseline-s0"]["train_flags"][-1] == (
        "--no-coordconv"
    )


def test_rerun_refuses_a_run_trained_with_other_flags(quick_study):
    refused = (quick_study / "stale.err").read_text()
    assert refused.endswith("exit 2") and "position/faster-rcnn/coordconv-s0" in refused
    assert "other train.py flags" in refused and "Traceback" not in refused


def test_bad_arguments_exit_2():
    result = run_cli(str(SCRIPT), "--groups", "e")
    assert result.returncode == 2 and "--groups" in result.stderr


@pytest.mark.skipif(not RESULTS.is_file(), reason="no committed results")
def test_committed_results_match_their_markdown_and_the_readme(script):
    results = json.loads(RESULTS.read_text())
    assert RESULTS.with_suffix(".md").read_text() == script.render_markdown(results)
    assert script.summary_table(results) in (ROOT / "README.md").read_text()
