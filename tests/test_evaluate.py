"""``python -m coorddet.evaluate`` through its command line, on tiny real data and real smoke
checkpoints: the report folder, outside predictions, seed groups, other datasets, bad input,
untrusted checkpoints and a kill mid-run."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, assert_user_error, run_cli
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from coorddet.cli.evaluate import main
from coorddet.evaluation import evaluate
from data_gen import GeneratorConfig, generate

METRIC_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large",
               "mar_1", "mar_10", "mar_100", "rpn_iou", "det_iou", "gt_iou")  # pinned  # fmt: skip
T975_DF1 = 12.7062  # Student-t quantile t(0.975, 1), for two seeds


def evaluate_cli(*args: object):
    return run_cli("-m", "coorddet.evaluate", *map(str, args))


def annotations(data: Path, split: str = "test") -> dict:
    return json.loads((data / "annotations" / f"instances_{split}.json").read_text())


def truth_as_results(data: Path) -> list[dict]:
    """The ground truth of the test split as a COCO results file: a perfect detector."""
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
        }
        for a in annotations(data)["annotations"]
    ]


def rescore(data: Path, results: list[dict]) -> list[float]:
    """pycocotools' own COCOeval (bbox) ``stats[0:9]`` of ``results`` on ``data``'s test split."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(data / "annotations" / "instances_test.json"))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(stat) for stat in evaluator.stats[:9]]


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def markdown_table(text: str, heading: str) -> dict[str, list[str]]:
    """The first table after ``heading`` as {first cell: other cells} (header row: "metric")."""
    table: dict[str, list[str]] = {}
    for line in text.split(heading, 1)[1].splitlines():
        if not line.startswith("|"):
            if table:
                break  # the end of the table
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not cells[0].startswith("---"):
            table[cells[0]] = cells[1:]
    return table


def change_cell(value: float | None, reference: float | None) -> str:
    if value is None or reference is None or reference == 0:
        return "-"
    return f"{(value - reference) / abs(reference) * 100:+.1f}%"


@pytest.fixture(scope="module")
def checkpoints(smoke_runs: dict[str, Path]) -> dict[str, Path]:
    return {name: run / "checkpoints" / "best.ckpt" for name, run in smoke_runs.items()}


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_dataset, checkpoints) -> SimpleNamespace:
    """One evaluation of both checkpoints plus two outside predictions files: the ground truth
    ("truth") and the ground truth without the detections of one image ("partial")."""
    folder = tmp_path_factory.mktemp("evaluation")
    truth = truth_as_results(tiny_dataset)
    missed = truth[0]["image_id"]
    partial = [r for r in truth if r["image_id"] != missed]
    result = evaluate_cli(
        "--data", tiny_dataset, "--split", "test", checkpoints["baseline"], checkpoints["coordconv"],
        "--predictions", write(folder / "truth.json", truth), "--name", "truth",
        "--predictions", write(folder / "partial.json", partial), "--name", "partial",
        "--out", folder / "report",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = folder / "report"
    metrics = json.loads((out / "metrics.json").read_text())
    missed_boxes = sum(r["image_id"] == missed for r in truth)
    return SimpleNamespace(out=out, result=result, metrics=metrics, missed=missed,
                           missed_boxes=missed_boxes, boxes=len(truth))  # fmt: skip


RUNS = ["baseline", "coordconv", "truth", "partial"]


def test_report_folder_holds_the_pinned_files(report):
    assert sorted(p.name for p in report.out.iterdir()) == sorted(
        ["metrics.json", "report.md", "detections.png", "iou_distribution.png", "confusion.png"]
        + [f"predictions_{run}.json" for run in RUNS]
    )
    assert [p.name for p in report.out.parent.iterdir() if p.name.startswith(".")] == []


def test_metrics_json_has_every_pinned_key_per_run(report):
    assert list(report.metrics) == RUNS
    for run, values in report.metrics.items():
        assert list(values) == [*METRIC_KEYS, "per_class"], run
        for key, value in values.items():
            if key == "per_class":
                continue
            assert value is None or (isinstance(value, float) and 0.0 <= value <= 1.0), (run, key)
        assert values["map_large"] is None  # no digit of the tiny data is large: null, not NaN
    assert report.metrics["baseline"]["rpn_iou"] is not None
    assert report.metrics["truth"]["rpn_iou"] is None  # outside detectors have no proposals


@pytest.mark.parametrize("run", RUNS)
def test_predictions_rescored_by_pycocotools_give_metrics_json(report, tiny_dataset, run):
    results = json.loads((report.out / f"predictions_{run}.json").read_text())
    assert results, "the smoke checkpoints detect something (box_score_thresh 0.05)"
    assert set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    for key, stat in zip(METRIC_KEYS[:9], rescore(tiny_dataset, results), strict=True):
        expected = report.metrics[run][key]
        if stat < 0:
            assert expected is None, key
        else:
            assert expected == pytest.approx(float(stat), abs=1e-12), key


@pytest.mark.parametrize("run", ["baseline", "partial"])
def test_per_class_map_is_pycocotools_per_category(report, tiny_dataset, run):
    """Each category's map and map_50 are what pycocotools gives when it scores that category
    alone; gt_iou per class, weighted by the boxes of each class, is the run's gt_iou."""
    per_class = report.metrics[run]["per_class"]
    results = json.loads((report.out / f"predictions_{run}.json").read_text())
    truth = annotations(tiny_dataset)
    names = {c["id"]: c["name"] for c in truth["categories"]}
    assert list(per_class) == [names[i] for i in sorted(names)]
    weighted = 0.0
    for category_id, name in names.items():
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO(str(tiny_dataset / "annotations" / "instances_test.json"))
            evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
            evaluator.params.catIds = [category_id]
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        for key, stat in zip(("map", "map_50"), evaluator.stats[:2], strict=True):
            expected = None if stat < 0 else pytest.approx(float(stat), abs=1e-12)
            assert per_class[name][key] == expected, (name, key)
        boxes = sum(a["category_id"] == category_id for a in truth["annotations"])
        if boxes:
            weighted += per_class[name]["gt_iou"] * boxes
        else:
            assert per_class[name]["gt_iou"] is None
    assert weighted / len(truth["annotations"]) == pytest.approx(report.metrics[run]["gt_iou"])
    text = (report.out / "report.md").read_text()
    assert "## Per class" in text and "| category | metric | baseline | coordconv |" in text


def test_outside_predictions_are_scored_and_images_without_detections_are_misses(report):
    truth, partial = report.metrics["truth"], report.metrics["partial"]
    for key in ("map", "map_50", "map_75", "map_small", "mar_100", "det_iou", "gt_iou"):
        assert truth[key] == pytest.approx(1.0), key
    found = report.boxes - report.missed_boxes
    assert partial["gt_iou"] == pytest.approx(found / report.boxes)  # missed boxes score 0
    assert partial["det_iou"] == pytest.approx(1.0)  # what it found is perfect
    assert partial["map"] < 1.0 and partial["mar_100"] < 1.0
    written = json.loads((report.out / "predictions_partial.json").read_text())
    assert report.missed not in {r["image_id"] for r in written}


def test_report_md_compares_runs_with_the_baseline(report, tiny_dataset, checkpoints):
    text = (report.out / "report.md").read_text()
    table = markdown_table(text, "## Runs")
    assert table["metric"] == [*RUNS] + [f"{run} vs baseline" for run in RUNS[1:]]
    assert list(table)[1:] == list(METRIC_KEYS)  # metrics as rows
    base = report.metrics["baseline"]
    for key in METRIC_KEYS:
        cells = dict(zip(table["metric"], table[key], strict=True))
        for run in RUNS:
            value = report.metrics[run][key]
            assert cells[run] == ("-" if value is None else f"{value:.4f}"), (run, key)
        for run in RUNS[1:]:
            expected = change_cell(report.metrics[run][key], base[key])
            assert cells[f"{run} vs baseline"] == expected, (run, key)
    assert re.search(r"\| [+-]\d+\.\d%", text)  # at least one relative change, e.g. +24.1%
    assert f"`{tiny_dataset}`, split `test`" in text
    for checkpoint in checkpoints.values():
        assert str(checkpoint) in text
    assert "(no CoordConv, seed 0)" in text and "(CoordConv, seed 0)" in text


def test_plots_are_whole_png_files(report):
    for name in ("detections.png", "iou_distribution.png", "confusion.png"):
        with Image.open(report.out / name) as image:
            image.verify()
            assert image.format == "PNG"
    with Image.open(report.out / "detections.png") as image:
        assert image.size[0] >= 5 * 200  # ground truth + 4 runs side by side


def test_library_evaluate_takes_keyword_arguments_and_writes_the_same_metrics(
    tmp_path, report, tiny_dataset, checkpoints
):
    truth = truth_as_results(tiny_dataset)
    result = evaluate(
        data=tiny_dataset,
        split="test",
        out=tmp_path / "report",
        checkpoints=[checkpoints["baseline"], checkpoints["coordconv"]],
        predictions=[("truth", write(tmp_path / "truth.json", truth))],
        quiet=True,
    )
    assert result.out == tmp_path / "report"
    assert (result.baseline, result.compared, result.groups) == (
        "baseline",
        ["coordconv", "truth"],
        None,
    )
    written = json.loads((result.out / "metrics.json").read_text())
    assert written == result.metrics
    assert written == {run: report.metrics[run] for run in ("baseline", "coordconv", "truth")}


def test_console_prints_the_table_and_the_paths(report):
    out = report.result.stdout
    assert "| metric | baseline | coordconv | truth | partial |" in out
    assert f"report:  {report.out / 'report.md'}" in out
    device = "cuda" if torch.cuda.is_available() else "cpu"  # --device auto: CUDA when there
    line = rf"^baseline: 8 images in [\d.]+ s \([\d.]+ img/s, batch 64, {device}\)$"
    assert re.search(line, out, re.M)
    assert "Traceback" not in report.result.stderr


# --group, on a dataset the checkpoints were not trained on -----------------------------------


class Payload:
    """Unpickling this runs code: it creates the ``marker`` file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def another_seed(
    checkpoint: Path, path: Path, *, seed: int, payload: Payload | None = None
) -> Path:
    """A copy of ``checkpoint`` as if trained with ``seed``: the run config's seed and slightly
    different weights; with ``payload``, also an object that runs code when unpickled."""
    content = torch.load(checkpoint, map_location="cpu", weights_only=True)
    content["coorddet"]["config"]["seed"] = seed
    generator = torch.Generator().manual_seed(seed)
    for key, value in content["state_dict"].items():
        if value.is_floating_point():
            noise = torch.randn(value.shape, generator=generator, dtype=value.dtype)
            content["state_dict"][key] = value * (1 + 0.2 * noise)
    if payload is not None:
        content["extra"] = payload
    torch.save(content, path)
    return path


@pytest.fixture(scope="module")
def quadrant_96(tmp_path_factory) -> Path:
    """Another canvas size (96 px) and the quadrant split: test digits in the bottom right."""
    out = tmp_path_factory.mktemp("quadrant") / "q96"
    config = GeneratorConfig(out=str(out), canvas_size=96, split_mode="quadrant", train=0, val=0,
                             test=6, seed=3, workers=1)  # fmt: skip
    generate(config)
    return out


def test_group_aggregates_seeds_on_another_dataset(tmp_path, quadrant_96, checkpoints):
    truth = truth_as_results(quadrant_96)
    shifted = [dict(r, bbox=[r["bbox"][0] + 2, *r["bbox"][1:]]) for r in truth]
    marker = tmp_path / "payload-ran"
    # The seed-1 run also carries a code-running object: --trust-checkpoint loads it anyway.
    seed_1 = another_seed(checkpoints["baseline"], tmp_path / "s1.ckpt", seed=1,
                          payload=Payload(marker))  # fmt: skip
    out = tmp_path / "report"
    result = evaluate_cli(
        "--data", quadrant_96, "--group", "--out", out, "--trust-checkpoint",
        checkpoints["baseline"], seed_1, checkpoints["coordconv"],
        "--predictions", write(tmp_path / "a.json", truth), "--name", "outside",
        "--predictions", write(tmp_path / "b.json", shifted), "--name", "outside",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.exists()  # what --trust-checkpoint means
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["baseline", "baseline-s1", "coordconv", "outside", "outside-2"]
    assert metrics["baseline"]["map"] is not None and metrics["coordconv"]["rpn_iou"] is not None
    groups = json.loads((out / "groups.json").read_text())
    members = {"baseline": ["baseline", "baseline-s1"], "coordconv": ["coordconv"],
               "outside": ["outside", "outside-2"]}  # fmt: skip
    assert list(groups) == list(members)
    for group, names in members.items():
        for key in METRIC_KEYS:
            values = [metrics[name][key] for name in names if metrics[name][key] is not None]
            stats = groups[group][key]
            assert stats["n"] == len(values), (group, key)
            if len(values) == 2:  # by hand: std |a - b| / sqrt(2), half width t * std / sqrt(2)
                a, b = values
                assert stats["mean"] == pytest.approx((a + b) / 2)
                assert stats["std"] == pytest.approx(abs(a - b) / math.sqrt(2))
                half = T975_DF1 * abs(a - b) / 2
                assert stats["ci95"] == pytest.approx([(a + b) / 2 - half, (a + b) / 2 + half])
            elif len(values) == 1:
                assert stats == {"mean": values[0], "std": None, "ci95": None, "n": 1}
    assert groups["outside"]["map"]["std"] > 0  # the shifted boxes lose the strict IoUs
    text = (out / "report.md").read_text()
    table = markdown_table(text, "## Seeds aggregated")
    assert table["metric"] == ["baseline", "coordconv", "outside", "coordconv vs baseline",
                               "outside vs baseline"]  # fmt: skip
    stats = groups["outside"]["gt_iou"]
    assert table["gt_iou"][2].startswith(f"{stats['mean']:.4f} ± {stats['std']:.4f} [")
    means = [groups[g]["rpn_iou"]["mean"] for g in ("coordconv", "baseline")]
    assert table["rpn_iou"][3] == change_cell(*means)
    assert "resizes these 96x96 images" in text  # trained on 64 px canvases
    assert "seeds aggregated" in result.stdout


# Bad input: exit 2, one line on stderr, no traceback, no report, no code run -----------------

# name -> (arguments after --data DATA --out OUT, words the one stderr line must hold);
# {tmp} is the folder of the bad_input fixture, {ckpt} the real baseline checkpoint.
BAD_INPUTS = {
    "missing checkpoint": (["{tmp}/nope.ckpt"], ["nope.ckpt", "not found"]),
    "not a checkpoint": (["{tmp}/notes.ckpt"], ["notes.ckpt", "not a readable checkpoint"]),
    "truncated checkpoint": (["{tmp}/cut.ckpt"], ["cut.ckpt", "corrupt, truncated"]),
    "no coorddet entry": (["{tmp}/foreign.ckpt"], ["foreign.ckpt", "not a coorddet checkpoint"]),
    "code-running checkpoint": (["{tmp}/trap.ckpt"], ["trap.ckpt", "refused", "--trust-checkpoint"]),
    "categories differ": (["{ckpt}", "--data", "{tmp}/renamed"],
                          ["best.ckpt", "categories differ", "'digit 0'"]),
    "corrupt predictions": (["--predictions", "{tmp}/corrupt.json", "--name", "x"],
                            ["corrupt.json", "not valid JSON"]),
    "unknown image ids": (["--predictions", "{tmp}/unknown_ids.json", "--name", "x"],
                          ["unknown_ids.json", "image ids not in", "999999"]),
    "existing --out": (["{ckpt}", "--out", "{tmp}/full"], ["full", "--overwrite"]),
    "--out is the current folder": (["{ckpt}", "--out", ".", "--overwrite"], ["current folder"]),
    "--out is a file": (["{ckpt}", "--out", "{tmp}/notes.ckpt", "--overwrite"], ["is a file"]),
    "--overwrite an input": (["{tmp}/full/copy.ckpt", "--out", "{tmp}/full", "--overwrite"],
                             ["full", "holds the input"]),
    "--batch-size 0": (["{ckpt}", "--batch-size", "0"], ["--batch-size"]),
    "--score-thresh 1.5": (["{ckpt}", "--score-thresh", "1.5"], ["--score-thresh", "1.5"]),
    "--rpn-top-k abc": (["{ckpt}", "--rpn-top-k", "abc"], ["--rpn-top-k", "abc"]),
    "--device tpu": (["{ckpt}", "--device", "tpu"], ["--device", "tpu"]),
    "--name with a path": (["--predictions", "{tmp}/corrupt.json", "--name", "../x"], ["--name"]),
    "--predictions without --name": (["--predictions", "{tmp}/corrupt.json"], ["--name"]),
    "nothing to evaluate": ([], ["CKPT", "--predictions"]),
    "missing dataset": (["{ckpt}", "--data", "{tmp}/no-data"], ["no-data", "data_gen"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def bad_input(tmp_path_factory, tiny_dataset, checkpoints) -> SimpleNamespace:
    """Every BAD_INPUTS command line, run two at a time: each is a fresh interpreter importing
    torch (seconds on a busy 2-core machine), so this halves the wall time."""
    tmp = tmp_path_factory.mktemp("bad-input")
    ckpt = checkpoints["baseline"]
    (tmp / "notes.ckpt").write_text("not a checkpoint\n")
    (tmp / "cut.ckpt").write_bytes(ckpt.read_bytes()[:5000])
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "epoch": 3}, tmp / "foreign.ckpt")
    marker = tmp / "payload-ran"
    another_seed(ckpt, tmp / "trap.ckpt", seed=0, payload=Payload(marker))
    shutil.copytree(tiny_dataset / "test", tmp / "renamed" / "test")
    coco = annotations(tiny_dataset)
    for category in coco["categories"]:
        category["name"] = f"digit {category['name']}"
    (tmp / "renamed" / "annotations").mkdir()
    write(tmp / "renamed" / "annotations" / "instances_test.json", coco)
    (tmp / "corrupt.json").write_text('[{"image_id": 1, "category_id": ')
    box = {"image_id": 999_999, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.9}
    write(tmp / "unknown_ids.json", [box])
    write(tmp / "bad_box.json", [dict(box, image_id=0, bbox=[1, 1, -5, 5])])
    (tmp / "full").mkdir()
    shutil.copy(ckpt, tmp / "full" / "copy.ckpt")

    def run(case: str):
        template, _ = BAD_INPUTS[case]
        args = [a.format(tmp=tmp, ckpt=ckpt) for a in template]
        return evaluate_cli("--data", tiny_dataset, "--out", tmp / f"out-{case}", *args)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(BAD_INPUTS, pool.map(run, BAD_INPUTS), strict=True))
    return SimpleNamespace(tmp=tmp, results=results, marker=marker)


@pytest.mark.robustness
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(case, bad_input):
    assert_user_error(bad_input.results[case], *BAD_INPUTS[case][1])
    assert not (bad_input.tmp / f"out-{case}").exists()


@pytest.mark.robustness
def test_bad_input_deletes_and_runs_nothing(bad_input, checkpoints):
    assert not bad_input.marker.exists()  # the refused checkpoint's payload never ran
    assert (bad_input.tmp / "full" / "copy.ckpt").read_bytes() == checkpoints[
        "baseline"
    ].read_bytes()
    assert (bad_input.tmp / "notes.ckpt").read_text() == "not a checkpoint\n"


# The same plumbing, in-process: main() returns the exit code and prints the one line itself.
MORE_BAD_INPUTS = {
    "negative box": (["--predictions", "{tmp}/bad_box.json", "--name", "x"],
                     ["bad_box.json", "'bbox'"]),
    "unknown split": (["{ckpt}", "--split", "tset"], ["tset", "test, train, val"]),
    "no CUDA here": (["{ckpt}", "--device", "cuda:0"], ["--device cuda:0", "--device cpu"]),
}  # fmt: skip


@pytest.mark.robustness
@pytest.mark.parametrize("case", list(MORE_BAD_INPUTS))
def test_more_bad_input_in_process(case, bad_input, tiny_dataset, checkpoints, capsys):
    if case == "no CUDA here" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    template, needles = MORE_BAD_INPUTS[case]
    args = [a.format(tmp=bad_input.tmp, ckpt=checkpoints["baseline"]) for a in template]
    out = bad_input.tmp / f"out-{case}"
    assert main(["--data", str(tiny_dataset), "--out", str(out), *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1, captured.err
    for needle in needles:
        assert needle in captured.err, (needle, captured.err)
    assert not out.exists()


# Interruption ---------------------------------------------------------------------------------


@pytest.mark.robustness
def test_killed_evaluation_leaves_the_old_report_untouched(tmp_path, tiny_dataset, checkpoints,
                                                           report):  # fmt: skip
    out = tmp_path / "report"
    shutil.copytree(report.out, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    command = [sys.executable, "-m", "coorddet.evaluate", "--data", str(tiny_dataset), "--quiet",
               str(checkpoints["baseline"]), str(checkpoints["coordconv"]), "--out", str(out),
               "--overwrite"]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    staged = None
    try:
        deadline = time.monotonic() + 300
        while staged is None and process.poll() is None and time.monotonic() < deadline:
            # the report is being written: metrics.json is the first file of the staged folder
            staged = next(tmp_path.glob(".report.tmp-*/metrics.json"), None)
            time.sleep(0.002)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert staged is not None, "the evaluation ended before it was killed"
    assert process.returncode == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["report"]


def test_non_contiguous_category_ids_train_and_come_back_in_every_output(
    tmp_path, tiny_dataset, report
):
    """The tiny dataset with category ids 3, 7, ... 90: num_classes comes from the categories,
    the model learns labels 1..10 exactly as it did for ids 1..10 (same metrics), and the
    predictions, metrics and plots speak the dataset's own ids."""
    ids = [3, 7, 11, 19, 42, 50, 61, 70, 85, 90]
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    for split in ("train", "val", "test"):
        path = data / "annotations" / f"instances_{split}.json"
        document = json.loads(path.read_text())
        for category in document["categories"]:
            category["id"] = ids[category["id"] - 1]
        for annotation in document["annotations"]:
            annotation["category_id"] = ids[annotation["category_id"] - 1]
        path.write_text(json.dumps(document))
    run = tmp_path / "run"
    trained = run_cli("train.py", "--config", "configs/smoke.yaml", "--data", str(data),
                      "--out", str(run), "--no-coordconv", "--quiet")  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "num_classes: 11" in (run / "config.yaml").read_text()
    result = evaluate_cli("--data", data, "--out", tmp_path / "report", "--quiet",
                          run / "checkpoints" / "best.ckpt")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["baseline"] == report.metrics["baseline"]  # the smoke baseline, ids 1..10
    results = json.loads((tmp_path / "report" / "predictions_baseline.json").read_text())
    assert results and {r["category_id"] for r in results} <= set(ids)
    assert metrics["baseline"]["map"] == pytest.approx(rescore(data, results)[0], abs=1e-12)
