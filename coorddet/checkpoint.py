"""Load a coorddet training checkpoint safely and rebuild its model.

Checkpoints are Lightning checkpoints with an extra ``"coorddet"`` entry (the resolved run
config and the training categories; see :class:`coorddet.module.DetectionModule`). They hold
plain data and tensors only, so they load with ``torch.load(weights_only=True)``, whose
unpickler refuses every Python global and so cannot run code. ``trust=True``
(``--trust-checkpoint``) lifts that restriction for files the user vouches for: loading such a
file runs whatever it was crafted to run.
"""

from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from coorddet.errors import UserError

CHECKPOINT_KEY = "coorddet"  # marks a checkpoint as ours; holds the resolved run config

if TYPE_CHECKING:
    from torch import nn

_UNREADABLE = "not a readable checkpoint: corrupt, truncated or not a PyTorch file"
# torch's weights-only unpickler, refusing a Python object (not a malformed stream): a global
# function or class, a call, an instance
_REFUSED_MARKERS = ("GLOBAL", "reduce for unrecognized function", "Can only create new object",
                    "Can only build")  # fmt: skip


@dataclass
class LoadedCheckpoint:
    path: Path
    config: dict[str, Any]  # the resolved run config (name, seed, data, model, optim, ...)
    categories: list[dict[str, Any]] | None  # [{id, name}] of the training data
    category_ids: list[int] | None  # label k -> category_ids[k - 1]; None: label k is id k
    state_dict: dict[str, torch.Tensor]  # the detector's weights (no "model." prefix)

    @property
    def name(self) -> str:
        return str(self.config.get("name") or Path(self.path).stem)

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @property
    def coordconv(self) -> bool:
        return bool(self.config["model"].get("coordconv"))

    def check_categories(self, categories: list[dict[str, Any]], where: str) -> None:
        """UserError unless the ``categories`` (COCO ``{id, name}``) of the data at ``where`` are
        the ones the model was trained on, ids and names."""
        data = {int(c["id"]): str(c["name"]) for c in categories}
        if self.categories is not None:
            trained = {int(c["id"]): str(c["name"]) for c in self.categories}
            differ = sorted(
                i for i in trained.keys() | data.keys() if trained.get(i) != data.get(i)
            )
            if differ:
                shown = "; ".join(
                    f"id {i}: {trained.get(i, '-')!r} vs {data.get(i, '-')!r}" for i in differ[:3]
                )
                more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
                raise UserError(
                    f"{self.path}: categories differ between its training data and {where} "
                    f"({shown}{more}); evaluate on data with the same categories"
                )
        num_classes = int(self.config["model"].get("num_classes", 0))
        if self.category_ids is None and max(data) >= num_classes:
            raise UserError(
                f"{self.path}: its model has {num_classes - 1} classes but {where} uses "
                f"category id {max(data)}"
            )

    def describe(self, image_sizes: set[tuple[int, int]]) -> str:
        """``CoordConv, seed 0`` (``retinanet, CoordConv, seed 0`` for detectors other than
        Faster R-CNN; ``CoordConv, seed 0, batch extent`` for the batch-extent ablation), plus
        a note when the model keeps images at their own size or resizes images of these
        ``(width, height)`` sizes (torchvision's rule with its ``min_size``/``max_size``)."""
        model = self.config["model"]
        text = f"{'CoordConv' if self.coordconv else 'no CoordConv'}, seed {self.seed}"
        detector = model.get("detector", "faster-rcnn")
        if detector != "faster-rcnn":  # the default goes unsaid, as in reports before
            text = f"{detector}, {text}"
        if self.coordconv and model.get("coordconv_extent", "image") != "image":
            text += f", {model['coordconv_extent']} extent"
        if model.get("keep_image_size"):
            return text + "; images at their own size"
        canvas = model.get("canvas_size")
        low, high = model.get("min_size") or canvas, model.get("max_size") or canvas
        if low is None or high is None:
            return text
        resized = sorted(
            (w, h) for w, h in image_sizes if min(low / min(w, h), high / max(w, h)) != 1.0
        )
        if resized:
            shown = ", ".join(f"{w}x{h}" for w, h in resized[:3])
            text += f"; min_size {low}, max_size {high}, so it resizes these {shown} images"
        return text

    def build_model(self, **overrides: Any) -> nn.Module:
        """The detector of the run config with the checkpoint's weights, in eval mode;
        ``overrides`` replace model settings that leave the weights' shapes alone (e.g.
        ``rpn_post_nms_top_n_test``)."""
        from coorddet.models import build_model

        try:
            model = build_model(**{**self.config["model"], **overrides})
            model.load_state_dict(self.state_dict)
        except (TypeError, ValueError, RuntimeError, KeyError) as error:
            raise UserError(
                f"{self.path}: cannot rebuild its model: {_first_line(error)}"
            ) from None
        return model.eval()


def load_checkpoint(path: str | Path, *, trust: bool = False) -> LoadedCheckpoint:
    """Read ``path``; one-line :class:`UserError` for missing, corrupt, unsafe or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": one stderr line
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as error:
        if not trust and any(marker in str(error) for marker in _REFUSED_MARKERS):
            raise UserError(
                f"{path}: refused, it holds Python objects or pickle code that could run when "
                "loaded; pass --trust-checkpoint only if you trust this file"
            ) from None
        raise UserError(f"{path}: {_UNREADABLE} ({_first_line(error)})") from None
    except Exception as error:  # noqa: BLE001 - any parse failure of a user's file is their error
        # weights_only raises e.g. KeyError on text files, RuntimeError on cut zip archives,
        # EOFError on cut pickles; a trusted unpickle can raise anything.
        raise UserError(f"{path}: {_UNREADABLE} ({_first_line(error)})") from None
    entry = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    config = entry.get("config") if isinstance(entry, dict) else None
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a coorddet checkpoint (written by train.py)")
    if not isinstance(config.get("model"), dict):
        raise UserError(f"{path}: its coorddet config has no 'model' section")
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise UserError(f"{path}: checkpoint has no model weights")
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    categories = entry.get("categories")
    category_ids = entry.get("category_ids")
    return LoadedCheckpoint(
        path,
        config,
        categories if isinstance(categories, list) else None,
        [int(i) for i in category_ids] if isinstance(category_ids, list) else None,
        weights,
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    first = text.splitlines()[0].split(". ")[0] if text else ""  # torch appends advice
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
