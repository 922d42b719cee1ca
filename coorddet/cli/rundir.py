"""The run directory of ``train.py``: never clobber it, resume it, keep its logs whole.

    OUT/checkpoints/last.ckpt   every epoch          OUT/config.yaml    the resolved config
    OUT/checkpoints/best.ckpt   best validation map  OUT/metrics.json   final validation metrics
    OUT/logs/metrics.csv        per-step and per-epoch logs

Checks here run before ``lightning`` is imported, so mistakes are reported in a moment.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coorddet.errors import UserError
from coorddet.fileio import write_csv_atomic

if TYPE_CHECKING:
    from coorddet.checkpoint import LoadedCheckpoint


def is_rank_zero() -> bool:
    """False in the extra processes of a DDP run (Lightning's launcher, torchrun, SLURM).

    Those re-run the command line: they must neither refuse the run directory that process 0
    has just created nor write into it.
    """
    return all(os.environ.get(var, "0") == "0" for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def check_out_dir(out: Path, *, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite`` (the caller deletes it later)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"run directory {out} exists and is not a directory; pick another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"run directory {out} exists and is not empty; pass --resume last to continue "
            "it, --overwrite to replace it, or --out for a new one"
        )


def resume_path(flag: str, out: Path) -> Path:
    """``--resume last`` -> ``OUT/checkpoints/last.ckpt``; ``--resume PATH`` -> PATH. Must exist."""
    path = out / "checkpoints" / "last.ckpt" if flag == "last" else Path(flag)
    if not path.is_file():
        hint = " (nothing to resume: start the run without --resume)" if flag == "last" else ""
        raise UserError(f"--resume {flag}: no checkpoint at {path}{hint}")
    return path


# What makes a run folder's files "this run's" for --resume auto: the same name and seed, the
# same data and splits, the same detector, backbone and arm. Other settings may change on a
# resume as with --resume last (a larger max_epochs, other devices).
RUN_IDENTITY = (("name",), ("seed",), ("data", "data_dir"), ("data", "train_split"),
                ("data", "val_split"), ("model", "detector"), ("model", "backbone"),
                ("model", "coordconv"))  # fmt: skip


def run_identity(config: dict[str, Any]) -> dict[str, Any]:
    """The :data:`RUN_IDENTITY` values of a resolved config (``TrainConfig.to_dict()``, a run
    folder's ``config.yaml``, a checkpoint's config); the data folder as an absolute path."""
    identity = {}
    for path in RUN_IDENTITY:
        value: Any = config
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if path == ("data", "data_dir") and value is not None:
            value = os.path.abspath(value)
        identity[".".join(path)] = value
    return identity


def auto_resume(out: Path, identity: dict[str, Any]) -> tuple[Path | None, bool]:
    """``--resume auto``: ``(checkpoint, replace)``. ``(OUT/checkpoints/last.ckpt, False)``
    when ``out`` holds this run (its ``config.yaml`` has ``identity``) and that checkpoint;
    ``(None, replace)`` to start fresh: ``out`` is missing or empty (``replace`` False), or
    holds only this run's files from before its first checkpoint (``replace`` True: they
    go). Any other folder is refused: it holds another run's files."""
    if out.exists() and not out.is_dir():
        raise UserError(f"run directory {out} exists and is not a directory; pick another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return None, False
    written = out / "config.yaml"
    theirs = None
    if written.is_file():
        from coorddet.config import load_yaml

        try:
            theirs = run_identity(load_yaml(written))
        except UserError:
            theirs = None
    if theirs != identity:
        differ = ("no config.yaml" if theirs is None else "; ".join(
            f"{key} {theirs[key]!r} (now {value!r})" for key, value in identity.items()
            if theirs[key] != value))  # fmt: skip
        raise UserError(
            f"--resume auto: run directory {out} holds another run's files ({differ}); "
            "pass --overwrite to replace them or choose another --out"
        )
    last = out / "checkpoints" / "last.ckpt"
    return (last, False) if last.is_file() else (None, True)


@dataclass
class ResumePoint:
    """What a resumed run needs to know about its checkpoint before Lightning loads it."""

    path: Path
    completed_epochs: int
    checkpoint: LoadedCheckpoint  # its run config and weights

    @property
    def model_config(self) -> dict[str, Any]:
        """The ``build_model`` arguments the checkpoint was trained with."""
        return self.checkpoint.config["model"]


def read_resume_point(path: Path) -> ResumePoint:
    """Open ``path`` safely (``weights_only``); one-line errors for foreign or broken files."""
    import torch

    from coorddet.checkpoint import load_checkpoint

    try:
        loaded = load_checkpoint(path)  # UserError for missing, truncated or foreign files
    except UserError as error:
        if "--trust-checkpoint" not in str(error):
            raise
        # That flag is coorddet.evaluate's; train.py resumes only plain-data checkpoints.
        raise UserError(
            f"--resume {path}: refused, it holds Python objects that could run code when "
            "loaded; train.py resumes only checkpoints it wrote"
        ) from None
    # Only the counters: mmap keeps this second read cheap for large checkpoints.
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    completed = _completed_epochs(state)
    if not isinstance(loaded.config.get("model"), dict):
        raise UserError(f"{path}: its run config has no model section")
    return ResumePoint(path, completed, loaded)


def _completed_epochs(state: dict[str, Any]) -> int:
    """Epochs whose training and validation are in the checkpoint.

    Lightning's own count (``max_epochs`` is checked against it); ``epoch`` is not: it is the
    epoch index when saved at an epoch's end, but one more when saved at the end of ``fit``.
    """
    try:
        return int(state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError, ValueError):
        return int(state.get("epoch", -1)) + 1  # train.py saves only at an epoch's end


def trim_csv_log(path: Path, completed_epochs: int) -> None:
    """Keep the rows of the first ``completed_epochs`` epochs (drop an interrupted epoch's rows).

    A run killed mid-epoch has logged some steps of an epoch that the resumed run will
    train again; without this they would appear twice.
    """
    if not path.is_file():
        return
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        fields = list(reader.fieldnames or [])
        rows = [row for row in reader if _epoch(row) < completed_epochs]
    write_csv_atomic(path, fields, rows)


def _epoch(row: dict[str, str]) -> float:
    try:
        return float(row.get("epoch") or "inf")
    except ValueError:
        return float("inf")
