"""``python -m coorddet.predict`` / ``coorddet-predict``: a checkpoint's detections on new images.

    python -m coorddet.predict CKPT INPUT [INPUT ...] --out DIR

Flags -> :func:`coorddet.evaluation.new_images.predict_images`'s keyword arguments, then a
summary. Flag mistakes fail before anything heavy is imported; a :class:`UserError` is one
line and exit code 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from coorddet.cli import (
    ArgumentParser,
    add_threads_option,
    add_trust_option,
    report_errors,
    threads_option,
)
from coorddet.cli.evaluate import DEVICE_PATTERN
from coorddet.evaluation import PRECISIONS


def parse_args(argv: Sequence[str] | None) -> Any:
    parser = ArgumentParser(
        prog="python -m coorddet.predict",
        description="Detect objects in image files with a train.py checkpoint: writes "
        "DIR/predictions.json (COCO results, the checkpoint's category ids) and "
        "DIR/images.json (the COCO images list), which score with pycocotools against your "
        "own ground truth.",
    )
    add = parser.add_argument
    add("checkpoint", metavar="CKPT", help="a checkpoint written by train.py")
    add("inputs", nargs="+", metavar="INPUT", help="image files, folders (searched "
        "recursively) or glob patterns (quoted)")  # fmt: skip
    add("--out", required=True, metavar="DIR", help="output folder")
    add("--coco", metavar="FILE.json", help="take image ids from this COCO file's images "
        "(matched by file_name, the path below the folder given) instead of 1, 2, ...")  # fmt: skip
    add("--batch-size", type=int, default=64, help="images per inference batch (default: 64)")
    add("--num-workers", type=int, metavar="N", help="DataLoader workers decoding images "
        "(default: 0 on a CPU, whose cores the inference uses; up to 4 with a GPU)")  # fmt: skip
    add("--device", default="auto", help="cpu, cuda, cuda:1, mps, or auto (default: %(default)s)")
    add("--precision", default="32-true", choices=PRECISIONS,
        help="inference precision; bf16-mixed: bfloat16 autocast (default: %(default)s)")  # fmt: skip
    add("--score-thresh", type=float, default=0.0, help="write detections scoring at least "
        "this (default: %(default)s, all the model returns, as COCO mAP needs)")  # fmt: skip
    add("--draw", action="store_true", help="also write DIR/drawn/<file_name>.png: each image "
        "with its boxes, category names and scores")  # fmt: skip
    add("--draw-thresh", type=float, default=0.5, help="detections drawn by --draw "
        "(default: score >= %(default)s)")  # fmt: skip
    add_trust_option(parser)
    add("--overwrite", action="store_true", help="replace a non-empty DIR")
    add_threads_option(parser)
    add("--quiet", action="store_true", help="no progress bar or timing line")
    args = parser.parse_args(argv)
    threads_option(parser, args)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_workers is not None and args.num_workers < 0:
        parser.error(f"--num-workers must be >= 0, got {args.num_workers}")
    for flag, value in (("--score-thresh", args.score_thresh), ("--draw-thresh", args.draw_thresh)):
        if not 0.0 <= value <= 1.0:
            parser.error(f"{flag} must be in [0, 1], got {value}")
    if not DEVICE_PATTERN.fullmatch(args.device):
        parser.error(f"--device {args.device!r}: expected cpu, cuda, cuda:N, mps or auto")
    return args


def predict_command(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from coorddet.evaluation.new_images import predict_images

    result = predict_images(
        checkpoint=args.checkpoint,
        inputs=args.inputs,
        out=args.out,
        coco=args.coco,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        precision=args.precision,
        score_thresh=args.score_thresh,
        draw=args.draw,
        draw_thresh=args.draw_thresh,
        trust_checkpoint=args.trust_checkpoint,
        overwrite=args.overwrite,
        quiet=args.quiet,
    )
    print(f"{result.images} images, {result.detections} detections: "
          f"{result.out / 'predictions.json'}, {result.out / 'images.json'}"
          + (f", {result.out / 'drawn'}/" if args.draw else ""))  # fmt: skip
    if result.skipped:
        print(f"{len(result.skipped)} file(s) skipped, not images this version can read (each "
              "named above); they are in neither file", flush=True)  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from coorddet.system import configure_process

    configure_process()  # memory and threads, before the command imports torch
    return report_errors(predict_command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
