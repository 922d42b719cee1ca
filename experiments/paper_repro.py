"""Reproduce the paper's MNIST-detection experiment: baseline vs CoordConv Faster R-CNN.

Liu et al. 2018 (arXiv 1807.03247) report about 24% better IOU with CoordConv for a Faster
R-CNN finding MNIST digits scattered on 64x64 canvases. This script reruns that comparison
with coorddet, end to end, from the real command lines:

1. ``python -m data_gen``: the paper setup (64x64 canvases, 5 digits of 15-25 px, 120->64 centre
   crop, 9,000 train / 1,000 val canvases, 1,000 test canvases from held-out digits), once per
   split mode (``uniform``, and ``quadrant``: test digits only in the quadrant never seen in
   training);
2. ``python train.py --config configs/paper.yaml``: every arm for every seed with the same
   epochs, schedule, data and seeds (arms differ only in their CoordConv flags);
3. ``python -m coorddet.evaluate --group``: each study's final checkpoints (``last.ckpt``, so
   no arm gets a checkpoint selection the other lacks) on the test split;
4. ``results/paper_repro.json`` and ``results/paper_repro.md``: mean +- std, 95% CI, relative
   change, wall time, hardware, software versions and the exact command.

Studies: ``uniform`` (the paper's), ``quadrant`` (its generalization split, never run for
detection in the paper) and ``with_r`` (ablation: the radius channel, on the uniform data).
Runs are shared where they coincide (``with_r`` reuses the uniform baseline and CoordConv runs).

Training jobs run ``--jobs`` at a time with ``--threads`` torch threads each (on a small
machine, one-thread jobs side by side move more images per second than one job with all the
threads: they never wait for each other). The script can be
stopped and rerun: finished runs are kept, unfinished ones continue with ``--resume last``.
One study at a time uses a ``--runs`` folder (a second exits 2 naming the first); each
``train.py``, ``coorddet.evaluate`` and ``data_gen`` it starts holds its own output folder too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from study import (
    ROOT,
    Log,
    add_study_flags,
    check_study_flags,
    git_commit,
    mean_ci,
    paper_dataset,
    python_env,
    run_main,
    study_command,
    study_main,
    study_parser,
    train_command,
)
from study import check_call as _check
from study import duration as _duration

from coorddet.fileio import write_json_atomic, write_text_atomic
from coorddet.report import aggregate, format_number, format_percent, relative_change
from coorddet.system import describe_machine

# Arm name -> train.py flags. The CoordConv sites are configs/paper.yaml's (the paper's:
# backbone-stem, rpn-head, rpn-box).
ARMS: dict[str, list[str]] = {
    "baseline": ["--no-coordconv"],
    "coordconv": ["--coordconv", "--no-with-r"],
    "coordconv_r": ["--coordconv", "--with-r"],
}
# Study -> (split mode, arms). The first arm is the reference for relative changes.
STUDIES: dict[str, tuple[str, list[str]]] = {
    "uniform": ("uniform", ["baseline", "coordconv"]),
    "quadrant": ("quadrant", ["baseline", "coordconv"]),
    "with_r": ("uniform", ["baseline", "coordconv", "coordconv_r"]),
}
HEADLINE = ("rpn_iou", "gt_iou", "det_iou", "map", "map_50")
METRICS = ("map", "map_50", "map_75", "mar_100", "rpn_iou", "det_iou", "gt_iou")
DESCRIPTIONS = {
    "uniform": "the paper's split: train, val and test digits anywhere on the canvas",
    "quadrant": "generalization split: test digit centres only in the bottom-right quadrant, "
    "which no training digit occupies",
    "with_r": "ablation on the uniform data: CoordConv with the extra radius channel r",
}


@dataclass(frozen=True)
class Run:
    split: str
    arm: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.split}/{self.arm}-s{self.seed}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = study_parser("paper_repro.py", __doc__)
    add = parser.add_argument
    add(
        "--studies",
        default="uniform,quadrant,with_r",
        help="comma-separated: " + ", ".join(STUDIES),
    )
    add("--seeds", default="0,1,2", help="comma-separated training seeds (never drop one)")
    add("--epochs", type=int, default=4, help="epochs per run, the same for every arm")
    add("--config", default="configs/paper.yaml", help="train.py config for every run")
    add_study_flags(parser, "paper_repro",
                    data_root=("data/paper", "datasets go to DATA_ROOT/<split mode>"),
                    runs=("runs/paper", "run directories and per-study reports"))  # fmt: skip
    args = parser.parse_args(argv)
    args.studies = _names(parser, "--studies", args.studies, STUDIES)
    try:
        args.seeds = sorted({int(s) for s in args.seeds.split(",")})
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give integers like 0,1,2")
    check_study_flags(parser, args, "paper_repro",
                      ("epochs", "train", "val", "test", "jobs", "threads"))  # fmt: skip
    if not (ROOT / args.config).is_file() and not Path(args.config).is_file():
        parser.error(f"--config {args.config}: no such file")
    if args.quick:
        args.train, args.val, args.test, args.epochs = 96, 32, 32, 1
        args.seeds = args.seeds[:1]
    return args


def _names(parser: argparse.ArgumentParser, flag: str, text: str, known: dict) -> list[str]:
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        parser.error(f"{flag} {text!r}: choose from {', '.join(known)}")
    return list(dict.fromkeys(names))


def train(run: Run, data: Path, args: argparse.Namespace, log: Log) -> dict[str, Any]:
    """Train one run (or finish it); return its ``metrics.json``."""
    out = Path(args.runs) / run.key
    metrics = out / "metrics.json"
    if metrics.is_file():
        log(f"{run.key}: done earlier, kept")
        return json.loads(metrics.read_text())
    cmd = train_command(out, ["--config", args.config, "--data", str(data), "--name", run.arm,
                              "--seed", str(run.seed), "--max-epochs", str(args.epochs),
                              "--accelerator", "cpu", "--devices", "1", *ARMS[run.arm]])  # fmt: skip
    log(f"{run.key}: training")
    started = time.monotonic()
    _check(cmd, out.with_name(out.name + ".log"), python_env(args.threads))
    result = json.loads(metrics.read_text())
    log(f"{run.key}: trained in {_duration(time.monotonic() - started)}, "
        f"{result['train_img_per_s']} img/s, val map {result['map']:.4f}")  # fmt: skip
    return result


def evaluate(study: str, runs: list[Run], data: Path, args: argparse.Namespace, log: Log) -> Path:
    report = Path(args.runs) / "reports" / study
    ckpts = [str(Path(args.runs) / run.key / "checkpoints" / "last.ckpt") for run in runs]
    cmd = [sys.executable, "-m", "coorddet.evaluate", "--data", str(data), "--split", "test",
           "--out", str(report), "--group", "--overwrite", "--quiet", "--device", "cpu", *ckpts]  # fmt: skip
    started = time.monotonic()
    _check(cmd, Path(args.runs) / "reports" / f"{study}.log", python_env(args.threads))
    log(f"{study}: evaluated {len(runs)} checkpoints in {time.monotonic() - started:.1f} s")
    return report


def summarize(study: str, runs: list[Run], report: Path, wall: float) -> dict[str, Any]:
    """One study's numbers: per-arm aggregates from ``groups.json``, per-run metrics, and the
    per-seed relative change of each arm against the reference arm (seeds are paired: the same
    data, data order and, for the layers both arms share, the same initial weights)."""
    _, arms = STUDIES[study]
    groups = json.loads((report / "groups.json").read_text())
    per_run = json.loads((report / "metrics.json").read_text())
    if len(per_run) != len(runs):
        raise RuntimeError(f"{report}: {len(per_run)} runs scored, expected {len(runs)}")
    names = dict(zip(runs, per_run, strict=True))  # evaluate keeps the checkpoints' order
    reference = arms[0]
    result: dict[str, Any] = {
        "description": DESCRIPTIONS[study],
        "split_mode": STUDIES[study][0],
        "arms": {arm: groups[arm] for arm in arms},
        "runs": {run.key: per_run[names[run]] for run in runs},
        "change_vs_" + reference: {},
        "wall_seconds_since_start": round(wall, 1),
        "report": str(report),
    }
    by_arm_seed = {(run.arm, run.seed): per_run[names[run]] for run in runs}
    seeds = sorted({run.seed for run in runs})
    for arm in arms[1:]:
        result["change_vs_" + reference][arm] = {
            key: {
                "of_means": relative_change(
                    groups[arm][key]["mean"], groups[reference][key]["mean"]
                ),
                "per_seed": aggregate(
                    [
                        relative_change(
                            by_arm_seed[arm, seed].get(key), by_arm_seed[reference, seed].get(key)
                        )
                        for seed in seeds
                    ]
                ),
            }
            for key in METRICS
        }
    return result


def _cell(stats: dict[str, Any]) -> str:
    if stats["mean"] is None:
        return "-"
    if stats["std"] is None:
        return format_number(stats["mean"])
    low, high = stats["ci95"]
    return f"{stats['mean']:.4f} ± {stats['std']:.4f} [{low:.4f}, {high:.4f}]"


def _change_cell(change: dict[str, Any]) -> str:
    seeds = change["per_seed"]
    if seeds["ci95"] is None:
        return format_percent(change["of_means"])
    low, high = seeds["ci95"]
    per_seed = f"{format_percent(seeds['mean'])} [{format_percent(low)}, {format_percent(high)}]"
    return f"{format_percent(change['of_means'])} (per seed {per_seed})"


SUMMARY_METRICS = ("rpn_iou", "gt_iou", "det_iou", "map")


def summary_table(results: dict[str, Any]) -> str:
    """The headline table (also pasted into the README): per study and compared arm, the
    reference and arm means with 95% CIs, and the per-seed relative change with its 95% CI."""
    lines = [
        "| study | metric | baseline | CoordConv arm | change (95% CI) |",
        "|---|---|---|---|---|",
    ]
    for study, data in results["studies"].items():
        arms = list(data["arms"])
        reference = arms[0]
        for arm in arms[1:]:
            if study == "with_r" and arm != "coordconv_r":
                continue  # the uniform study's comparison, shown there
            for key in SUMMARY_METRICS:
                change = data["change_vs_" + reference][arm][key]["per_seed"]
                ci = change["ci95"]
                interval = f" [{format_percent(ci[0])}, {format_percent(ci[1])}]" if ci else ""
                lines.append(
                    f"| {study} | {key} | {_mean_ci(data['arms'][reference][key])} | "
                    f"{arm}: {_mean_ci(data['arms'][arm][key])} | "
                    f"{format_percent(change['mean'])}{interval} |"
                )
    return "\n".join(lines)


def _mean_ci(stats: dict[str, Any]) -> str:
    return mean_ci(stats, 3)


def render_markdown(results: dict[str, Any]) -> str:
    env, setup = results["environment"], results["setup"]
    lines = [
        "# CoordConv vs baseline Faster R-CNN on MNIST detection (paper reproduction)",
        "",
        "Written by `experiments/paper_repro.py`; do not edit by hand. Command:",
        "",
        f"    {results['command']}",
        "",
        f"- setup: {setup['train']} train / {setup['val']} val / {setup['test']} test canvases "
        f"(64x64, 5 digits of 15-25 px, 120->64 crop, test digits held out), "
        f"`{setup['config']}`, {setup['epochs']} epochs per run, seeds {setup['seeds']}, "
        f"final checkpoints (`last.ckpt`) on the test split",
        f"- hardware: {env['cpu']} ({env['cpu_count']} CPUs), GPU: {env['gpu'] or 'none'}; "
        f"{setup['jobs']} runs at a time, {setup['threads']} torch thread(s) each",
        f"- software: Python {env['python']}, torch {env['torch']}, torchvision "
        f"{env['torchvision']}, lightning {env['lightning']}; coorddet commit "
        f"{results.get('commit') or 'not recorded'}",
        f"- wall time: {_duration(results['wall_seconds'])} for everything below"
        + ("" if not results["quick"] else " (**--quick pipeline check: not a result**)"),
        "",
        "## Summary",
        "",
        "Means over seeds [95% CI]; change: the mean of the per-seed relative changes against the "
        "baseline of the same seed [95% CI].",
        "",
        summary_table(results),
        "",
        "## Details",
        "",
        "Cells: mean ± std [95% CI] over seeds. Change: relative change of the arm means against "
        "the baseline, then the mean and 95% CI of the per-seed relative changes.",
    ]
    for study, data in results["studies"].items():
        arms = list(data["arms"])
        reference = arms[0]
        changes = data["change_vs_" + reference]
        lines += ["", f"### {study}", "", f"{data['description'].capitalize()}. "
                  f"Done {_duration(data['wall_seconds_since_start'])} after the start.", ""]  # fmt: skip
        header = ["metric", *arms, *(f"{arm} vs {reference}" for arm in arms[1:])]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for key in METRICS:
            cells = [_cell(data["arms"][arm][key]) for arm in arms]
            cells += [_change_cell(changes[arm][key]) for arm in arms[1:]]
            lines.append("| " + " | ".join([key, *cells]) + " |")
        lines += ["", "Per run:", "", "| run | " + " | ".join(HEADLINE) + " |",
                  "|" + "---|" * (len(HEADLINE) + 1)]  # fmt: skip
        for key, metrics in data["runs"].items():
            lines.append(
                f"| {key} | " + " | ".join(format_number(metrics.get(m)) for m in HEADLINE) + " |"
            )
    lines += [
        "",
        "rpn_iou: mean best IoU of each image's top-10 RPN proposals after NMS at 0.8 (the "
        "paper's IOU); det_iou: mean best IoU of detections with score >= 0.5; gt_iou: mean best "
        "same-class IoU of each ground-truth digit (0 when missed); map*/mar*: pycocotools "
        "COCOeval.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return study_main(args, "paper_repro", render_markdown, lambda: run_studies(args, argv))


def run_studies(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    log = Log()
    command = study_command("paper_repro.py", argv)
    log(f"{command}: studies {', '.join(args.studies)}, seeds {args.seeds}, {args.epochs} epochs")
    data = {split: paper_dataset("split_mode", split, args, log)
            for split in dict.fromkeys(STUDIES[s][0] for s in args.studies)}  # fmt: skip
    plan = {study: [Run(STUDIES[study][0], arm, seed) for arm in STUDIES[study][1]
                    for seed in args.seeds] for study in args.studies}  # fmt: skip
    futures: dict[Run, Future] = {}
    results: dict[str, Any] = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for runs in plan.values():  # queued in study order; shared runs train once
            for run in runs:
                if run not in futures:
                    futures[run] = pool.submit(train, run, data[run.split], args, log)
        for study, runs in plan.items():
            for run in runs:
                futures[run].result()
            report = evaluate(study, runs, data[STUDIES[study][0]], args, log)
            results[study] = summarize(study, runs, report, time.monotonic() - log.start)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command,
        "quick": args.quick,
        "wall_seconds": round(time.monotonic() - log.start, 1),
        "setup": {
            key: getattr(args, key)
            for key in ("train", "val", "test", "epochs", "seeds", "config", "jobs", "threads")
        },
        "environment": describe_machine(),
        "commit": git_commit(),
        "studies": results,
    }
    write_json_atomic(out / "paper_repro.json", payload)
    write_text_atomic(out / "paper_repro.md", render_markdown(payload))
    log(f"wrote {out / 'paper_repro.json'} and {out / 'paper_repro.md'}")
    return 0


if __name__ == "__main__":
    run_main(main)
