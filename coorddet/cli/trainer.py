"""The ``lightning.Trainer`` that ``train.py`` builds (:func:`build_trainer`), and its parts
that write a run directory so that a killed run can always be resumed.

- :class:`AtomicCheckpointIO`: a checkpoint is written once, next to its target, and renamed
  over it, so ``last.ckpt`` / ``best.ckpt`` are always either the old or the new complete file,
  whatever moment a SIGKILL or a full disk strikes (no copy through the system temp folder).
- :class:`AppendingCSVLogger`: Lightning's ``CSVLogger`` deletes an existing ``metrics.csv``
  when it starts; on resume this one appends to it instead (``train.py`` first trims the rows
  of the epoch that was interrupted, see :func:`coorddet.cli.rundir.trim_csv_log`). A new
  column rewrites the file atomically, and a failed write names the file.
- :class:`RunCheckpoint`: ``ModelCheckpoint`` that still knows its best score after the run
  directory was moved or copied (Lightning would forget it and overwrite ``best.ckpt``).
- :class:`ProgressBar`: Rich progress bar without Lightning's ``v_num`` entry.
- :class:`coorddet.cli.workers.WorkerWatch`: one line when a DDP worker dies.
- :func:`build_trainer`: the ``Trainer`` with all of the above, checkpoints and loggers.

Imported only once ``lightning`` is needed: the command line's fast checks stay fast.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from coorddet.cli.workers import WorkerWatch
from coorddet.config import TrainConfig
from coorddet.datamodule import AugmentationEpochs
from coorddet.errors import UserError
from coorddet.fileio import named, write_atomic, write_csv_atomic
from coorddet.module import RandomStateCallback
from coorddet.system import ThreadGovernor


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``.NAME.tmp`` in the same folder, then ``os.replace`` onto ``NAME``.

    Lightning's own save writes into the system temp folder first and then copies: two places
    that each need room for the whole checkpoint. A failure removes the temp file and raises
    an ``OSError`` naming ``NAME`` (:func:`coorddet.fileio.write_atomic`).
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        try:
            path.parent.mkdir(exist_ok=True)  # not parents: a removed run directory stays gone
        except OSError as error:
            raise named(error, path) from None
        write_atomic(path, lambda file: torch.save(checkpoint, file))


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose saved state follows the run directory when it moves.

    Lightning drops the best score when the checkpoint folder's path differs from the one
    saved (a copied or renamed run), and the next validation would then replace ``best.ckpt``
    whatever its score. When the saved best file is present under the new folder, this
    callback takes the state over with its paths moved there.
    """

    @property
    def state_key(self) -> str:
        # Stored under ModelCheckpoint's own key: checkpoints stay interchangeable with it.
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old, new = state_dict.get("dirpath"), self.dirpath
        best = state_dict.get("best_model_path") or ""
        if old and new and old != new and best and os.path.isfile(_moved(best, new)):
            state_dict = {
                **state_dict,
                "dirpath": new,
                **{
                    key: _moved(state_dict.get(key) or "", new)
                    for key in ("best_model_path", "kth_best_model_path", "last_model_path")
                },
                "best_k_models": {
                    _moved(path, new): score
                    for path, score in (state_dict.get("best_k_models") or {}).items()
                },
            }
        super().load_state_dict(state_dict)


def _moved(path: str, folder: str) -> str:
    return os.path.join(folder, os.path.basename(path)) if path else path


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Called by __init__ in place of Lightning's "delete the old metrics.csv". Knowing the
        # existing columns lets save() append, or rewrite the header when new columns appear.
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        # Lightning truncates and rewrites in place: a full disk would lose the logged rows.
        with open(self.metrics_file_path, newline="") as file:
            rows = list(csv.DictReader(file))
        write_csv_atomic(Path(self.metrics_file_path), fieldnames, rows)

    def save(self) -> None:
        try:
            super().save()
        except OSError as error:
            raise named(error, error.filename or self.metrics_file_path) from None

    def log_hparams(self, params: dict[str, Any]) -> None:
        try:
            super().log_hparams(params)
        except OSError as error:
            raise named(
                error, error.filename or os.path.join(self.log_dir, "hparams.yaml")
            ) from None


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` that keeps the rows already in ``metrics.csv`` (from before a resume)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class ProgressBar(RichProgressBar):
    """Shows the loss, images/s and the headline validation metrics; no logger version."""

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class ThreadWatch(L.Callback):
    """Keeps torch's thread count to the cores other processes leave free during training and
    validation (:class:`coorddet.system.ThreadGovernor`). One process on CPU only: DDP
    processes share the threads chosen at start (:func:`coorddet.system.share_threads`), and a
    user's ``OMP_NUM_THREADS`` leaves it inactive."""

    def __init__(self) -> None:
        self.governor: ThreadGovernor | None = None
        self.threads: list[int] = []  # each process's torch threads when training started

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        on_cpu = pl_module.device.type == "cpu"
        self.governor = ThreadGovernor(active=None if on_cpu and trainer.world_size == 1 else False)
        threads = torch.get_num_threads()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, threads)
            self.threads = [int(n) for n in gathered]
        else:
            self.threads = [threads]

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if self.governor is not None:
            self.governor.step()

    on_validation_batch_end = on_train_batch_end


def build_trainer(config: TrainConfig, *, quiet: bool, resume_command: str) -> L.Trainer:
    """The ``lightning.Trainer`` of ``config.trainer`` writing into ``config.out_dir``;
    ``resume_command`` is shown when a DDP worker dies (:class:`WorkerWatch`)."""
    out = config.out_dir
    callbacks: list[Any] = [
        RunCheckpoint(
            dirpath=out / "checkpoints",
            filename="best",
            # RPN-only detectors have no map: the best checkpoint is the best rpn_iou.
            monitor="rpn_iou" if config.model.get("detector") == "rpn-only" else "map",
            mode="max",
            save_top_k=1,
            enable_version_counter=False,
            auto_insert_metric_name=False,
        ),
        # last.ckpt: every epoch, by a second, unmonitored callback. Since Lightning 2.6,
        # save_last=True writes last.ckpt only when a best checkpoint is written at the same
        # step, so it stayed a copy of best.ckpt whenever the metric did not improve.
        RunCheckpoint(
            dirpath=out / "checkpoints",
            filename="last",
            monitor=None,
            save_top_k=1,
            enable_version_counter=False,
        ),
        RandomStateCallback(),
        AugmentationEpochs(),
        WorkerWatch(resume_command),
        ThreadWatch(),
    ]
    if not quiet:
        callbacks.append(ProgressBar(leave=True))
    loggers: list[Any] = [AppendingCSVLogger(out, name="", version="logs")]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(out, name="", version="tensorboard"))
    except ModuleNotFoundError:  # tensorboard is optional
        pass
    trainer_args = dataclasses.asdict(config.trainer)
    trainer_args.pop("compile")  # the model's (train.py compiles it), not the Trainer's
    trainer_args["gradient_clip_val"] = trainer_args["gradient_clip_val"] or None
    try:
        return L.Trainer(
            **trainer_args,
            callbacks=callbacks,
            logger=loggers,
            plugins=[AtomicCheckpointIO()],
            enable_progress_bar=not quiet,
            enable_model_summary=not quiet,
            default_root_dir=out,
            num_sanity_val_steps=0,
        )
    except (MisconfigurationException, ValueError, TypeError) as error:
        # e.g. --accelerator gpu without a GPU, --devices 3 with a CPU list, --precision 7
        raise UserError(
            "trainer settings (--accelerator, --devices, --strategy, --num-nodes, --precision): "
            f"{error}"
        ) from None


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_lightning(quiet: bool) -> None:
    """Silence known-harmless warnings and Lightning's tips; ``quiet``: its INFO lines too."""
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:  # advertisements, not information
            handler.addFilter(_DropTips())
    if quiet:
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)
