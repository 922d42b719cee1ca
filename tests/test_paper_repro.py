"""``experiments/paper_repro.py``: a real (tiny) study end to end, rerun safety, and the
committed results matching docs/results.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, load_script, run_cli

SCRIPT = ROOT / "experiments" / "paper_repro.py"


@pytest.fixture
def script():
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("paper")
    args = ["--quick", "--studies", "uniform", "--data-root", str(tmp / "data"),
            "--runs", str(tmp / "runs"), "--out", str(tmp / "results")]  # fmt: skip
    first = run_cli(str(SCRIPT), *args, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    tmp.joinpath("first.json").write_text((tmp / "results" / "paper_repro.json").read_text())
    again = run_cli(str(SCRIPT), *args, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    tmp.joinpath("again.log").write_text(again.stdout)
    return tmp


def test_quick_study_writes_results_for_both_arms(quick_study, script):
    results = json.loads((quick_study / "results" / "paper_repro.json").read_text())
    assert results["quick"] is True and results["setup"]["seeds"] == [0]
    study = results["studies"]["uniform"]
    assert list(study["arms"]) == ["baseline", "coordconv"]
    assert sorted(study["runs"]) == ["uniform/baseline-s0", "uniform/coordconv-s0"]
    for arm, run in (("baseline", "uniform/baseline-s0"), ("coordconv", "uniform/coordconv-s0")):
        for key in script.METRICS:  # one seed: the group mean is that run's value
            assert study["arms"][arm][key]["mean"] == study["runs"][run][key]
    assert set(results["environment"]) >= {"cpu", "torch", "torchvision", "lightning"}
    markdown = (quick_study / "results" / "paper_repro.md").read_text()
    assert markdown == script.render_markdown(results)
    assert "not a result" in markdown and script.summary_table(results) in markdown


def test_rerun_keeps_finished_runs_and_gives_the_same_numbers(quick_study):
    log = (quick_study / "again.log").read_text()
    assert log.count("done earlier, kept") == 2 and ": training" not in log
    first = json.loads((quick_study / "first.json").read_text())
    again = json.loads((quick_study / "results" / "paper_repro.json").read_text())
    assert again["studies"]["uniform"]["runs"] == first["studies"]["uniform"]["runs"]


def test_bad_arguments_exit_2():
    result = run_cli(str(SCRIPT), "--studies", "diagonal")
    assert result.returncode == 2 and "--studies" in result.stderr


@pytest.mark.skipif(not (ROOT / "results" / "paper_repro.json").is_file(), reason="no results")
def test_committed_results_match_their_markdown_and_the_readme(script):
    results = json.loads((ROOT / "results" / "paper_repro.json").read_text())
    assert not results["quick"]
    assert (ROOT / "results" / "paper_repro.md").read_text() == script.render_markdown(results)
    assert script.summary_table(results) in (ROOT / "docs" / "results.md").read_text()
