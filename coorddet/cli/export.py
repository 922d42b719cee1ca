"""``python -m coorddet.export`` / ``coorddet-export``: a checkpoint as a deployable file.

    python -m coorddet.export CKPT --format onnx --out model.onnx
    python -m coorddet.export CKPT --format torch-export --out model.pt2

The file computes the checkpoint's detections for a batch of fixed size and image size
(``--batch-size``, ``--image-size``): :mod:`coorddet.exportable` says what goes in and out,
:mod:`coorddet.export_formats` writes it. Mistakes are one line and exit code 2.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coorddet.cli import (
    ArgumentParser,
    add_threads_option,
    add_trust_option,
    report_errors,
    threads_option,
)
from coorddet.errors import UserError
from coorddet.export_formats import FORMATS

SIZE_PATTERN = re.compile(r"(\d+)x(\d+)")


def parse_args(argv: Sequence[str] | None) -> Any:
    parser = ArgumentParser(
        prog="python -m coorddet.export",
        description="Export a train.py checkpoint's detector for serving: ONNX (onnxruntime) "
        "or torch.export's program (.pt2, torch.export.load). The file takes a float32 batch "
        "(N, C, H, W) in [0, 1] of the batch size and image size given here and returns "
        "boxes, scores, labels (category ids) and counts (docs/deploy.md).",
    )
    add = parser.add_argument
    add("checkpoint", metavar="CKPT", help="a checkpoint written by train.py")
    add("--format", required=True, choices=FORMATS, help="onnx or torch-export (.pt2)")
    add("--out", required=True, metavar="FILE", help="the file to write")
    add("--image-size", metavar="HxW", help="input height x width (default: the model's "
        "min_size, square: the training canvas for data_gen data)")  # fmt: skip
    add("--batch-size", type=int, default=1, help="images per call, fixed in the file "
        "(default: %(default)s)")  # fmt: skip
    add_trust_option(parser)
    add("--overwrite", action="store_true", help="replace an existing FILE")
    add_threads_option(parser)
    add("--quiet", action="store_true", help="no closing line")
    args = parser.parse_args(argv)
    threads_option(parser, args)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.image_size is not None:
        match = SIZE_PATTERN.fullmatch(args.image_size)
        if not match or min(int(match[1]), int(match[2])) < 1:
            parser.error(f"--image-size {args.image_size!r}: expected HxW, e.g. 64x64")
        args.image_size = (int(match[1]), int(match[2]))
    return args


def export_command(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name the file to write")
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    from coorddet.export_formats import check_format

    check_format(args.format)  # the missing packages, before the checkpoint loads
    from coorddet.checkpoint import load_checkpoint
    from coorddet.export_formats import describe, save
    from coorddet.exportable import ExportableDetector, check_exportable

    checkpoint = load_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
    model = checkpoint.build_model()
    check_exportable(model, str(checkpoint.path))
    config = checkpoint.config["model"]
    side = config.get("min_size") or config.get("canvas_size") or 64
    detector = ExportableDetector(
        model,
        image_size=args.image_size or (side, side),
        batch_size=args.batch_size,
        channels=int(config.get("image_channels") or 1),
        category_ids=checkpoint.category_ids,
    )
    started = time.perf_counter()
    save(detector, args.format, out, describe(detector, checkpoint.categories))
    if not args.quiet:
        shape = "x".join(map(str, describe(detector, None)["input"]["shape"]))
        print(f"{out}: {args.format}, input images {shape} float32 in [0, 1], outputs boxes, "
              f"scores, labels, counts ({time.perf_counter() - started:.1f} s)")  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from coorddet.system import configure_process

    configure_process()  # memory and threads, before the command imports torch
    return report_errors(export_command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
