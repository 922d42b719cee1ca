"""What the study scripts of ``experiments/`` share: timestamped logs, child commands whose
output goes to a log file, one-thread job environments and the code version of a result.

Not part of the ``coorddet`` library (which never imports ``experiments/``).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
