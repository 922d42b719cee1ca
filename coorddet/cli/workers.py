"""The DDP worker processes that Lightning's launcher starts from process 0, and their deaths.

A killed worker reaches process 0 as gloo's (or NCCL's) error in the next collective, a long
traceback; and Lightning's own watcher SIGKILLs process 0 within 5 s of the death, so when no
collective comes first, process 0 dies without a word. :class:`WorkerWatch` therefore looks
every 0.2 s, and again first thing when Lightning handles an error, and prints one line,
``error: DDP worker rank N died (...); resume with: ...``, once. Checkpoints are written
atomically, so whichever way process 0 ends they stay whole.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from typing import Any

from lightning.pytorch.callbacks import Callback

WATCH_SECONDS = 0.2


def _workers(trainer: Any) -> list[subprocess.Popen]:
    """The processes the launcher started from this one (local ranks 1, 2, ...)."""
    return list(getattr(trainer.strategy.launcher, "procs", None) or [])


def dead_worker(trainer: Any, wait: float = 0.0) -> str | None:
    """``rank N died (pid P, killed by SIGKILL)`` for a worker that has died, else None;
    ``wait``: seconds to give each live worker (its death and our error come close together)."""
    for local_rank, proc in enumerate(_workers(trainer), start=1):
        try:
            code = proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if code != 0:
            how = f"exit code {code}"
            if -code in signal.valid_signals():
                how = f"killed by {signal.Signals(-code).name}"
            rank = trainer.node_rank * trainer.num_devices + local_rank
            return f"rank {rank} died (pid {proc.pid}, {how})"
    return None


def stop_workers(trainer: Any) -> None:
    """SIGKILL the workers still running (they write no files: process 0 writes them all)."""
    for proc in _workers(trainer):
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class WorkerWatch(Callback):
    """In process 0 of a DDP run: one line on stderr as soon as a worker has died.

    Workers that end because this process is stopping them (Ctrl-C, SIGTERM, an error here)
    are not reported: by then the trainer is interrupted, has received SIGTERM, or
    :meth:`finish` has been called.
    """

    def __init__(self, resume_command: str) -> None:
        self.resume_command = resume_command
        self._lock = threading.Lock()
        self._reported = False
        self._finished = threading.Event()

    def _print(self, dead: str) -> None:
        self._reported = True
        print(f"error: DDP worker {dead}; resume with: {self.resume_command}",
              file=sys.stderr, flush=True)  # fmt: skip

    def finish(self, trainer: Any, wait: float = 0.5) -> bool:
        """Stop watching; print the line unless printed. True if a worker has died."""
        with self._lock:
            if not self._finished.is_set():
                self._finished.set()
                dead = None if self._reported else dead_worker(trainer, wait)
                if dead is not None:
                    self._print(dead)
            return self._reported

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if trainer.is_global_zero and _workers(trainer):  # started before any hook runs
            threading.Thread(target=self._watch, args=(trainer,), daemon=True).start()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # Lightning's first step on an error, before its teardown: the line comes out early.
        if trainer.is_global_zero and not isinstance(exception, KeyboardInterrupt | SystemExit):
            self.finish(trainer)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._finished.set()

    def _watch(self, trainer: Any) -> None:
        while not self._finished.wait(WATCH_SECONDS):
            dead = dead_worker(trainer)
            if dead is None:
                continue
            with self._lock:
                if self._finished.is_set() or trainer.interrupted or trainer.received_sigterm:
                    return  # process 0 is stopping the workers itself
                self._print(dead)
            stop_workers(trainer)  # the others would print tracebacks of their own
            return


def report_dead_worker(trainer: Any) -> bool:
    """From process 0's error handler: True if a worker died (the error is its consequence);
    its line is printed by then."""
    watch = next((c for c in trainer.callbacks if isinstance(c, WorkerWatch)), None)
    return watch is not None and watch.finish(trainer)
