"""What a training step measures without making the host wait for a GPU: the finite-loss check
(:class:`LossCheck`) and the step clock (:class:`StepClock`).

On a GPU the host queues work and runs ahead; reading a value back (``bool(tensor)``,
``.item()``) or timing with the host clock makes it wait until the GPU has caught up, and a
step that waits cannot queue the next one meanwhile. Both classes keep their values on the
device and read them back only when asked (on the CPU, where nothing waits, every step).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor


class LossCheck:
    """Each step's loss and its terms, kept on their device until :meth:`found` reads them."""

    def __init__(self) -> None:
        self._steps: list[tuple[int, int, list[str], Tensor]] = []  # (epoch, step, names, values)
        self._first_bad: tuple[int, int, list[str], list[float]] | None = None

    def record(self, loss: Tensor, losses: dict[str, Tensor], epoch: int, step: int) -> None:
        """Keep ``loss`` and its named terms (no host sync)."""
        values = torch.stack(
            [loss.detach().float(), *(v.detach().float() for v in losses.values())]
        )
        self._steps.append((epoch, step, list(losses), values))

    def found(self) -> bool:
        """Whether a loss recorded since the last call was NaN or infinite (one host sync)."""
        steps, self._steps = self._steps, []
        if not steps or self._first_bad is not None:
            return self._first_bad is not None
        values = torch.stack([values for *_, values in steps]).cpu()  # (steps, 1 + terms)
        bad = (~torch.isfinite(values[:, 0])).nonzero()
        if len(bad):
            epoch, step, names, _ = steps[int(bad[0])]
            self._first_bad = (epoch, step, names, values[int(bad[0]), 1:].tolist())
        return self._first_bad is not None

    def where(self) -> str:
        """``epoch E, step S (term=value, ...)`` of the first non-finite loss found."""
        if self._first_bad is None:
            return "an unknown step (another process's loss)"
        epoch, step, names, values = self._first_bad
        terms = ", ".join(f"{name}={value:.4g}" for name, value in zip(names, values, strict=True))
        return f"epoch {epoch}, step {step} ({terms})"


class StepClock:
    """Seconds of each training step: the host clock on the CPU, CUDA events on a GPU (device
    time from the step's first queued work to its last, read back only when asked)."""

    def __init__(self) -> None:
        self._host_seconds = 0.0
        self._last = 0.0
        self._started: float | torch.cuda.Event = 0.0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def start(self, device: torch.device) -> None:
        if device.type == "cuda":
            self._started = torch.cuda.Event(enable_timing=True)
            self._started.record()
        else:
            self._started = time.perf_counter()

    def stop(self, images: int) -> None:
        if isinstance(self._started, float):
            self._last = time.perf_counter() - self._started
            self._host_seconds += self._last
        else:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._started, end))

    def _resolve(self) -> None:
        if self._pending:
            self._pending[-1][1].synchronize()  # the last step done: every earlier one is too
            for start, end in self._pending:
                self._last = start.elapsed_time(end) / 1000.0
                self._host_seconds += self._last
            self._pending.clear()

    def last_seconds(self) -> float:
        """The last step's seconds (on a GPU: waits for it to finish)."""
        self._resolve()
        return self._last

    def total_seconds(self) -> float:
        """All steps' seconds so far (on a GPU: waits for the last to finish)."""
        self._resolve()
        return self._host_seconds
