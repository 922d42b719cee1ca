"""What the study scripts of ``experiments/`` share: their common flags and ``main``, timestamped
logs, child commands whose output goes to a log file, one-thread job environments, datasets made
once, training runs that continue where they stopped, the code version of a result and its
formatting.

Not part of the ``coorddet`` library (which never imports ``experiments/``). The scripts import
it as ``study``: Python puts a script's own folder on ``sys.path``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def study_parser(script: str, doc: str) -> argparse.ArgumentParser:
    """The parser of ``experiments/SCRIPT``, described by the first paragraph of ``doc``."""
    return argparse.ArgumentParser(
        prog=f"python experiments/{script}",
        description=doc.split("\n\n")[0] + " Paths are relative to the repository root.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )


def add_study_flags(
    parser: argparse.ArgumentParser, name: str, *, data_root: tuple[str, str], runs: tuple[str, str]
) -> None:
    """The flags every study has: dataset sizes, ``--data-root`` and ``--runs`` (each a
    ``(default, help)``), ``--out`` (``OUT/NAME.json`` and ``.md``), ``--jobs``, ``--threads``,
    ``--quick`` and ``--render``."""
    add = parser.add_argument
    add("--train", type=int, default=9000, help="train canvases per dataset")
    add("--val", type=int, default=1000, help="val canvases per dataset")
    add("--test", type=int, default=1000, help="test canvases per dataset (held-out digits)")
    add("--data-root", default=data_root[0], help=data_root[1])
    add("--runs", default=runs[0], help=runs[1])
    add("--out", default="results", help=f"writes OUT/{name}.json and OUT/{name}.md")
    add("--jobs", type=int, default=2, help="training runs at a time")
    add("--threads", type=int, default=1, help="torch threads per training run")
    add("--quick", action="store_true", help="a pipeline check on tiny data (not a result)")
    add("--render", action="store_true", help=f"only rewrite OUT/{name}.md from its JSON")


def check_study_flags(
    parser: argparse.ArgumentParser, args: argparse.Namespace, name: str, counts: Sequence[str]
) -> None:
    """Usage errors (exit 2): a count of ``counts`` below 1, ``--render`` without its JSON."""
    for count in counts:
        if getattr(args, count) < 1:
            parser.error(f"--{count.replace('_', '-')} must be >= 1")
    if args.render and not (ROOT / args.out / f"{name}.json").is_file():
        parser.error(f"--render: no {args.out}/{name}.json to render")


def study_main(
    args: argparse.Namespace, name: str, render: Callable[[Any], str], run: Callable[[], int]
) -> int:
    """From the repository root: ``--render`` rewrites ``OUT/NAME.md`` from its JSON; otherwise
    ``run()`` while holding ``--runs`` (two studies never train the same run folders)."""
    from coorddet.fileio import write_text_atomic
    from coorddet.locking import hold_folder

    os.chdir(ROOT)
    if args.render:
        path = Path(args.out) / f"{name}.json"
        write_text_atomic(path.with_suffix(".md"), render(json.loads(path.read_text())))
        return 0
    with hold_folder(args.runs, flag="--runs"):
        return run()


def study_command(script: str, argv: Sequence[str] | None) -> str:
    """The command line that ran the study, for its report."""
    args = argv if argv is not None else sys.argv[1:]
    return shlex.join(["python", f"experiments/{script}", *args])


class Log:
    """Timestamped lines on stdout, flushed (the scripts usually run in the background)."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.lock = threading.Lock()

    def __call__(self, message: str) -> None:
        with self.lock:
            print(f"[{duration(time.monotonic() - self.start)}] {message}", flush=True)


def duration(seconds: float) -> str:
    """``H:MM:SS``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def python_env(threads: int) -> dict[str, str]:
    """This process's environment with ``threads`` OpenMP/MKL threads for a child job."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return env


def check_call(cmd: list[str], log_file: Path, env: dict[str, str]) -> None:
    """Run ``cmd`` with its output in ``log_file``; raise with the log's tail if it fails."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("a") as out:
        out.write(f"$ {shlex.join(cmd)}\n")
        out.flush()
        code = subprocess.call(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        tail = log_file.read_text().strip().splitlines()[-1:]
        raise RuntimeError(f"{shlex.join(cmd)} failed (exit {code}): {' '.join(tail)} [{log_file}]")


def git_commit() -> str | None:
    """The checked-out commit (``-dirty`` with uncommitted changes), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=ROOT, capture_output=True, text=True, check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if status.strip() else "")


def ensure_dataset(out: Path, flags: list[str], wanted: dict, log_file: Path, log: Log) -> Path:
    """``out``: the ``data_gen`` dataset with the ``wanted`` parameters, generated with
    ``python -m data_gen --out OUT *flags`` unless it is there already; another dataset in
    its place is an error."""
    info = out / "dataset.json"
    if info.is_file():
        params = json.loads(info.read_text()).get("parameters", {})
        found = {key: params.get(key) for key in wanted}
        if found != wanted:
            raise RuntimeError(
                f"{out} holds another dataset ({found}); move it or change --data-root"
            )
        log(f"dataset {out}: reusing")
        return out
    started = time.monotonic()
    check_call([sys.executable, "-m", "data_gen", "--out", str(out), *flags, "--quiet"], log_file,
               python_env(2))  # fmt: skip
    log(f"dataset {out}: generated in {time.monotonic() - started:.1f} s")
    return out


def paper_dataset(setting: str, value: str, args: argparse.Namespace, log: Log) -> Path:
    """``DATA_ROOT/VALUE``: the paper's canvases (seed 0, ``--train/--val/--test`` of them) with
    the ``data_gen`` setting ``setting`` (``split_mode``, ``boxes``) at ``value``, made once."""
    wanted = {setting: value, "train": args.train, "val": args.val, "test": args.test}
    flags = [f"--{setting.replace('_', '-')}", value, "--train", str(args.train),
             "--val", str(args.val), "--test", str(args.test), "--seed", "0"]  # fmt: skip
    return ensure_dataset(Path(args.data_root) / value, flags, wanted,
                          Path(args.runs) / f"data_{value}.log", log)  # fmt: skip


def train_command(out: Path, flags: list[str]) -> list[str]:
    """``python train.py --out OUT *flags --quiet``, continuing ``out`` if it was interrupted:
    ``--resume last`` after its first checkpoint, ``--overwrite`` before it."""
    cmd = [sys.executable, "train.py", "--out", str(out), *flags, "--quiet"]
    if (out / "checkpoints" / "last.ckpt").is_file():
        return cmd + ["--resume", "last"]
    return cmd + ["--overwrite"] if out.exists() else cmd


def mean_ci(stats: dict, digits: int) -> str:
    """An ``aggregate``'s mean and 95% CI: ``0.123 [0.120, 0.126]``, or ``-``."""
    from coorddet.report import format_stats

    return format_stats(stats, digits, spread=False)


def run_main(main: Callable[[], int]) -> None:
    """Exit with ``main()``'s code. One line for what stops a study: a usage error (the run
    folder in use by another study) exit 2; a failed step or write exit 1; Ctrl-C exit 130."""
    from coorddet.cli import describe_os_error
    from coorddet.errors import UserError

    try:
        sys.exit(main())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        print(f"error: {describe_os_error(err)}", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue", file=sys.stderr)
        sys.exit(130)
