"""The CoordConv paper's own detection protocol, and a ladder from it to coorddet's study.

``results/paper_repro.md`` compares CoordConv and baseline with torchvision's Faster R-CNN and
finds no gain; the paper's "24% better IOU" comes from its released code
(``uber-research/CoordConv``, ``train_faster_rcnn.py``), which differs in several ways. This
script runs that released protocol (``configs/paper_released.yaml``) and walks from it to
coorddet's default study one change per rung, baseline and CoordConv, the same seeds and
budget for both arms:

- ``R0`` the released code as it runs: its anchor layout, 'valid' padding, placement boxes,
  RPN only, its sampler and optimiser, one image per step (5 seeds by default);
- ``R1`` R0 with the intended anchor layout;
- ``R2`` R1 with 'same' padding;
- ``R3`` R2 with visible-ink boxes (``data_gen``'s default data);
- ``R4`` R3 with torchvision's RPN (head, anchors, sampler, losses; still RPN only);
- ``R5`` the full Faster R-CNN of ``configs/paper.yaml``, trained longer (``--r5-epochs``).

Every run is ``python train.py`` then ``python -m coorddet.evaluate`` on its final checkpoint
(``last.ckpt``) on the test split. Each finished run's record goes into
``results/paper_protocol.json`` (``{"runs": [...]}``) and ``results/paper_protocol.md`` at
once, atomically: stop the script at any time and rerun the same command to continue
(finished runs are kept, an interrupted one resumes from its last checkpoint).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from study import (
    ROOT,
    Log,
    add_study_flags,
    check_call,
    check_study_flags,
    duration,
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

from coorddet.fileio import write_json_atomic, write_text_atomic
from coorddet.report import aggregate, format_number, format_percent, relative_change
from coorddet.system import describe_machine

RELEASED = "configs/paper_released.yaml"
FASTER_RCNN = "configs/paper.yaml"
ARMS = {"baseline": ["--no-coordconv"], "coordconv": ["--coordconv", "--no-with-r"]}


@dataclass(frozen=True)
class Rung:
    description: str
    boxes: str  # the dataset: "placement" (the released loader's) or "visible"
    config: str = RELEASED
    model: dict[str, Any] = field(default_factory=dict)  # changes to the config's model section


RUNGS = {
    "R0": Rung("the released code as it runs: its anchor layout, 'valid' padding, placement "
               "boxes, RPN only, its sampler and optimiser, one image per step", "placement"),
    "R1": Rung("R0 with the intended anchor layout", "placement", model={"anchor_layout": "intended"}),
    "R2": Rung("R1 with 'same' padding", "placement",
               model={"anchor_layout": "intended", "backbone_padding": "same"}),
    "R3": Rung("R2 with visible-ink boxes (data_gen's default data)", "visible",
               model={"anchor_layout": "intended", "backbone_padding": "same"}),
    "R4": Rung("R3 with torchvision's RPN (RPNHead, anchors 12/18/24 x 0.5/1/2, its sampler and "
               "losses), still RPN only", "visible",
               model={"anchor_layout": "intended", "backbone_padding": "same", "rpn": "torchvision"}),
    "R5": Rung("the full Faster R-CNN of configs/paper.yaml (batch 16, lr 0.02 cosine), "
               "trained longer", "visible", config=FASTER_RCNN),
}  # fmt: skip


@dataclass(frozen=True)
class Run:
    rung: str
    arm: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.rung}/{self.arm}-s{self.seed}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = study_parser("paper_protocol.py", __doc__)
    add = parser.add_argument
    add("--rungs", default=",".join(RUNGS), help="comma-separated: " + ", ".join(RUNGS))
    add("--seeds", default="0,1,2", help="training seeds of every rung but R0 (never drop one)")
    add("--r0-seeds", default="0,1,2,3,4", help="training seeds of R0")
    add("--epochs", type=int, default=5, help="epochs of R0-R4 (the released default)")
    add("--r5-epochs", type=int, default=12, help="epochs of R5 (paper.yaml's cosine schedule)")
    add_study_flags(parser, "paper_protocol",
                    data_root=("data/paper_protocol", "datasets: DATA_ROOT/<boxes>"),
                    runs=("runs/paper_protocol", "run directories, configs and logs"))  # fmt: skip
    args = parser.parse_args(argv)
    rungs = [r for r in args.rungs.split(",") if r]
    if not rungs or any(r not in RUNGS for r in rungs):
        parser.error(f"--rungs {args.rungs!r}: choose from {', '.join(RUNGS)}")
    args.rungs = [r for r in RUNGS if r in rungs]
    for name in ("seeds", "r0_seeds"):
        try:
            setattr(args, name, sorted({int(s) for s in getattr(args, name).split(",")}))
        except ValueError:
            parser.error(f"--{name.replace('_', '-')}: give integers like 0,1,2")
    check_study_flags(parser, args, "paper_protocol",
                      ("epochs", "r5_epochs", "train", "val", "test", "jobs", "threads"))  # fmt: skip
    if args.quick:
        args.train, args.val, args.test, args.epochs, args.r5_epochs = 64, 16, 16, 1, 1
        args.seeds, args.r0_seeds = args.seeds[:1], args.r0_seeds[:1]
    return args


def plan(args: argparse.Namespace) -> list[Run]:
    """Every run, the two arms of a seed next to each other, queued so that a study stopped
    early has the most telling pairs: R0 and R1 seed by seed, then R2-R4 seed by seed, then
    R0's extra seeds, then R5 (the longest runs)."""
    runs = [
        Run(rung, arm, seed)
        for rung in args.rungs
        for seed in (args.r0_seeds if rung == "R0" else args.seeds)
        for arm in ARMS
    ]

    def queue(run: Run) -> tuple[int, int, str]:
        if run.rung == "R5":
            return 3, run.seed, run.rung
        if run.rung == "R0" and run.seed not in args.seeds:
            return 2, run.seed, run.rung
        return (0 if run.rung in ("R0", "R1") else 1), run.seed, run.rung

    return sorted(runs, key=queue)  # stable: baseline before coordconv


def rung_config(rung: str, data: Path, args: argparse.Namespace) -> Path:
    """``RUNS/configs/<rung>.yaml``: the rung's base config with its changes and dataset."""
    spec = RUNGS[rung]
    config = yaml.safe_load((ROOT / spec.config).read_text())
    config.setdefault("model", {}).update(spec.model)
    config.setdefault("data", {})["data_dir"] = str(data)
    config.setdefault("trainer", {})["max_epochs"] = args.r5_epochs if rung == "R5" else args.epochs
    path = Path(args.runs) / "configs" / f"{rung}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# {rung}: {spec.description}\n# written by experiments/paper_protocol.py from {spec.config}\n"
    write_text_atomic(path, header + yaml.safe_dump(config, sort_keys=False))
    return path


def read_curves(log: Path) -> dict[str, list[float]]:
    """Per-epoch validation ``rpn_iou`` and ``map`` and mean training loss from ``metrics.csv``."""
    curves: dict[str, dict[int, float]] = {"rpn_iou": {}, "map": {}, "train_loss_epoch": {}}
    with log.open(newline="") as file:
        for row in csv.DictReader(file):
            for key, values in curves.items():
                if row.get(key):
                    values[int(float(row["epoch"]))] = float(row[key])
    return {key: [values[e] for e in sorted(values)] for key, values in curves.items()}


def run_one(run: Run, config: Path, data: Path, args: argparse.Namespace, log: Log) -> dict:
    """Train ``run`` (or finish it), evaluate its final checkpoint on the test split."""
    out = Path(args.runs) / run.rung / f"{run.arm}-s{run.seed}"
    ckpt = out / "checkpoints" / "last.ckpt"
    if not (out / "metrics.json").is_file():
        cmd = train_command(out, ["--config", str(config), "--name", run.arm, "--seed",
                                  str(run.seed), "--accelerator", "cpu", "--devices", "1",
                                  *ARMS[run.arm]])  # fmt: skip
        log(f"{run.key}: training")
        check_call(cmd, out.with_name(out.name + ".log"), python_env(args.threads))
    trained = json.loads((out / "metrics.json").read_text())
    report = out.with_name(out.name + ".eval")
    cmd = [sys.executable, "-m", "coorddet.evaluate", "--data", str(data), "--split", "test",
           "--out", str(report), "--overwrite", "--quiet", "--device", "cpu", str(ckpt)]  # fmt: skip
    check_call(cmd, out.with_name(out.name + ".log"), python_env(args.threads))
    (test,) = json.loads((report / "metrics.json").read_text()).values()
    curves = read_curves(out / "logs" / "metrics.csv")
    val = curves["rpn_iou"]
    record = {
        "rung": run.rung,
        "arm": run.arm,
        "seed": run.seed,
        "rpn_iou": test["rpn_iou"],
        "val_rpn_iou_per_epoch": val,
        "train_loss_per_epoch": curves["train_loss_epoch"],
        "val_rpn_iou_final": val[-1] if val else None,
        "val_rpn_iou_best": max(val) if val else None,
        "val_rpn_iou_mean": sum(val) / len(val) if val else None,
        "map": test["map"],
        "val_map_per_epoch": curves["map"],
        "epochs": trained["epochs"],
        "train_seconds": trained["train_seconds"],
        "train_img_per_s": trained["train_img_per_s"],
        "commit": git_commit(),
        "run": str(out),
    }
    log(f"{run.key}: test rpn_iou {test['rpn_iou']:.4f} after {trained['epochs']} epochs "
        f"({trained['train_seconds']:.0f} s, {trained['train_img_per_s']} img/s)")  # fmt: skip
    return record


# -- the report ------------------------------------------------------------------------------


def _mean_ci(stats: dict[str, Any]) -> str:
    return mean_ci(stats, 4)


def _change(stats: dict[str, Any]) -> str:
    if stats["mean"] is None:
        return "-"
    if stats["ci95"] is None:
        return format_percent(stats["mean"])
    low, high = stats["ci95"]
    return f"{format_percent(stats['mean'])} [{format_percent(low)}, {format_percent(high)}]"


def _value(record: dict[str, Any], key: str) -> float | None:
    if key == "train_loss_final":
        losses = record["train_loss_per_epoch"]
        return losses[-1] if losses else None
    return record.get(key)


def rung_summary(records: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Per arm ``aggregate`` of ``key`` and the per-seed paired relative change (seeds that
    have both arms)."""
    by = {(r["arm"], r["seed"]): _value(r, key) for r in records}
    arms = {arm: aggregate([v for (a, _), v in by.items() if a == arm]) for arm in ARMS}
    seeds = sorted(
        {s for (a, s) in by if a == "baseline"} & {s for (a, s) in by if a == "coordconv"}
    )
    change = aggregate([relative_change(by["coordconv", s], by["baseline", s]) for s in seeds])
    return {"arms": arms, "change": change, "paired_seeds": seeds}


def summary_table(results: dict[str, Any]) -> str:
    """Per rung: test rpn_iou of the final checkpoints, both arms and the paired change."""
    lines = [
        "| rung | change | baseline rpn_iou | CoordConv rpn_iou | CoordConv vs baseline, per seed |",
        "|---|---|---|---|---|",
    ]
    for rung, spec in RUNGS.items():
        records = [r for r in results["runs"] if r["rung"] == rung]
        if not records:
            continue
        summary = rung_summary(records, "rpn_iou")
        lines.append(
            f"| {rung} | {spec.description} | {_mean_ci(summary['arms']['baseline'])} | "
            f"{_mean_ci(summary['arms']['coordconv'])} | {_change(summary['change'])} "
            f"(n={summary['change']['n']}) |"
        )
    return "\n".join(lines)


def _curve(values: list[float] | None) -> str:
    return " ".join(f"{v:.3f}" for v in values) if values else "-"


def render_markdown(results: dict[str, Any]) -> str:
    env, setup = results["environment"], results["setup"]
    lines = [
        "# The CoordConv paper's released detection protocol, and a ladder to coorddet's study",
        "",
        "Written by `experiments/paper_protocol.py`; do not edit by hand. Command:",
        "",
        f"    {results['command']}",
        "",
        f"- data: {setup['train']} train / {setup['val']} val / {setup['test']} test canvases "
        "(64x64, 5 digits of 15-25 px, 120->64 crop, test digits held out), seed 0; "
        "`placement` (the released loader's unclipped boxes) or `visible` (ink) ground truth",
        f"- budget: R0-R4 {setup['epochs']} epochs of one image per step; R5 "
        f"{setup['r5_epochs']} epochs; seeds {setup['seeds']} (R0: {setup['r0_seeds']}); both "
        "arms of a seed share data, data order and initial weights",
        f"- hardware: {env['cpu']} ({env['cpu_count']} CPUs), GPU: {env['gpu'] or 'none'}; "
        f"{setup['jobs']} runs at a time, {setup['threads']} torch thread(s) each",
        f"- software: Python {env['python']}, torch {env['torch']}, torchvision "
        f"{env['torchvision']}, lightning {env['lightning']}; commits "
        f"{', '.join(sorted({str(r['commit']) for r in results['runs']})) or '-'}",
        f"- wall time: {duration(sum(results['wall_seconds']))} in {len(results['wall_seconds'])} "
        f"sitting(s); {len(results['runs'])} of {results['planned']} runs done"
        + (" (**--quick pipeline check: not a result**)" if results["quick"] else ""),
        "",
        "## Summary",
        "",
        "rpn_iou on the test split of each run's final checkpoint (`last.ckpt`): mean over "
        "seeds [95% CI]; the change is the mean of the per-seed relative changes of CoordConv "
        "against the baseline of the same seed [95% CI].",
        "",
        summary_table(results),
        "",
        "## Final, best and mean-over-epochs validation rpn_iou; training loss",
        "",
        "The released protocol may train unstably, so the validation curve is summarised three "
        "ways (the last epoch, the best epoch, the mean over epochs), with the mean training "
        "loss of the last epoch; the summary above uses the final checkpoint on the test split.",
        "",
        "| rung | value | baseline | CoordConv | change per seed |",
        "|---|---|---|---|---|",
        *_validation_rows(results),
        "",
        "## Runs",
        "",
        "| run | test rpn_iou | val rpn_iou per epoch | train loss per epoch | test map | s |",
        "|---|---|---|---|---|---|",
        *_run_rows(results),
        "",
        "Rungs:",
        "",
        *(f"- {rung}: {spec.description}" for rung, spec in RUNGS.items()),
        "",
    ]
    return "\n".join(lines)


def _validation_rows(results: dict[str, Any]) -> list[str]:
    """Per rung: the final, best and mean validation rpn_iou and the last training loss."""
    lines = []
    for rung in RUNGS:
        records = [r for r in results["runs"] if r["rung"] == rung]
        for key in (
            "val_rpn_iou_final",
            "val_rpn_iou_best",
            "val_rpn_iou_mean",
            "train_loss_final",
        ):
            if not records:
                continue
            summary = rung_summary(records, key)
            name = (
                "training loss, last epoch"
                if key == "train_loss_final"
                else key.removeprefix("val_rpn_iou_")
            )
            lines.append(
                f"| {rung} | {name} | "
                f"{_mean_ci(summary['arms']['baseline'])} | "
                f"{_mean_ci(summary['arms']['coordconv'])} | {_change(summary['change'])} |"
            )
    return lines


def _run_rows(results: dict[str, Any]) -> list[str]:
    """One row per run, then R5's per-epoch validation map."""
    lines = []
    for record in sorted(results["runs"], key=lambda r: (r["rung"], r["seed"], r["arm"])):
        lines.append(
            f"| {record['rung']}/{record['arm']}-s{record['seed']} | "
            f"{format_number(record['rpn_iou'])} | {_curve(record['val_rpn_iou_per_epoch'])} | "
            f"{_curve(record['train_loss_per_epoch'])} | {format_number(record.get('map'))} | "
            f"{record['train_seconds']:.0f} |"
        )
    r5 = [r for r in results["runs"] if r["rung"] == "R5" and r["arm"] == "baseline"]
    if r5:
        lines += ["", "R5 validation map per epoch (baseline): " + "; ".join(
            f"s{r['seed']}: {_curve(r['val_map_per_epoch'])}" for r in r5)]  # fmt: skip
    return lines


class Results:
    """``OUT/paper_protocol.json``, rewritten (with its Markdown) as each run finishes."""

    def __init__(self, args: argparse.Namespace, command: str, planned: int) -> None:
        self.path = Path(args.out) / "paper_protocol.json"
        previous = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if previous and previous.get("quick") != args.quick:
            raise RuntimeError(f"{self.path} holds a {'quick' if previous['quick'] else 'full'} "
                               "study; use another --out")  # fmt: skip
        setup = {key: getattr(args, key) for key in
                 ("train", "val", "test", "epochs", "r5_epochs", "seeds", "r0_seeds", "jobs", "threads")}  # fmt: skip
        if previous and {
            k: previous["setup"].get(k) for k in ("train", "val", "test", "epochs")
        } != {k: setup[k] for k in ("train", "val", "test", "epochs")}:
            raise RuntimeError(
                f"{self.path} was made with other settings ({previous['setup']}); use another --out"
            )
        self.data = {
            "command": command,
            "quick": args.quick,
            "setup": setup,
            "environment": describe_machine(),
            "wall_seconds": previous.get("wall_seconds", []) + [0.0],
            "planned": planned,
            "runs": previous.get("runs", []),
        }
        self.started = time.monotonic()
        self.lock = threading.Lock()

    def done(self, run: Run) -> bool:
        return any(
            (r["rung"], r["arm"], r["seed"]) == (run.rung, run.arm, run.seed)
            for r in self.data["runs"]
        )

    def add(self, record: dict[str, Any] | None = None) -> None:
        with self.lock:
            if record is not None:
                self.data["runs"].append(record)
            self.data["wall_seconds"][-1] = round(time.monotonic() - self.started, 1)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.data)
            write_text_atomic(self.path.with_suffix(".md"), render_markdown(self.data))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return study_main(args, "paper_protocol", render_markdown, lambda: run_ladder(args, argv))


def run_ladder(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    log = Log()
    command = study_command("paper_protocol.py", argv)
    runs = plan(args)
    results = Results(args, command, len(runs))
    todo = [run for run in runs if not results.done(run)]
    log(f"{command}: {len(runs) - len(todo)} of {len(runs)} runs done earlier; {len(todo)} to go")
    # Both kinds of boxes come from the same seed, so they hold the same digits at the same
    # places; only the boxes differ (and a digit keeping under 25% of its ink is erased for
    # ``visible``).
    data = {
        kind: paper_dataset("boxes", kind, args, log)
        for kind in dict.fromkeys(RUNGS[r].boxes for r in args.rungs)
    }
    configs = {rung: rung_config(rung, data[RUNGS[rung].boxes], args) for rung in args.rungs}

    def job(run: Run) -> None:
        results.add(run_one(run, configs[run.rung], data[RUNGS[run.rung].boxes], args, log))

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(job, run) for run in todo]:
            future.result()
    results.add()
    log(f"wrote {results.path} and {results.path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    run_main(main)
