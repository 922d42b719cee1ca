"""Lightning's view of a COCO dataset: train/val loaders with per-worker augmentation.

Kept apart from :mod:`coorddet.data` so that evaluation and scripts that only read a dataset do
not import Lightning and albumentations (a few seconds at every start).
"""

from __future__ import annotations

import gc
import inspect
from functools import partial
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from coorddet.data import DECODE_MODES, CocoDataset, collate_detection
from coorddet.errors import UserError
from coorddet.transforms import POLICIES, build_transforms
from coorddet.validate import check_choice, check_int

MODEL_KEYS = frozenset({"boxes", "labels", "masks"})  # the target fields a detector reads


def _seed_augmentation_worker(worker_id: int, *, rank: int) -> None:
    """DataLoader ``worker_init_fn``: give each worker (and each rank) its own augmentation stream.

    A forked worker inherits a copy of the parent's generator, so without this every worker
    would produce the same augmentations, and non-persistent workers the same ones every
    epoch. ``info.seed`` comes from the torch RNG, so ``seed_everything`` makes it reproducible.
    """
    info = torch.utils.data.get_worker_info()
    info.dataset.reseed(_mix_seed(info.seed, rank))


def _mix_seed(seed: int, rank: int, epoch: int = 0) -> int:
    return int(np.random.SeedSequence([seed % 2**63, rank, epoch]).generate_state(1)[0])


class AugmentationEpochs(L.Callback):
    """Restarts the training augmentation at every epoch from (seed, rank, epoch).

    Then epoch ``k`` augments the same way whether the run got there in one go or was resumed
    from a checkpoint, and every DDP rank has its own stream. ``train.py``'s Trainer has it; add
    it to your own Trainer's callbacks when you use :class:`CocoDataModule` elsewhere.
    """

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if isinstance(datamodule, CocoDataModule):
            datamodule.set_epoch(trainer.current_epoch, rank=trainer.global_rank)


GPU_WORKERS = 4  # DataLoader workers per GPU process by default (fewer on fewer cores)


def loading_defaults(
    num_workers: int | None, pin_memory: bool | None, *, device: torch.device, processes: int
) -> tuple[int, bool]:
    """``(num_workers, pin_memory)`` with ``None`` resolved for a process training on
    ``device`` beside ``processes - 1`` others on its machine: on a GPU, pinned memory
    (asynchronous copies) and up to :data:`GPU_WORKERS` workers, leaving the process a core
    of its own (:func:`coorddet.system.usable_cpus` divided among the processes); on the CPU,
    no workers (images decoded into memory cost nothing to read, and the augmentation stream
    stays the one of earlier runs) and no pinning."""
    from coorddet.system import usable_cpus

    gpu = device.type == "cuda"
    if num_workers is None:
        cores = usable_cpus() // max(1, processes)
        num_workers = min(GPU_WORKERS, max(0, cores - 1)) if gpu else 0
    return num_workers, gpu if pin_memory is None else pin_memory


class CocoDataModule(L.LightningDataModule):
    """Train/val loaders over a ``data_gen`` dataset in ``data_dir``.

    Training images are augmented with ``augment_policy`` (see :mod:`coorddet.transforms`)
    when ``augment``; validation images never are. Batches are ``collate_detection`` output.
    ``masks``: targets also carry instance masks (Mask R-CNN; both splits need
    ``segmentation``). Lightning adds the ``DistributedSampler`` under DDP. ``num_workers``
    and ``pin_memory`` left ``None`` are chosen for the Trainer's device
    (:func:`loading_defaults`: on a GPU, workers and pinned memory).
    """

    def __init__(
        self,
        data_dir: str,
        *,
        batch_size: int = 16,
        num_workers: int | None = 0,
        augment: bool = True,
        augment_policy: str = "digits",
        train_split: str = "train",
        val_split: str = "val",
        decode: str = "auto",
        pin_memory: bool | None = False,
        masks: bool = False,
    ) -> None:
        super().__init__()
        check_int("batch_size", batch_size, 1, error=UserError)
        if num_workers is not None:  # None: chosen for the Trainer's device (loading_defaults)
            check_int("num_workers", num_workers, 0, error=UserError)
        check_choice("augment_policy", augment_policy, POLICIES, error=UserError)
        check_choice("decode", decode, DECODE_MODES, error=UserError)
        # Lightning's default frame lookup leaves a frame cycle that pins the caller's locals
        # (loaders with live workers among them) until the garbage collector runs; handing it
        # our own frame avoids that.
        self.save_hyperparameters(frame=inspect.currentframe())
        self.train_dataset: CocoDataset | None = None
        self.val_dataset: CocoDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Open (check and decode) the splits ``stage`` needs, once."""
        settings = self.hparams
        if stage in (None, "fit") and self.train_dataset is None:
            transforms = build_transforms(settings.augment_policy) if settings.augment else None
            self.train_dataset = CocoDataset(
                settings.data_dir,
                settings.train_split,
                transforms,
                decode=settings.decode,
                masks=settings.masks,
            )
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            self.val_dataset = CocoDataset(
                settings.data_dir, settings.val_split, decode=settings.decode, masks=settings.masks
            )
        if self.trainer is not None and self.trainer.global_rank > 0:
            # Process 0 alone scores validation (DetectionModule); the others read the splits'
            # arrays only, not their COCO indexes (every image and annotation as a Python
            # object: gigabytes per process for COCO's train2017).
            for dataset in (self.train_dataset, self.val_dataset):
                if dataset is not None:
                    dataset.coco = None
        # The splits' COCO indexes are many small Python objects that live as long as the run:
        # out of the garbage collector's sight, forked DataLoader workers do not copy the pages
        # it would touch, so their memory stays that of one process, whatever the split size.
        gc.freeze()
        train, val = self.train_dataset, self.val_dataset
        if train is not None and val is not None and train.categories != val.categories:
            raise UserError(
                f"{settings.data_dir}: splits {settings.train_split} and {settings.val_split} "
                "have different 'categories'; give both splits the same list (ids and names)"
            )

    @property
    def channels(self) -> int:
        """3 when either opened split holds colour images, else 1 (the model's
        ``image_channels``; a gray split beside a colour one is replicated by the model)."""
        opened = [d for d in (self.train_dataset, self.val_dataset) if d is not None]
        if not opened:
            raise RuntimeError("call setup() before asking for the channels")
        return max(dataset.channels for dataset in opened)

    def train_dataloader(self) -> DataLoader:
        dataset = self._opened(self.train_dataset, "train")
        rank = self.trainer.global_rank if self.trainer is not None else 0
        self.set_epoch(0, rank=rank)
        return self._loader(dataset, shuffle=True, rank=rank)

    def set_epoch(self, epoch: int, *, rank: int = 0) -> None:
        """Restart the training augmentation for ``epoch`` (``AugmentationEpochs`` calls this).

        Without workers the stream lives in this process and restarts from (seed, rank,
        epoch). Training workers are started anew every epoch and seed themselves from the
        torch generator, which ``seed_everything`` and checkpoints (``RandomStateCallback``)
        make reproducible.
        """
        if self._loading()[0] == 0 and self.train_dataset is not None:
            self.train_dataset.reseed(_mix_seed(torch.initial_seed(), rank, epoch))

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        """``(images, targets)`` moved tensor by tensor: Lightning's generic walk over the
        nested lists and dicts costs time on every step, on CPU too, where nothing moves.
        Asynchronous copies (from pinned memory with ``pin_memory``); the targets' fields the
        detectors do not read (``image_id``, ``area``, ``iscrowd``) stay on the host, so that
        reading an ``image_id`` never waits for the GPU."""
        images, targets = batch
        return (
            [image.to(device, non_blocking=True) for image in images],
            [
                {k: v.to(device, non_blocking=True) if k in MODEL_KEYS else v for k, v in t.items()}
                for t in targets
            ],
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._opened(self.val_dataset, "val"), shuffle=False, rank=0)

    def _loading(self) -> tuple[int, bool]:
        """``(num_workers, pin_memory)``, ``None`` resolved for the Trainer's device."""
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        processes = trainer.num_devices if trainer is not None else 1
        return loading_defaults(
            self.hparams.num_workers, self.hparams.pin_memory, device=device, processes=processes
        )

    def _loader(self, dataset: CocoDataset, *, shuffle: bool, rank: int) -> DataLoader:
        workers, pin_memory = self._loading()
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            drop_last=False,
            num_workers=workers,
            collate_fn=collate_detection,
            pin_memory=pin_memory,
            # Training workers restart every epoch so that each epoch's augmentation seeds come
            # from the torch generator, which a resumed run restores (see set_epoch).
            persistent_workers=workers > 0 and not shuffle,
            worker_init_fn=partial(_seed_augmentation_worker, rank=rank) if workers else None,
        )

    @staticmethod
    def _opened(dataset: CocoDataset | None, name: str) -> CocoDataset:
        if dataset is None:
            raise RuntimeError(f"call setup() before the {name} dataloader")
        return dataset
