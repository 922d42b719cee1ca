"""The ``LightningModule`` for a torchvision detector (baseline or CoordConv).

Lightning owns the loops, devices, DDP, precision, checkpoints and logs; this module only says
what one training step is, how validation is scored (:mod:`coorddet.metrics`, the same code as
``coorddet.evaluate``) and which optimizer and schedule to use.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from coorddet.checkpoint import CHECKPOINT_KEY
from coorddet.evaluation.prediction import predict_batch
from coorddet.evaluation.scoring import score
from coorddet.metrics import METRIC_KEYS, SEGM_KEYS, finite_or_none
from coorddet.models import is_rpn_only
from coorddet.optim import build_optimizer, lr_factor
from coorddet.predictions import ImagePrediction, has_segmentations, with_category_ids
from coorddet.steps import LossCheck, StepClock

CHECKPOINT_FORMAT = 1
CHECK_EVERY = 50  # steps between finite-loss checks on a GPU (each is a host sync)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the run stops and keeps its best checkpoint."""


class DetectionModule(L.LightningModule):
    """Trains ``model`` (a torchvision detector: Faster R-CNN, Mask R-CNN, RetinaNet, ...) and
    scores it on the validation split.

    Args:
        model: the detector; images are float ``(C, H, W)`` tensors in [0, 1], targets dicts of
            ``boxes`` float ``(K, 4)`` xyxy pixels and ``labels`` int64 ``(K,)`` category ids.
        optimizer, lr, momentum, weight_decay: ``sgd`` (with momentum), ``adam`` or ``adamw``.
        scheduler: ``cosine`` (per step, to 0), ``step`` (``gamma`` at ``milestones`` epochs)
            or ``none``; ``warmup_steps`` of linear warm-up precede it.
        score_thresh, rpn_top_k, rpn_nms_iou: metric settings (see :mod:`coorddet.metrics`).
        run_config: the resolved run configuration, stored in every checkpoint so that
            ``coorddet.evaluate`` can rebuild the model from the checkpoint alone.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: str = "sgd",
        lr: float = 0.02,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        scheduler: str = "cosine",
        warmup_steps: int = 100,
        milestones: list[int] | None = None,
        gamma: float = 0.1,
        score_thresh: float = 0.5,
        rpn_top_k: int = 10,
        rpn_nms_iou: float = 0.8,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self._val_records: list[ImagePrediction] = []
        self._clock = StepClock()
        self._log_step = True
        self._loss_check = LossCheck()
        self.train_images = 0
        self.last_metrics: dict[str, float | None] = {}
        self._epoch_loss = torch.zeros(())  # this epoch's summed training loss, and steps
        self._epoch_steps = 0

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Inference only: per image ``boxes`` (D, 4) xyxy, ``scores`` (D,), ``labels`` (D,)."""
        return self.model(images)

    # -- training ---------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._clock.start(self.device)
        # Step values are logged only where they are used: every step for a live progress bar
        # on the CPU, else on the steps the loggers write (every log_every_n_steps, as
        # Lightning decides): each self.log call is a measurable part of a mnist-small step on
        # CPU, and on a GPU each value shown is a host sync.
        trainer = self.trainer
        every = trainer.log_every_n_steps
        live_bar = trainer.progress_bar_callback is not None and self.device.type == "cpu"
        self._log_step = live_bar or (every > 0 and (self.global_step + 1) % every == 0)

    def training_step(self, batch: tuple[list[Tensor], list[dict]], batch_idx: int) -> Tensor:
        images, targets = batch
        losses = self.model(list(images), list(targets))
        loss = sum(losses.values())
        self._loss_check.record(loss, losses, self.current_epoch, self.global_step)
        # Every step on the CPU (a check costs nothing there); on a GPU every CHECK_EVERY steps
        # and before anything is saved or validated (on_validation_start, on_train_epoch_end):
        # reading the flag is a host sync.
        if self.device.type == "cpu" or (self.global_step + 1) % CHECK_EVERY == 0:
            self._check_loss()
        self._epoch_loss = self._epoch_loss.to(loss.device) + loss.detach()
        self._epoch_steps += 1
        if self._log_step:
            batch_size = len(images)
            self.log_dict(
                {name: value.detach() for name, value in losses.items()}, batch_size=batch_size
            )
            self.log("loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        return loss

    def _check_loss(self) -> None:
        """Raise :class:`NonFiniteLossError` on every rank at once if any rank's loss was not
        finite since the last check (a rank that raised alone would leave the others waiting
        in the gradient all-reduce)."""
        bad = self._loss_check.found()
        if self.trainer.world_size > 1:
            bad = not self.trainer.strategy.reduce_boolean_decision(not bad, all=True)
        if bad:
            raise NonFiniteLossError(
                f"training loss is not finite at {self._loss_check.where()}; lower --lr or "
                "check the data"
            )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        images = len(batch[0])
        self._clock.stop(images)
        self.train_images += images
        if self._log_step:
            seconds = self._clock.last_seconds()  # a host sync on a GPU: on logged steps only
            self.log("img_s", images / max(seconds, 1e-9), prog_bar=True, batch_size=images)

    @property
    def train_seconds(self) -> float:
        """Seconds spent in training steps so far (device time on a GPU)."""
        return self._clock.total_seconds()

    def on_validation_start(self) -> None:
        self._check_loss()  # before validation and the checkpoints that follow it

    def on_train_epoch_end(self) -> None:
        self._check_loss()  # before ModelCheckpoint's save at the epoch's end
        # The epoch's mean loss (this rank's steps) in one log call: a per-step on_epoch log
        # would cost a log call every step.
        if self._epoch_steps:
            mean = self._epoch_loss / self._epoch_steps
            self.log("train_loss_epoch", mean, on_step=False, on_epoch=True, sync_dist=True)
        self._epoch_loss, self._epoch_steps = torch.zeros(()), 0

    # -- validation -------------------------------------------------------------------------
    def validation_step(self, batch: tuple[list[Tensor], list[dict]], batch_idx: int) -> None:
        images, targets = batch
        image_ids = [int(t["image_id"]) for t in targets]
        records = predict_batch(
            self.model,
            list(images),
            image_ids=image_ids,
            rpn_top_k=self.hparams.rpn_top_k,
            rpn_nms_iou=self.hparams.rpn_nms_iou,
        )
        category_ids = self.trainer.datamodule.val_dataset.category_ids
        self._val_records += with_category_ids(records, category_ids)

    def on_validation_epoch_end(self) -> None:
        records, self._val_records = self._val_records, []
        if self.trainer.sanity_checking:
            return
        world_size = self.trainer.world_size
        if world_size > 1:
            # Scored once: every rank's predictions go to rank 0 (each image once there,
            # DistributedSampler's padded duplicates dropped by evaluate_records), which scores
            # them and hands the metrics to every rank.
            gathered = [[] for _ in range(world_size)] if self.trainer.is_global_zero else None
            torch.distributed.gather_object(records, gathered, dst=0)
            records = [record for part in gathered or [] for record in part]
        metrics = self._score(records) if records else None
        if world_size > 1:
            shared = [metrics]
            torch.distributed.broadcast_object_list(shared, src=0)
            metrics = shared[0]
        if metrics is None:
            return
        self.last_metrics = metrics
        # None (NaN: e.g. no large digits -> map_large undefined) would poison checkpoint
        # monitoring, so it is not logged.
        for key, value in metrics.items():
            if value is not None:
                # The same value on every rank: nothing to reduce.
                self.log(key, value, prog_bar=key in ("map_50", "rpn_iou"), sync_dist=False)

    def _score(self, records: list[ImagePrediction]) -> dict[str, float | None]:
        return score(
            self.trainer.datamodule.val_dataset.coco,
            records,
            score_thresh=self.hparams.score_thresh,
            detections=not is_rpn_only(self.model),
            masks=has_segmentations(records),  # a mask head: segm_* (mask AP) logged too
        )

    # -- optimizer --------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        settings = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = build_optimizer(
            settings.optimizer,
            params,
            lr=settings.lr,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
        )
        total_steps = max(int(self.trainer.estimated_stepping_batches), 1)
        steps_per_epoch = max(total_steps // max(self.trainer.max_epochs or 1, 1), 1)
        factor = lr_factor(
            settings.scheduler,
            total_steps=total_steps,
            warmup=min(settings.warmup_steps, total_steps - 1) if total_steps > 1 else 0,
            milestones=[m * steps_per_epoch for m in (settings.milestones or [])],
            gamma=settings.gamma,
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        dataset = getattr(datamodule, "train_dataset", None)
        checkpoint[CHECKPOINT_KEY] = {
            "format": CHECKPOINT_FORMAT,
            "config": self.hparams.run_config,
            # {id, name} of the training data: evaluation refuses data with other categories.
            "categories": None
            if dataset is None
            else [{"id": int(c["id"]), "name": str(c["name"])} for c in dataset.categories],
            # the model's label k is category_ids[k - 1] (absent in older checkpoints: k itself)
            "category_ids": None if dataset is None else [int(i) for i in dataset.category_ids],
        }


class RandomStateCallback(L.Callback):
    """Saves and restores the Python, NumPy, torch CPU and CUDA RNG states with each checkpoint.

    Lightning restores epoch, optimizer and scheduler state on resume but not the random
    generators; with this callback a resumed run shuffles and samples (RPN / ROI sampling)
    exactly as the interrupted one would have from that checkpoint on. On a GPU the samplers
    draw from the CUDA generator: its state (the current device's, ``"cuda"``) is saved when
    CUDA is in use, and restored when the resuming process has CUDA. States are stored as
    plain lists and tensors so checkpoints still load with ``torch.load(weights_only=True)``.

    Not covered: under DDP, the other ranks' states (only rank 0's is saved; every rank gets
    it back). The augmentation restarts every epoch from its own seed
    (:class:`coorddet.datamodule.AugmentationEpochs`), so it needs no saved state.
    """

    def state_dict(self) -> dict[str, Any]:
        numpy_state = np.random.get_state()
        state = {
            "python": _to_lists(random.getstate()),
            "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()  # the current device: this rank's GPU
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, *rest = state_dict["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict["cuda"])


def _to_lists(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_lists(v) for v in value]
    return value


def final_metrics(module: DetectionModule) -> dict[str, float | None]:
    """The last validation metrics under the pinned keys (and mask AP, ``SEGM_KEYS``, for a
    detector with masks); ``None`` (JSON null) where undefined."""
    keys = METRIC_KEYS + (SEGM_KEYS if SEGM_KEYS[0] in module.last_metrics else ())
    return finite_or_none({key: module.last_metrics.get(key) for key in keys})
