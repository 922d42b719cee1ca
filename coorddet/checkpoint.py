"""Load a coorddet training checkpoint safely and rebuild its model.

Checkpoints are Lightning checkpoints with an extra ``"coorddet"`` entry (the resolved run
config and the training categories; see :class:`coorddet.module.DetectionModule`). They hold
plain data and tensors only, so they load with ``torch.load(weights_only=True)``, which cannot
run code. ``trust=True`` (``--trust-checkpoint``) lifts that restriction for files the user
vouches for.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchvision.models.detection import FasterRCNN

from coorddet.errors import UserError
from coorddet.module import CHECKPOINT_KEY


@dataclass
class LoadedCheckpoint:
    path: Path
    config: dict[str, Any]  # the resolved run config (name, seed, data, model, optim, ...)
    categories: list[dict[str, Any]] | None  # [{id, name}] of the training data
    state_dict: dict[str, torch.Tensor]  # the detector's weights (no "model." prefix)

    @property
    def name(self) -> str:
        return str(self.config.get("name") or Path(self.path).stem)

    @property
    def coordconv(self) -> bool:
        return bool(self.config.get("model", {}).get("coordconv"))

    def build_model(self) -> FasterRCNN:
        from coorddet.models import build_model

        try:
            model = build_model(**self.config["model"])
            model.load_state_dict(self.state_dict)
        except (TypeError, ValueError, RuntimeError, KeyError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"{self.path}: cannot rebuild its model: {first}") from None
        return model.eval()


def load_checkpoint(path: str | Path, *, trust: bool = False) -> LoadedCheckpoint:
    """Read ``path``; one-line :class:`UserError` for missing, corrupt or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as error:
        if not trust and "weights_only" in str(error):
            raise UserError(
                f"{path}: refused, it holds Python objects that could run code when loaded; "
                "if you trust this file, pass --trust-checkpoint"
            ) from None
        raise UserError(f"{path}: not a readable checkpoint (corrupt or truncated)") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError):
        raise UserError(f"{path}: not a readable checkpoint (corrupt or truncated)") from None
    entry = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
        raise UserError(f"{path}: not a coorddet checkpoint (written by train.py)")
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise UserError(f"{path}: checkpoint has no model weights")
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    return LoadedCheckpoint(path, entry["config"], entry.get("categories"), weights)
