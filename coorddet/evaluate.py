"""``python -m coorddet.evaluate`` / ``coorddet-evaluate``: score checkpoints, compare, report.

    python -m coorddet.evaluate --data DIR --split test CKPT [CKPT ...] --out REPORT_DIR

writes into ``REPORT_DIR`` (built in a hidden sibling folder and moved into place whole; one
process at a time, see :func:`coorddet.locking.hold_folder`):

- ``metrics.json``: ``{run_name: {metric: value}}`` (``null`` where undefined);
- ``predictions_<run_name>.json``: detections in the COCO results format;
- ``report.md``: metrics x runs, each run's relative change against the baseline;
- ``detections.png`` (the same canvases for every run) and ``iou_distribution.png``;
- with ``--group``: ``groups.json``, ``{name: {metric: {mean, std, ci95, n}}}`` over seeds.

Run names come from each checkpoint's config (``baseline``, ``coordconv``); clashing names get
the seed appended (``baseline-s1``), then a counter. The baseline is the first checkpoint
without CoordConv. ``--predictions FILE --name NAME`` adds detections from any other detector in
the COCO results format; images it has no detections for count as misses.

Cheap checks (flags, paths, JSON) run before torch is imported, so mistakes fail fast.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coorddet.cli import ArgumentParser, run
from coorddet.config import EvalConfig
from coorddet.errors import UserError
from coorddet.fileio import write_text_atomic
from coorddet.locking import hold_folder

PLOT_SAMPLES = 6  # canvases drawn in detections.png
PLOTS = ("detections.png", "iou_distribution.png")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")  # run names become file names
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


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
    add("--device", default="auto", help="cpu, cuda, cuda:1, mps, or auto (default: %(default)s)")
    add("--score-thresh", type=float, default=defaults.score_thresh,
        help="detections counted by det_iou and gt_iou (default: %(default)s)")  # fmt: skip
    add("--rpn-top-k", type=int, default=defaults.rpn_top_k,
        help="RPN proposals per image for rpn_iou (default: %(default)s, the paper's)")  # fmt: skip
    add("--rpn-nms-iou", type=float, default=defaults.rpn_nms_iou,
        help="NMS IoU for those proposals (default: %(default)s, the paper's)")  # fmt: skip
    add("--trust-checkpoint", action="store_true", help="allow checkpoints that hold Python "
        "objects (can run code when loaded); only for files you trust")  # fmt: skip
    add("--overwrite", action="store_true", help="replace a non-empty REPORT_DIR")
    add("--quiet", action="store_true", help="no progress bar or timing lines")
    args = parser.parse_args(argv)
    if not args.checkpoints and not args.predictions:
        parser.error("give at least one CKPT or --predictions FILE.json")
    if len(args.name) != len(args.predictions):
        parser.error("give one --name for each --predictions file")
    for name in args.name:
        if not NAME_PATTERN.fullmatch(name):
            parser.error(f"--name {name!r}: use letters, digits and . _ + - (it names a file)")
    for flag, value in (("--batch-size", args.batch_size), ("--rpn-top-k", args.rpn_top_k)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if not 0.0 <= args.score_thresh <= 1.0:
        parser.error(f"--score-thresh must be in [0, 1], got {args.score_thresh}")
    if not 0.0 < args.rpn_nms_iou <= 1.0:
        parser.error(f"--rpn-nms-iou must be in (0, 1], got {args.rpn_nms_iou}")
    if not DEVICE_PATTERN.fullmatch(args.device):
        parser.error(f"--device {args.device!r}: expected cpu, cuda, cuda:N, mps or auto")
    return args


def _check_out(args: Any) -> Path:
    """The report folder, if it may be written: never a file, never a folder holding inputs."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a report folder; choose another --out")
    here = Path.cwd().resolve()
    if out.is_dir() and out.resolve() in [here, *here.parents]:  # it is replaced, not filled
        raise UserError(f"--out {out} is or holds the current folder; name a new report folder")
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise UserError(
                f"report folder {out} exists and is not empty; pass --overwrite or --out"
            )
        resolved = out.resolve()
        for source in [args.data, *args.checkpoints, *args.predictions]:
            path = Path(source).resolve()
            if path == resolved or resolved in path.parents:
                raise UserError(
                    f"--out {out} holds the input {source}; --overwrite would delete it"
                )
    return out


def _read_predictions_json(path: str) -> Any:
    try:
        with open(path, "rb") as handle:
            return json.load(handle)
    except OSError as error:
        raise UserError(f"--predictions {path}: {error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"--predictions {path}: not valid JSON ({error})") from None


def _outside_records(results: Any, path: str, dataset: Any) -> list[Any]:
    """COCO results (parsed JSON) -> records; UserError naming the file for a malformed entry,
    or an image or category id that ``dataset`` does not have."""
    from coorddet.metrics import records_from_coco_results

    try:
        records = records_from_coco_results(results)
    except UserError as error:
        raise UserError(f"--predictions {path}: {error}") from None
    unknown = sorted({r.image_id for r in records} - set(dataset.image_ids))
    if unknown:
        where = f"{dataset.root} split {dataset.split}"
        raise UserError(f"--predictions {path}: image ids not in {where}: {_listing(unknown)}")
    categories = {int(c["id"]) for c in dataset.categories}
    labels = {int(label) for r in records for label in r.labels.tolist()}
    if labels - categories:
        raise UserError(
            f"--predictions {path}: category ids not in the dataset: "
            f"{_listing(sorted(labels - categories))} (it has {_listing(sorted(categories))})"
        )
    return records


def _listing(values: Sequence[Any], limit: int = 10) -> str:
    shown = ", ".join(map(str, values[:limit]))
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _open_dataset(data: str, split: str) -> Any:
    from coorddet.data import CocoDetection, annotation_file

    root = Path(data)
    if root.is_dir() and not annotation_file(root, split).is_file():
        found = sorted(p.stem.removeprefix("instances_") for p in root.glob("annotations/*.json"))
        if found:
            raise UserError(
                f"--split {split}: {root} has no annotations/instances_{split}.json "
                f"(splits there: {', '.join(found)})"
            )
    return CocoDetection(root, split)


def _device(text: str) -> Any:
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda" and (
        not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise UserError(f"--device {text}: no such CUDA device here; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {text}: MPS is not available here; use --device cpu")
    return device


def _predict(model: Any, dataset: Any, args: Any, device: Any, label: str) -> list[Any]:
    """Records (detections + paper proposals) for every image of ``dataset``."""
    import torch
    from rich.console import Console
    from rich.progress import Progress
    from torch.utils.data import DataLoader

    from coorddet.data import collate_detection
    from coorddet.metrics import predict_with_proposals

    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate_detection)
    model.to(device)
    records = []
    started = time.perf_counter()
    console = Console(stderr=True)  # stdout keeps only the results; no bar in CI logs
    bar = Progress(console=console, disable=args.quiet or not console.is_terminal, transient=True)
    with bar as progress, torch.inference_mode():
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
    seconds = time.perf_counter() - started
    if not args.quiet:
        print(f"{label}: {len(dataset)} images in {seconds:.1f} s "
              f"({len(dataset) / seconds:.1f} img/s, batch {args.batch_size}, {device})")  # fmt: skip
    return records


def _unique_name(name: str, seed: Any, taken: Sequence[str]) -> str:
    suffixes = ([f"-s{seed}"] if seed is not None else []) + [f"-{i}" for i in range(2, 10_000)]
    return next(c for c in [name, *(name + s for s in suffixes)] if c not in taken)


def _json_ready(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: None if v is None or math.isnan(v) else float(v) for k, v in metrics.items()}


def evaluate(args: Any) -> tuple[Path, dict[str, Any]]:
    """Score every checkpoint and predictions file, write the report.

    Returns the report folder and ``{"metrics", "baseline", "compared", "groups",
    "group_baseline"}`` for the console summary.
    """
    out = _check_out(args)
    outside = [_read_predictions_json(path) for path in args.predictions]
    for path in args.checkpoints:
        if not Path(path).is_file():
            raise UserError(f"checkpoint not found: {path}")
    if not Path(args.data).is_dir():
        raise UserError(
            f"--data {args.data}: dataset folder not found; create one with "
            f"`python -m data_gen --out {args.data}`"
        )

    from coorddet.checkpoint import load_checkpoint

    device = _device(args.device)
    loaded = [load_checkpoint(path, trust=args.trust_checkpoint) for path in args.checkpoints]

    from coorddet.metrics import evaluate_records, ground_truth, per_gt_ious, to_coco_results
    from coorddet.models import is_rpn_only
    from coorddet.plots import plot_detections, plot_iou_distribution
    from coorddet.report import aggregate_groups, render_report, staged_dir, write_json

    dataset = _open_dataset(args.data, args.split)
    for checkpoint in loaded:
        checkpoint.check_categories(dataset.categories, f"{dataset.root} split {dataset.split}")
    outside_records = [
        _outside_records(results, path, dataset)
        for results, path in zip(outside, args.predictions, strict=True)
    ]

    runs: dict[str, list[Any]] = {}
    sources: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    proposals_only: set[str] = set()  # RPN-only detectors: rpn_iou alone, detection metrics null
    baseline = None
    sizes = {(image["width"], image["height"]) for image in dataset.coco.imgs.values()}
    for checkpoint in loaded:
        group = re.sub(r"[^A-Za-z0-9._+-]+", "_", checkpoint.name).lstrip("._-") or "run"
        name = _unique_name(group, checkpoint.seed, list(runs))
        model = checkpoint.build_model()
        if is_rpn_only(model):
            proposals_only.add(name)
        runs[name] = _predict(model, dataset, args, device, name)
        sources[name] = f"`{checkpoint.path}` ({checkpoint.describe(sizes)})"
        groups.setdefault(group, []).append(name)
        if baseline is None and not checkpoint.coordconv:
            baseline = name
    for records, path, given in zip(outside_records, args.predictions, args.name, strict=True):
        name = _unique_name(given, None, list(runs))
        runs[name] = records
        sources[name] = f"`{path}` (outside predictions)"
        groups.setdefault(given, []).append(name)

    ids = dataset.image_ids
    gts = ground_truth(dataset.coco, ids)
    metrics = {
        name: _json_ready(
            evaluate_records(
                dataset.coco,
                records,
                image_ids=ids,
                score_thresh=args.score_thresh,
                detections=name not in proposals_only,
            )
        )
        for name, records in runs.items()
    }
    aggregated = aggregate_groups(metrics, groups) if args.group else None
    group_baseline = next((g for g, names in groups.items() if baseline in names), None)
    compared = [name for name in runs if name != baseline]

    with staged_dir(out) as tmp:
        write_json(tmp / "metrics.json", metrics)
        for name, records in runs.items():
            write_json(tmp / f"predictions_{name}.json", to_coco_results(records))
        if aggregated is not None:
            write_json(tmp / "groups.json", aggregated)
        sample = ids[:: max(len(ids) // PLOT_SAMPLES, 1)][:PLOT_SAMPLES]
        index = {image_id: i for i, image_id in enumerate(ids)}
        by_id = {name: {r.image_id: r for r in records} for name, records in runs.items()}
        plot_detections(
            [(dataset[index[i]][0][0] * 255).round().byte().numpy() for i in sample],
            [gts[i] for i in sample],
            {n: [by_id[n].get(i) or _no_detections(i) for i in sample] for n in runs},
            tmp / PLOTS[0],
            score_thresh=args.score_thresh,
            categories={int(c["id"]): str(c["name"]) for c in dataset.categories},
        )
        plot_iou_distribution(
            {
                name: per_gt_ious(records, gts, score_thresh=args.score_thresh).numpy()
                for name, records in runs.items()
            },
            tmp / PLOTS[1],
        )
        report = render_report(
            runs=metrics,
            baseline=baseline,
            compared=compared,
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
            plots=PLOTS,
        )
        write_text_atomic(tmp / "report.md", report)
    summary = {"metrics": metrics, "baseline": baseline, "compared": compared}
    return out, {**summary, "groups": aggregated, "group_baseline": group_baseline}


def _no_detections(image_id: int) -> Any:
    """An empty record, for an image an outside detector found nothing in."""
    import torch

    from coorddet.metrics import ImagePrediction

    return ImagePrediction(
        image_id, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    )


def main_unsafe(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with hold_folder(args.out):
        out, summary = evaluate(args)

    from coorddet.report import group_table, metrics_table

    lines = metrics_table(summary["metrics"], summary["baseline"], summary["compared"])
    if summary["groups"]:
        lines += ["", "seeds aggregated: mean ± std [95% CI] (n)"]
        lines += group_table(summary["groups"], summary["group_baseline"])
    print("\n".join(lines))
    print(f"\nreport:  {out / 'report.md'}")
    print(f"plots:   {', '.join(str(out / plot) for plot in PLOTS)}")
    print(f"metrics: {out / 'metrics.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(main_unsafe, argv)


if __name__ == "__main__":
    raise SystemExit(main())
