"""Where CoordConv helps in detection: a positive control, per-image coordinates on mixed sizes,
every detector.

The CoordConv studies before this one are null results (results/paper_repro.md,
results/paper_protocol.md). This study asks where the layer can help at all:

(a) the positive control: ``data_gen --labels position`` (a digit's category is the 2x2 region
    of the canvas holding it; nothing in its look tells it), Faster R-CNN, baseline vs
    CoordConv;
(b) the same labels on canvases of mixed sizes (``--canvas-size 48-96``, images fed at their
    own size, so batches are zero-padded): baseline vs CoordConv with per-image coordinates
    (``--coordconv-extent image``, coorddet's default) vs coordinates spanning the padded batch
    (``batch``, what other implementations do);
(d) position labels for RetinaNet and FCOS;
(c) digit labels, uniform and quadrant splits, for Faster R-CNN, RetinaNet, FCOS and Mask R-CNN.

Runs go in that order, pairs first (seed 0 of every arm of a cell, then seed 1, ...), so an
interrupted study already holds the most telling pairs. Every arm of a cell trains on the same
data with the same config, epochs and seeds; each run is scored on its dataset's test split
(held-out digits) from its final checkpoint (``last.ckpt``). After every run the script rewrites
``OUT/where_it_helps.{json,md,png}`` (with ``--commit`` it also commits them), so the study can
be stopped and rerun: finished runs are kept, an interrupted one continues (``--resume last``).
Changes are per seed (arm minus the baseline of the same seed, absolute), with a 95% t-interval
over seeds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from study import (
    ROOT,
    Log,
    add_study_flags,
    check_study_flags,
    ensure_dataset,
    git_commit,
    python_env,
    run_main,
    study_command,
    study_main,
    study_parser,
    train_command,
)
from study import check_call as _check
from study import duration as _duration

from coorddet.errors import UserError
from coorddet.fileio import write_atomic, write_json_atomic, write_text_atomic
from coorddet.report import aggregate, format_number
from coorddet.system import describe_machine

NAME = "where_it_helps"
# dataset name -> data_gen flags (besides the sizes and seed)
DATASETS: dict[str, list[str]] = {
    "position": ["--labels", "position"],
    "position-mixed": ["--labels", "position", "--canvas-size", "48-96"],
    "digit-uniform": ["--split-mode", "uniform"],
    "digit-quadrant": ["--split-mode", "quadrant"],
}
ONE_STAGE = ("retinanet", "fcos")
# The one-stage detectors' budget, the same for both arms. configs/paper.yaml's SGD at lr 0.02
# for 4 epochs left RetinaNet near map 0 on position labels (the first sitting's three runs,
# results/where_it_helps.json at commit c5d7211). A pilot on the val split with seed 100 (never
# a study seed) chose AdamW at lr 1e-3 and 1.5 times the epochs, the most that fits a run in
# 8 minutes on one core.
ONE_STAGE_OPTIMIZER = ["--optimizer", "adamw", "--lr", "0.001"]


def one_stage_epochs(epochs: int) -> int:
    return max(1, epochs * 3 // 2)


# arm -> train.py flags
ARMS: dict[str, list[str]] = {
    "baseline": ["--no-coordconv"],
    "coordconv": ["--coordconv"],
    "coordconv-batch": ["--coordconv", "--coordconv-extent", "batch"],
}


@dataclass(frozen=True)
class Cell:
    group: str  # a, b, c or d: the question it answers
    dataset: str
    detector: str
    arms: tuple[str, ...] = ("baseline", "coordconv")

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.detector}"

    def flags(self, epochs: int) -> list[str]:
        """train.py flags every arm of the cell shares, for a study of ``epochs`` epochs."""
        flags = ["--detector", self.detector]
        if self.dataset.startswith("position"):
            # a shift could carry a digit over a region line and so change its true category
            flags.append("--no-augment")
        if self.dataset == "position-mixed":
            flags.append("--keep-image-size")  # no resizing: batches of mixed sizes are padded
        if self.detector in ONE_STAGE:  # the config names the R-CNNs' sites and optimizer
            flags += ["--coordconv-sites", "backbone-stem,head-box", *ONE_STAGE_OPTIMIZER,
                      "--max-epochs", str(one_stage_epochs(epochs))]  # fmt: skip
        return flags


CELLS: tuple[Cell, ...] = (
    Cell("a", "position", "faster-rcnn"),
    Cell("b", "position-mixed", "faster-rcnn", ("baseline", "coordconv", "coordconv-batch")),
    Cell("d", "position", "retinanet"),
    Cell("d", "position", "fcos"),
    *(
        Cell("c", dataset, detector)
        for detector in ("faster-rcnn", "retinanet", "fcos", "mask-rcnn")
        for dataset in ("digit-uniform", "digit-quadrant")
    ),
)
GROUPS = {
    "a": "the positive control: position labels, 64 px canvases",
    "b": "position labels on mixed sizes (48-96 px, padded batches): per-image vs batch extent",
    "c": "digit labels (the paper's task), uniform and quadrant splits, every detector",
    "d": "position labels, one-stage detectors",
}
# (arm, reference arm) pairs each cell reports; the first is its headline
COMPARISONS = {
    ("baseline", "coordconv"): [("coordconv", "baseline")],
    ("baseline", "coordconv", "coordconv-batch"): [
        ("coordconv", "baseline"),
        ("coordconv-batch", "baseline"),
        ("coordconv-batch", "coordconv"),
    ],
}
METRICS = ("map", "map_50", "gt_iou", "det_iou", "segm_map")
CHANGE_METRICS = ("map", "gt_iou", "segm_map")
HYPOTHESES = """\
Written before the first run, and reported below whatever comes out. "Clearly" means the 95%
interval of the per-seed change lies above zero.

- **H1**: CoordConv clearly beats the baseline on position labels (cell `position/faster-rcnn`:
  map and gt_iou).
- **H2**: with mixed sizes, `batch` extent keeps less of that gain than `image` extent (cell
  `position-mixed/faster-rcnn`: the change `coordconv-batch` vs `coordconv` lies below zero).
- **H3**: on digit labels no detector gains (no `digit-*` cell has a map interval above zero)."""


@dataclass(frozen=True)
class Run:
    cell: Cell
    arm: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.cell.name}/{self.arm}-s{self.seed}"

    def train_flags(self, args: argparse.Namespace) -> list[str]:
        """The run's train.py flags besides its paths, seed and threads; recorded with its
        scores, so that a rerun can tell a run trained under other code."""
        return ["--config", args.config, "--max-epochs", str(args.epochs),
                *self.cell.flags(args.epochs), *ARMS[self.arm]]  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = study_parser(f"{NAME}.py", __doc__)
    add = parser.add_argument
    add("--groups", default="a,b,d,c", help="comma-separated cell groups, run in this order: "
        + "; ".join(f"{g}: {text}" for g, text in GROUPS.items()))  # fmt: skip
    add("--seeds", default="0,1,2", help="comma-separated training seeds (never drop one)")
    add("--epochs", type=int, default=4, help="epochs per run, the same for every arm")
    add("--config", default="configs/paper.yaml", help="train.py config for every run")
    add("--commit", action="store_true", help="git-commit OUT's three files after every run")
    add_study_flags(parser, NAME, data_root=("data/where_it_helps", "datasets go to "
                    "DATA_ROOT/<dataset>"), runs=("runs/where_it_helps", "run directories"))  # fmt: skip
    parser.set_defaults(train=3000, val=300, test=1000)
    args = parser.parse_args(argv)
    groups = [g for g in args.groups.split(",") if g]
    if not groups or set(groups) - set(GROUPS):
        parser.error(f"--groups {args.groups!r}: choose from {', '.join(GROUPS)}")
    args.groups = list(dict.fromkeys(groups))
    try:
        args.seeds = sorted({int(s) for s in args.seeds.split(",")})
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give integers like 0,1,2")
    check_study_flags(parser, args, NAME, ("epochs", "train", "val", "test", "jobs", "threads"))
    if not (ROOT / args.config).is_file() and not Path(args.config).is_file():
        parser.error(f"--config {args.config}: no such file")
    if args.quick:
        args.train, args.val, args.test, args.epochs = 48, 16, 16, 1
        args.seeds = args.seeds[:1]
    return args


def plan(args: argparse.Namespace) -> list[Run]:
    """Every run, in the order they start: groups in ``--groups`` order, cells in table order,
    and within a cell seed by seed, so each seed's arms finish side by side."""
    return [
        Run(cell, arm, seed)
        for group in args.groups
        for cell in CELLS
        if cell.group == group
        for seed in args.seeds
        for arm in cell.arms
    ]


def dataset(name: str, args: argparse.Namespace, log: Log) -> Path:
    """``DATA_ROOT/NAME``, generated once (seed 0, the study's split sizes)."""
    flags = [*DATASETS[name], "--train", str(args.train), "--val", str(args.val),
             "--test", str(args.test), "--seed", "0"]  # fmt: skip
    wanted = {"train": args.train, "val": args.val, "test": args.test}
    return ensure_dataset(Path(args.data_root) / name, flags, wanted,
                          Path(args.runs) / f"data_{name}.log", log)  # fmt: skip


def train_and_score(run: Run, data: Path, args: argparse.Namespace, log: Log) -> dict[str, Any]:
    """Train one run (or finish it), score its final checkpoint on the test split; return the
    scores and the training speed."""
    out = Path(args.runs) / run.key
    scores = out / "test" / "metrics.json"
    if not (out / "metrics.json").is_file():
        cmd = train_command(out, ["--data", str(data), "--name", run.arm, "--seed",
                                  str(run.seed), "--accelerator", "cpu", "--devices", "1",
                                  "--threads", str(args.threads), *run.train_flags(args)])  # fmt: skip
        log(f"{run.key}: training")
        started = time.monotonic()
        _check(cmd, out.with_name(out.name + ".log"), python_env(args.threads))
        log(f"{run.key}: trained in {_duration(time.monotonic() - started)}")
    if not scores.is_file():
        cmd = [sys.executable, "-m", "coorddet.evaluate", "--data", str(data), "--split", "test",
               "--out", str(scores.parent), "--overwrite", "--quiet", "--device", "cpu",
               "--threads", str(args.threads), str(out / "checkpoints" / "last.ckpt")]  # fmt: skip
        _check(cmd, out.with_name(out.name + ".log"), python_env(args.threads))
    trained = json.loads((out / "metrics.json").read_text())
    (scored,) = json.loads(scores.read_text()).values()
    result = {key: scored.get(key) for key in METRICS if key in scored}
    result["train_img_per_s"] = trained.get("train_img_per_s")
    result["train_flags"] = run.train_flags(args)
    log(f"{run.key}: test map {format_number(result.get('map'))}, "
        f"gt_iou {format_number(result.get('gt_iou'))}")  # fmt: skip
    return result


def summarize(cell: Cell, scores: dict[str, dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """A cell's runs, its arms' means and the per-seed changes of its comparisons, over the
    seeds whose runs of both arms are done."""
    runs = {f"{arm}-s{seed}": scores[key] for seed in seeds for arm in cell.arms
            if (key := f"{cell.name}/{arm}-s{seed}") in scores}  # fmt: skip
    arms = {
        arm: {m: aggregate([runs[f"{arm}-s{s}"].get(m) for s in seeds if f"{arm}-s{s}" in runs])
              for m in METRICS}
        for arm in cell.arms
    }  # fmt: skip
    changes = {}
    for arm, reference in COMPARISONS[cell.arms]:
        paired = [s for s in seeds if f"{arm}-s{s}" in runs and f"{reference}-s{s}" in runs]
        changes[f"{arm} vs {reference}"] = {
            "seeds": paired,
            **{
                metric: aggregate([_difference(runs[f"{arm}-s{s}"].get(metric),
                                               runs[f"{reference}-s{s}"].get(metric))
                                   for s in paired])
                for metric in CHANGE_METRICS
            },
        }  # fmt: skip
    return {
        "group": cell.group,
        "dataset": cell.dataset,
        "detector": cell.detector,
        "complete": len(runs) == len(cell.arms) * len(seeds),
        "runs": runs,
        "arms": arms,
        "changes": changes,
    }


def _defining(results: dict[str, Any]) -> dict[str, Any]:
    """What must match for a rerun to continue a study: its data, budget and threads (not the
    seeds, which may grow, nor the runs at a time)."""
    setup = results.get("setup", {})
    keys = ("train", "val", "test", "epochs", "config", "threads")
    return {"quick": results.get("quick"), **{key: setup.get(key) for key in keys}}


def _difference(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else value - reference


class Results:
    """The study's JSON, Markdown and figure, rewritten (and optionally committed) after every
    run; one writer at a time."""

    def __init__(self, args: argparse.Namespace, command: str, log: Log) -> None:
        self.args, self.command, self.log = args, command, log
        self.lock = threading.Lock()
        self.out = Path(args.out)
        path = self.out / f"{NAME}.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        if old and _defining(old) != _defining(self.setup()):
            raise UserError(f"{path} holds a study with another setup ({_defining(old)}); "
                            "rerun with those settings or choose another --out")  # fmt: skip
        self.scores: dict[str, dict[str, Any]] = old.get("scores", {})
        self.wall = old.get("wall_seconds", 0.0)
        self.started = time.monotonic()
        # the code of every sitting that trained runs (a study may span several)
        commits = old.get("commits", [])
        self.commits = list(dict.fromkeys([*commits, git_commit() or "not recorded"]))

    def add(self, run: Run, result: dict[str, Any], done: int, total: int) -> None:
        with self.lock:
            self.scores[run.key] = result
            self.write(f"{run.key} ({done}/{total} runs)")

    def write(self, what: str) -> None:
        payload = self.payload()
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / f"{NAME}.json", payload)
        write_text_atomic(self.out / f"{NAME}.md", render_markdown(payload))
        plot_changes(payload, self.out / f"{NAME}.png")
        readme = update_readme(payload) if self.out.resolve() == ROOT / "results" else None
        if self.args.commit and not self.args.quick:
            self._commit(what, [readme] if readme else [])

    def setup(self) -> dict[str, Any]:
        """``quick`` and ``setup``: the settings of this sitting."""
        keys = ("train", "val", "test", "epochs", "seeds", "config", "jobs", "threads")
        return {"quick": self.args.quick, "setup": {key: getattr(self.args, key) for key in keys}}

    def payload(self) -> dict[str, Any]:
        args = self.args
        return {
            "command": self.command,
            **self.setup(),
            "wall_seconds": round(self.wall + time.monotonic() - self.started, 1),
            "datasets": {name: DATASETS[name] for name in DATASETS},
            "environment": describe_machine(),
            "commits": self.commits,
            "hypotheses": HYPOTHESES,
            "cells": {
                cell.name: summarize(cell, self.scores, args.seeds)
                for cell in CELLS
                if any(key.startswith(cell.name + "/") for key in self.scores)
            },  # fmt: skip
            "scores": self.scores,
        }

    def _commit(self, what: str, extra: list[Path]) -> None:
        files = [str(self.out / f"{NAME}.{ext}") for ext in ("json", "md", "png")]
        files += [str(path) for path in extra]
        for attempt in range(5):  # another git command may hold the index for a moment
            added = subprocess.run(["git", "add", *files], cwd=ROOT, capture_output=True)
            done = added.returncode == 0 and subprocess.run(
                ["git", "commit", "-q", "-m", f"results/{NAME}: {what}", "--", *files],
                cwd=ROOT, capture_output=True,
            ).returncode == 0  # fmt: skip
            if done:
                return
            time.sleep(2 + attempt)
        self.log(f"warning: could not commit {', '.join(files)}; commit them by hand")


def _interval(stats: dict[str, Any], digits: int = 3) -> str:
    """``+0.123 [+0.100, +0.146]`` for a change; ``-`` when there is none."""
    if stats["mean"] is None:
        return "-"
    if stats["ci95"] is None:
        return f"{stats['mean']:+.{digits}f}"
    low, high = stats["ci95"]
    return f"{stats['mean']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def summary_table(results: dict[str, Any]) -> str:
    """One row per cell and comparison: the change in map and gt_iou (mask AP too where there
    is one) with its 95% CI; also pasted into the README."""
    lines = ["| cell | detector | data | comparison | seeds | Δ map [95% CI] | "
             "Δ gt_iou [95% CI] |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for cell in CELLS:
        data = results["cells"].get(cell.name)
        for arm, reference in COMPARISONS[cell.arms]:
            comparison = f"{arm} vs {reference}"
            change = data["changes"][comparison] if data else None
            seeds = len(change["seeds"]) if change else 0
            if not seeds:
                cells = ["pending", "pending"]
            else:
                cells = [_interval(change["map"]), _interval(change["gt_iou"])]
                if change["segm_map"]["mean"] is not None:
                    cells[0] += f"; mask {_interval(change['segm_map'])}"
            lines.append(f"| {cell.group} | {cell.detector} | {cell.dataset} | {comparison} | "
                         f"{seeds} | " + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines)


def render_markdown(results: dict[str, Any]) -> str:
    env, setup = results["environment"], results["setup"]
    lines = [
        "# Where CoordConv helps in detection",
        "",
        f"Written by `experiments/{NAME}.py`; do not edit by hand. Command:",
        "",
        f"    {results['command']}",
        "",
        "## Hypotheses",
        "",
        results["hypotheses"],
        "",
        "## Setup",
        "",
        f"- data: `data_gen` seed 0, {setup['train']} train / {setup['val']} val / "
        f"{setup['test']} test canvases (the paper's canvases: 5 digits of 15-25 px, 120->64 "
        "crop; test digits held out); datasets: "
        + "; ".join(
            f"`{name}`: `{' '.join(flags) or '(defaults)'}`"
            for name, flags in results["datasets"].items()
        ),
        f"- training: `{setup['config']}`, {setup['epochs']} epochs, seeds {setup['seeds']}, "
        "the same for every arm; position labels without augmentation; one-stage detectors "
        f"with CoordConv at `backbone-stem,head-box`, `{' '.join(ONE_STAGE_OPTIMIZER)}` and "
        f"{one_stage_epochs(setup['epochs'])} epochs (the config's SGD left RetinaNet near map 0); "
        "scored from `last.ckpt` on the test split; each run's flags: the JSON's `train_flags`",
        f"- hardware: {env['cpu']} ({env['cpu_count']} CPUs), GPU: {env['gpu'] or 'none'}; "
        f"{setup['jobs']} runs at a time, {setup['threads']} torch thread(s) each",
        f"- software: Python {env['python']}, torch {env['torch']}, torchvision "
        f"{env['torchvision']}, lightning {env['lightning']}; coorddet commit(s) "
        f"{', '.join(results['commits'])}",
        f"- wall time so far: {_duration(results['wall_seconds'])}; "
        f"{len(results['scores'])} of {run_count(setup['seeds'])} runs done"
        + ("" if not results["quick"] else " (**--quick pipeline check: not a result**)"),
        "",
        "## Summary",
        "",
        "Δ: the arm's score minus the baseline's (or the named reference's) of the same seed, "
        "mean over seeds [95% t-interval]; `pending`: not run yet.",
        "",
        summary_table(results),
        "",
        "## Per run",
        "",
        "| run | " + " | ".join(METRICS) + " | train img/s |",
        "|" + "---|" * (len(METRICS) + 2),
    ]
    for key, scores in results["scores"].items():
        cells = [format_number(scores.get(m)) for m in (*METRICS, "train_img_per_s")]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "map: COCO mAP@[.5:.95] (pycocotools), segm_map the same for masks; gt_iou: mean best "
        "same-class IoU of each ground-truth box among the detections with score >= 0.5 (0 when "
        "there is none: RetinaNet's focal-loss scores seldom reach 0.5 in this budget); "
        "det_iou: mean best IoU of those detections. Crowd boxes (position labels near a "
        "region line) are neither trained on nor scored. Each arm's means and intervals: the JSON's `cells`.",
        "",
    ]
    return "\n".join(lines)


def run_count(seeds: list[int]) -> int:
    """Runs in the whole study (every group) with these seeds."""
    return sum(len(cell.arms) for cell in CELLS) * len(seeds)


def plot_changes(results: dict[str, Any], path: Path) -> None:
    """``path``: each cell's headline changes (Δ map, Δ gt_iou) with their 95% CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"{cell.group}: {cell.name} ({arm} vs {reference})",
             results["cells"].get(cell.name, {}).get("changes", {}).get(f"{arm} vs {reference}"))
            for cell in CELLS for arm, reference in COMPARISONS[cell.arms]]  # fmt: skip
    figure, axes = plt.subplots(1, 2, figsize=(12, 0.4 * len(rows) + 1.5), sharey=True)
    for axis, metric in zip(axes, ("map", "gt_iou"), strict=True):
        for y, (_, change) in enumerate(rows):
            stats = change[metric] if change else None
            if not stats or stats["mean"] is None:
                axis.text(0, y, "pending", ha="center", va="center", fontsize=7, color="grey")
                continue
            low, high = stats["ci95"] or (stats["mean"], stats["mean"])
            axis.errorbar(stats["mean"], y, xerr=[[stats["mean"] - low], [high - stats["mean"]]],
                          fmt="o", color="tab:blue", capsize=3)  # fmt: skip
        axis.axvline(0, color="black", linewidth=0.8)
        axis.set_xlabel(f"Δ {metric} (arm - reference, per seed; 95% CI)")
        axis.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    axes[0].invert_yaxis()
    figure.suptitle("Where CoordConv helps: change against the reference arm")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda file: figure.savefig(file, format="png", dpi=100))
    plt.close(figure)


README_BLOCK = ("<!-- where_it_helps summary: written by experiments/where_it_helps.py -->",
                "<!-- /where_it_helps summary -->")  # fmt: skip


def update_readme(results: dict[str, Any]) -> Path | None:
    """Put :func:`summary_table` between the README's :data:`README_BLOCK` markers; the README
    path if it changed. Never for a ``--quick`` study."""
    path = ROOT / "README.md"
    text = path.read_text()
    start, end = README_BLOCK
    if results["quick"] or start not in text or end not in text:
        return None
    head, rest = text.split(start, 1)
    new = f"{head}{start}\n{summary_table(results)}\n{end}{rest.split(end, 1)[1]}"
    if new == text:
        return None
    write_text_atomic(path, new)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    code = study_main(args, NAME, render_markdown, lambda: run_study(args, argv))
    if args.render and (ROOT / args.out).resolve() == ROOT / "results":
        update_readme(json.loads((ROOT / args.out / f"{NAME}.json").read_text()))
    return code


def run_study(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    log = Log()
    runs = plan(args)
    results = Results(args, study_command(f"{NAME}.py", argv), log)
    log(f"{len(runs)} runs: groups {', '.join(args.groups)}, seeds {args.seeds}, "
        f"{args.epochs} epochs, {args.train} train canvases")  # fmt: skip
    if not (Path(args.out) / f"{NAME}.json").is_file():
        results.write("hypotheses and plan, before the first run")
    data = {name: dataset(name, args, log) for name in dict.fromkeys(r.cell.dataset for r in runs)}
    stale = [run.key for run in runs if run.key in results.scores
             and results.scores[run.key].get("train_flags") != run.train_flags(args)]  # fmt: skip
    if stale:
        raise UserError(f"{args.out}/{NAME}.json: {len(stale)} finished run(s) trained with other "
                        f"train.py flags than this code gives ({', '.join(stale)}); delete them "
                        "from its `scores` and their folders under --runs, then rerun")  # fmt: skip
    todo = [run for run in runs if run.key not in results.scores]
    for run in runs:
        if run.key in results.scores:
            log(f"{run.key}: done earlier, kept")
    done, failed = len(runs) - len(todo), []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(train_and_score, run, data[run.cell.dataset], args, log): run
                   for run in todo}  # fmt: skip
        for future in as_completed(futures):
            run = futures[future]
            try:
                result = future.result()
            except RuntimeError as error:  # one failed run does not stop the others
                log(f"{run.key}: failed: {error}")
                failed.append(run.key)
                continue
            done += 1
            results.add(run, result, done, len(runs))
    log(f"{done}/{len(runs)} runs done; wrote {args.out}/{NAME}.{{json,md,png}}")
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed ({', '.join(failed)}); see their logs "
                           "under --runs, then rerun to retry them")  # fmt: skip
    return 0


if __name__ == "__main__":
    run_main(main)
