"""``python -m coorddet.evaluate`` / ``coorddet-evaluate``: score checkpoints, compare, report.

    python -m coorddet.evaluate --data DIR --split test CKPT [CKPT ...] --out REPORT_DIR

writes into ``REPORT_DIR`` (built in a temporary folder and moved into place whole):

- ``metrics.json``: ``{run_name: {metric: value}}`` (``null`` where undefined);
- ``predictions_<run_name>.json``: detections in the COCO results format;
- ``report.md``: metrics x runs, each run's relative change against the baseline;
- ``detections.png`` (the same canvases for every run) and ``iou_distribution.png``;
- with ``--group``: ``groups.json``, ``{name: {metric: {mean, std, ci95, n}}}`` over seeds.

Run names come from each checkpoint's config (``baseline``, ``coordconv``); clashing names get
the seed appended (``baseline-s1``). ``--predictions FILE --name NAME`` adds detections from any
other detector in the COCO results format.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coorddet.cli import ArgumentParser, run
from coorddet.config import EvalConfig
from coorddet.errors import UserError

PLOT_SAMPLES = 6  # canvases drawn in detections.png


def parse_args(argv: Sequence[str] | None) -> Any:
    defaults = EvalConfig()
    parser = ArgumentParser(
        prog="python -m coorddet.evaluate",
        description="Evaluate coorddet checkpoints (and outside detections) on a data_gen "
        "dataset: IOU metrics and COCO mAP, a report comparing CoordConv with the baseline, "
        "and plots.",
    )
    add = parser.add_argument
    add("checkpoints", nargs="*", metavar="CKPT", help="checkpoints written by train.py")
    add("--data", default="data/mnist-det", metavar="DIR", help="dataset (default: %(default)s)")
    add("--split", default="test", help="split to score (default: %(default)s)")
    add("--out", default="reports/latest", metavar="REPORT_DIR", help="report folder "
        "(default: %(default)s)")  # fmt: skip
    add("--predictions", action="append", default=[], metavar="FILE.json",
        help="detections of another detector, COCO results format (repeatable)")  # fmt: skip
    add("--name", action="append", default=[], help="run name for each --predictions file")
    add("--group", action="store_true", help="aggregate runs with the same name (seeds) into "
        "mean, std and a 95%% confidence interval")  # fmt: skip
    add("--batch-size", type=int, default=64, help="images per inference batch (default: 64)")
    add("--device", default="auto", help="cpu, cuda, cuda:1, or auto (default: %(default)s)")
    add("--score-thresh", type=float, default=defaults.score_thresh,
        help="detections counted by det_iou and gt_iou (default: %(default)s)")  # fmt: skip
    add("--rpn-top-k", type=int, default=defaults.rpn_top_k,
        help="RPN proposals per image for rpn_iou (default: %(default)s, the paper's)")  # fmt: skip
    add("--rpn-nms-iou", type=float, default=defaults.rpn_nms_iou,
        help="NMS IoU for those proposals (default: %(default)s, the paper's)")  # fmt: skip
    add("--trust-checkpoint", action="store_true", help="allow checkpoints that hold Python "
        "objects (can run code when loaded); only for files you trust")  # fmt: skip
    add("--overwrite", action="store_true", help="replace a non-empty REPORT_DIR")
    add("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not args.checkpoints and not args.predictions:
        parser.error("give at least one CKPT or --predictions FILE.json")
    if len(args.name) != len(args.predictions):
        parser.error("give one --name for each --predictions file")
    if args.batch_size < 1 or args.rpn_top_k < 1:
        parser.error("--batch-size and --rpn-top-k must be >= 1")
    for flag, value in (("--score-thresh", args.score_thresh), ("--rpn-nms-iou", args.rpn_nms_iou)):
        if not 0.0 <= value <= 1.0:
            parser.error(f"{flag} must be in [0, 1], got {value}")
    return args


def _check_categories(loaded: Any, dataset: Any) -> None:
    data_cats = {int(c["id"]): str(c["name"]) for c in dataset.categories}
    if loaded.categories is not None:
        trained = {int(c["id"]): str(c["name"]) for c in loaded.categories}
        if trained != data_cats:
            raise UserError(
                f"{loaded.path}: trained on categories {sorted(trained.items())[:10]} but "
                f"{dataset.root} has {sorted(data_cats.items())[:10]}"
            )
    num_classes = int(loaded.config["model"].get("num_classes", 0))
    if max(data_cats) >= num_classes:
        raise UserError(
            f"{loaded.path}: model has {num_classes - 1} classes but the dataset uses category id "
            f"{max(data_cats)}"
        )


def _predict(model: Any, dataset: Any, args: Any, device: Any, label: str) -> list[Any]:
    import torch
    from rich.progress import Progress
    from torch.utils.data import DataLoader

    from coorddet.data import collate_detection
    from coorddet.metrics import predict_with_proposals

    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate_detection)
    model.to(device)
    records = []
    with Progress(disable=args.quiet, transient=True) as progress, torch.inference_mode():
        task = progress.add_task(f"{label}: inference", total=len(dataset))
        for images, targets in loader:
            records += predict_with_proposals(
                model,
                [image.to(device) for image in images],
                image_ids=[int(t["image_id"]) for t in targets],
                top_k=args.rpn_top_k,
                nms_iou=args.rpn_nms_iou,
            )
            progress.advance(task, len(images))
    return records


def _read_predictions(path: str) -> list[dict[str, Any]]:
    try:
        with open(path) as handle:
            results = json.load(handle)
    except OSError as error:
        raise UserError(f"--predictions {path}: {error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"--predictions {path}: not valid JSON ({error})") from None
    if not isinstance(results, list):
        raise UserError(f"--predictions {path}: expected a JSON list of detections")
    return results


def _unique_name(name: str, seed: Any, taken: set[str]) -> str:
    candidates = [name, f"{name}-s{seed}"] + [f"{name}-{i}" for i in range(2, 10_000)]
    return next(c for c in candidates if c not in taken)


def _json_ready(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: None if v is None or math.isnan(v) else float(v) for k, v in metrics.items()}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def evaluate(args: Any) -> Path:
    """Score every checkpoint and predictions file, write the report; return its folder."""
    import torch

    from coorddet.checkpoint import load_checkpoint
    from coorddet.data import CocoDetection
    from coorddet.metrics import (
        evaluate_records,
        ground_truth,
        per_gt_ious,
        records_from_coco_results,
        to_coco_results,
    )
    from coorddet.plots import plot_detections, plot_iou_distribution
    from coorddet.report import aggregate_groups, render_report

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise UserError(f"report folder {out} exists and is not empty; pass --overwrite or --out")
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    loaded = [load_checkpoint(path, trust=args.trust_checkpoint) for path in args.checkpoints]
    outside = [_read_predictions(path) for path in args.predictions]
    dataset = CocoDetection(args.data, args.split)
    for checkpoint in loaded:
        _check_categories(checkpoint, dataset)

    runs: dict[str, list[Any]] = {}
    sources: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    baseline = None
    for checkpoint in loaded:
        name = _unique_name(checkpoint.name, checkpoint.config.get("seed"), set(runs))
        runs[name] = _predict(checkpoint.build_model(), dataset, args, device, name)
        sources[name] = str(checkpoint.path)
        groups.setdefault(checkpoint.name, []).append(name)
        if baseline is None and not checkpoint.coordconv:
            baseline = name
    for results, path, given in zip(outside, args.predictions, args.name, strict=True):
        name = _unique_name(given, "x", set(runs))
        runs[name] = records_from_coco_results(results)
        sources[name] = f"{path} (outside predictions)"
        groups.setdefault(given, []).append(name)

    ids = dataset.image_ids
    gts = ground_truth(dataset.coco, ids)
    metrics = {
        name: _json_ready(
            evaluate_records(dataset.coco, records, image_ids=ids, score_thresh=args.score_thresh)
        )
        for name, records in runs.items()
    }

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_json(tmp / "metrics.json", metrics)
        for name, records in runs.items():
            _write_json(tmp / f"predictions_{name}.json", to_coco_results(records))
        sample = ids[:: max(len(ids) // PLOT_SAMPLES, 1)][:PLOT_SAMPLES]
        index = {image_id: i for i, image_id in enumerate(ids)}
        by_id = {name: {r.image_id: r for r in records} for name, records in runs.items()}
        plot_detections(
            [(dataset[index[i]][0][0] * 255).round().byte().numpy() for i in sample],
            [gts[i] for i in sample],
            {n: [by_id[n].get(i) or _no_detections(i) for i in sample] for n in runs},
            tmp / "detections.png",
            score_thresh=args.score_thresh,
            categories={int(c["id"]): str(c["name"]) for c in dataset.categories},
        )
        plot_iou_distribution(
            {
                name: per_gt_ious(records, gts, score_thresh=args.score_thresh).numpy()
                for name, records in runs.items()
            },
            tmp / "iou_distribution.png",
        )
        aggregated = None
        if args.group:
            aggregated = aggregate_groups(metrics, groups)
            _write_json(tmp / "groups.json", aggregated)
        group_baseline = next((g for g, names in groups.items() if baseline in names), None)
        report = render_report(
            runs=metrics,
            baseline=baseline,
            coordconv_runs=[n for n in runs if n != baseline],
            sources=sources,
            data=str(args.data),
            split=args.split,
            settings={
                "score_thresh": args.score_thresh,
                "rpn_top_k": args.rpn_top_k,
                "rpn_nms_iou": args.rpn_nms_iou,
            },
            groups=aggregated,
            group_baseline=group_baseline,
            plots=["detections.png", "iou_distribution.png"],
        )
        (tmp / "report.md").write_text(report)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _no_detections(image_id: int) -> Any:
    """An empty record, for an image an outside detector found nothing in."""
    import torch

    from coorddet.metrics import ImagePrediction

    return ImagePrediction(
        image_id, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    )


def main_unsafe(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = evaluate(args)
    report = (out / "report.md").read_text()
    table = report.split("## Runs", 1)[1] if "## Runs" in report else report
    if args.group and "## Seeds aggregated" in report:
        table = report.split("## Seeds aggregated", 1)[1].split("## Plots", 1)[0]
    print(table.split("## Plots", 1)[0].strip())
    print(f"\nreport: {out / 'report.md'}")
    print(f"plots:  {out / 'detections.png'}, {out / 'iou_distribution.png'}")
    print(f"metrics: {out / 'metrics.json'}", file=sys.stdout)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(main_unsafe, argv)


if __name__ == "__main__":
    raise SystemExit(main())
