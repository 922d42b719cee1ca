"""Evaluation, stage one: a model and images -> per-image predictions.

:func:`predict` runs a model over a dataset of ``(image, target)`` pairs (a
:class:`coorddet.data.CocoDataset`, or any dataset whose targets carry ``image_id``) or over a
list of image tensors, in batches, and returns one :class:`ImagePrediction` per image:
detections in original image pixels and, for detectors with a region proposal network, the
paper's RPN proposals. :func:`predict_batch` is one batch of it, which validation during
training calls directly. Labels are the model's (1..K); map them to a dataset's category ids
with :func:`coorddet.predictions.with_category_ids`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from coorddet.data import collate_detection
from coorddet.inference import evaluating, has_proposals, predict_with_proposals
from coorddet.predictions import ImagePrediction
from coorddet.system import ThreadGovernor


def predict_batch(
    model: nn.Module,
    images: list[Tensor],
    *,
    image_ids: Sequence[int],
    proposals: bool = True,
    rpn_top_k: int = 10,
    rpn_nms_iou: float = 0.8,
) -> list[ImagePrediction]:
    """Predictions for one batch: ``images`` float ``(C, H, W)`` tensors as ``model`` takes
    them, ``image_ids`` their ids. ``proposals``: also the paper's RPN proposals (the
    ``rpn_top_k`` best after NMS at ``rpn_nms_iou``), for detectors that have an RPN.
    Detections are exactly ``model(images)``'s in eval mode; training modes are restored."""
    if len(image_ids) != len(images):
        raise ValueError(f"{len(images)} images but {len(image_ids)} image_ids")
    if proposals and has_proposals(model):
        return predict_with_proposals(
            model, images, image_ids=image_ids, top_k=rpn_top_k, nms_iou=rpn_nms_iou
        )
    with evaluating(model):
        detections = model(images)
    return ImagePrediction.batch(image_ids, detections)


class _Images(Dataset):
    """A list of image tensors as ``(image, {"image_id": index})`` pairs."""

    def __init__(self, images: Sequence[Tensor], image_ids: Sequence[int]) -> None:
        self.images, self.image_ids = images, image_ids

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.images[index], {"image_id": torch.tensor(self.image_ids[index])}


def _pairs(batch: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[list, list]:
    return [image for image, _ in batch], [target for _, target in batch]


def predict(
    model: nn.Module,
    images: Dataset | Sequence[Tensor],
    *,
    image_ids: Sequence[int] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "32-true",
    proposals: bool = True,
    rpn_top_k: int = 10,
    rpn_nms_iou: float = 0.8,
    label: str = "model",
    quiet: bool = True,
) -> list[ImagePrediction]:
    """Predictions for every image, in order.

    Args:
        model: a detector (moved to ``device``; left in eval mode afterwards unchanged).
        images: a dataset of ``(image, target)`` pairs whose targets hold ``image_id``, or a
            list of float ``(C, H, W)`` tensors (ids: ``image_ids``, default 0, 1, ...).
        batch_size, num_workers: the DataLoader's.
        precision: ``"32-true"``, or ``"bf16-mixed"``: under ``torch.autocast`` with
            bfloat16, as Lightning's ``bf16-mixed`` validates.
        proposals, rpn_top_k, rpn_nms_iou: see :func:`predict_batch`.
        label, quiet: the progress bar's and timing line's name; ``quiet``: neither.
    """
    collate = collate_detection
    if not isinstance(images, Dataset):
        ids = list(range(len(images))) if image_ids is None else list(image_ids)
        images, collate = _Images(images, ids), _pairs
    device = torch.device(device)
    pin = device.type == "cuda"  # pinned batches: asynchronous copies to the GPU
    loader = DataLoader(
        images, batch_size=batch_size, collate_fn=collate, num_workers=num_workers, pin_memory=pin
    )
    batches = (
        ([image for image in batch], [int(t["image_id"]) for t in targets], len(batch))
        for batch, targets in loader
    )  # image ids: host tensors, no sync
    records: list[ImagePrediction] = []
    for batch_records in run_batches(
        model, batches, total=len(images), batch_size=batch_size, device=device,
        precision=precision, proposals=proposals, rpn_top_k=rpn_top_k,
        rpn_nms_iou=rpn_nms_iou, label=label, quiet=quiet,
    ):  # fmt: skip
        records += batch_records
    return records


def run_batches(
    model: nn.Module,
    batches: Iterable[tuple[list[Tensor], list[int], int]],
    *,
    total: int,
    batch_size: int,
    device: str | torch.device = "cpu",
    precision: str = "32-true",
    proposals: bool = True,
    rpn_top_k: int = 10,
    rpn_nms_iou: float = 0.8,
    label: str = "model",
    quiet: bool = True,
) -> Iterator[list[ImagePrediction]]:
    """:func:`predict_batch` for each ``(images, image_ids, advance)`` of ``batches`` (CPU
    tensors, moved to ``device``; ``advance``: images the batch accounts for, skipped ones
    included), yielding each batch's records as it is done: what :func:`predict` collects
    and ``coorddet.predict`` writes as it goes. A progress bar over ``total`` images and,
    unless ``quiet``, the closing timing line (img/s)."""
    device = torch.device(device)
    model.to(device)
    governor = ThreadGovernor(active=None if device.type == "cpu" else False)
    started = time.perf_counter()
    console = Console(stderr=True)  # stdout keeps only the results; no bar in CI logs
    bar = Progress(console=console, disable=quiet or not console.is_terminal, transient=True)
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    done = 0
    with bar as progress:
        task = progress.add_task(f"{label}: inference", total=total)
        for images, image_ids, advance in batches:
            if images:
                with torch.inference_mode(), bf16:
                    records = predict_batch(
                        model,
                        [image.to(device, non_blocking=True) for image in images],
                        image_ids=image_ids,
                        proposals=proposals,
                        rpn_top_k=rpn_top_k,
                        rpn_nms_iou=rpn_nms_iou,
                    )
                done += len(images)
                yield records
            progress.advance(task, advance)
            governor.step()  # a busy neighbour takes a thread, not 10x the time
    seconds = time.perf_counter() - started
    if not quiet:
        print(f"{label}: {done} images in {seconds:.1f} s "
              f"({done / max(seconds, 1e-9):.1f} img/s, batch {batch_size}, {device})")  # fmt: skip


def resolve_device(text: str) -> Any:
    """``"auto"`` (CUDA when there is one), ``"cpu"``, ``"cuda:N"`` or ``"mps"`` as a device;
    :class:`UserError` for one this machine does not have."""
    from coorddet.errors import UserError

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda" and (
        not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise UserError(f"--device {text}: no such CUDA device here; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {text}: MPS is not available here; use --device cpu")
    return device
