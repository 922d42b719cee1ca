"""``python -m coorddet.evaluate`` / ``coorddet-evaluate``: the evaluation command line.

    python -m coorddet.evaluate --data DIR --split test CKPT [CKPT ...] --out REPORT_DIR

Flags -> :func:`coorddet.evaluation.evaluate`'s keyword arguments, then the console summary.
Flag mistakes fail before anything heavy is imported; :func:`coorddet.cli.report_errors` turns
a :class:`UserError` into one line and exit code 2.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from coorddet.cli import (
    ArgumentParser,
    add_threads_option,
    add_trust_option,
    report_errors,
    threads_option,
)
from coorddet.config import EvalConfig
from coorddet.evaluation import PRECISIONS

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")  # run names become file names
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def parse_args(argv: Sequence[str] | None) -> Any:
    defaults = EvalConfig()
    parser = ArgumentParser(
        prog="python -m coorddet.evaluate",
        description="Evaluate coorddet checkpoints (and outside detections) on a COCO "
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
    add("--num-workers", type=int, metavar="N", help="DataLoader workers decoding images "
        "(default: 0 for a split decoded into memory, 4 for one decoded lazily)")  # fmt: skip
    add("--precision", default="32-true", choices=PRECISIONS,
        help="inference precision; bf16-mixed: bfloat16 autocast, as train.py's (default: "
        "%(default)s)")  # fmt: skip
    add("--device", default="auto", help="cpu, cuda, cuda:1, mps, or auto (default: %(default)s)")
    add("--compile", action="store_true", help="torch.compile each model's backbone (default: "
        "off; docs/speed.md has where it pays)")  # fmt: skip
    add("--score-thresh", type=float, default=defaults.score_thresh,
        help="detections counted by det_iou and gt_iou (default: %(default)s)")  # fmt: skip
    add("--rpn-top-k", type=int, default=defaults.rpn_top_k,
        help="RPN proposals per image for rpn_iou (default: %(default)s, the paper's)")  # fmt: skip
    add("--rpn-nms-iou", type=float, default=defaults.rpn_nms_iou,
        help="NMS IoU for those proposals (default: %(default)s, the paper's)")  # fmt: skip
    add_trust_option(parser)
    add("--overwrite", action="store_true", help="replace a non-empty REPORT_DIR")
    add_threads_option(parser)
    add("--quiet", action="store_true", help="no progress bar or timing lines")
    args = parser.parse_args(argv)
    threads_option(parser, args)
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
    if args.num_workers is not None and args.num_workers < 0:
        parser.error(f"--num-workers must be >= 0, got {args.num_workers}")
    if not 0.0 <= args.score_thresh <= 1.0:
        parser.error(f"--score-thresh must be in [0, 1], got {args.score_thresh}")
    if not 0.0 < args.rpn_nms_iou <= 1.0:
        parser.error(f"--rpn-nms-iou must be in (0, 1], got {args.rpn_nms_iou}")
    if not DEVICE_PATTERN.fullmatch(args.device):
        parser.error(f"--device {args.device!r}: expected cpu, cuda, cuda:N, mps or auto")
    return args


def evaluate_command(argv: Sequence[str] | None = None) -> int:
    """The command: evaluate, print the summary. Raises :class:`UserError` on a user mistake."""
    args = parse_args(argv)
    # Neither imports torch at the top: evaluate checks the arguments, data, checkpoints and
    # report folder first, so a mistake is one line in a fraction of a second.
    from coorddet.evaluation import evaluate

    result = evaluate(
        data=args.data,
        split=args.split,
        out=args.out,
        checkpoints=args.checkpoints,
        predictions=list(zip(args.name, args.predictions, strict=True)),
        group=args.group,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        precision=args.precision,
        score_thresh=args.score_thresh,
        rpn_top_k=args.rpn_top_k,
        rpn_nms_iou=args.rpn_nms_iou,
        trust_checkpoint=args.trust_checkpoint,
        compile_models=args.compile,
        overwrite=args.overwrite,
        quiet=args.quiet,
    )
    from coorddet.evaluation.reporting import PLOTS
    from coorddet.report import group_table, metrics_table

    lines = metrics_table(result.metrics, result.baseline, result.compared)
    if result.groups:
        lines += ["", "seeds aggregated: mean ± std [95% CI] (n)"]
        lines += group_table(result.groups, result.group_baseline)
    print("\n".join(lines))
    print(f"\nreport:  {result.out / 'report.md'}")
    print(f"plots:   {', '.join(str(result.out / plot) for plot in PLOTS)}")
    print(f"metrics: {result.out / 'metrics.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from coorddet.system import configure_process

    configure_process()  # memory and threads, before the command imports torch
    return report_errors(evaluate_command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
