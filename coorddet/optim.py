"""The optimizers and learning-rate schedules a config may name, and how each is built.

The one list of names: the config checks against it, ``train.py --optimizer`` offers it and
:class:`coorddet.module.DetectionModule` builds from it. Light to import (torch loads when an
optimizer is built), so the config and the command line can use it before torch is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# name -> (torch.optim class, whether it takes momentum)
_OPTIMIZERS = {"sgd": ("SGD", True), "adamw": ("AdamW", False), "adam": ("Adam", False)}
OPTIMIZERS = tuple(_OPTIMIZERS)
SCHEDULERS = ("cosine", "step", "none")


def build_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> torch.optim.Optimizer:
    """The ``name`` optimizer (one of :data:`OPTIMIZERS`) over ``params``; ``momentum`` is used
    by ``sgd`` only."""
    import torch

    if name not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}")
    class_name, takes_momentum = _OPTIMIZERS[name]
    extra = {"momentum": momentum} if takes_momentum else {}
    return getattr(torch.optim, class_name)(params, lr=lr, weight_decay=weight_decay, **extra)


def lr_factor(
    scheduler: str, *, total_steps: int, warmup: int, milestones: list[int], gamma: float
) -> Callable[[int], float]:
    """The learning rate at optimizer step ``step``, as a factor of the peak, for ``LambdaLR``.

    A linear warm-up over the first ``warmup`` steps, then ``cosine`` (to 0 at
    ``total_steps``), ``step`` (times ``gamma`` at each of the ``milestones``, in steps) or
    ``none`` (constant). A plain function, not an object: ``LambdaLR`` then keeps it out of
    checkpoints.
    """

    def factor(step: int) -> float:
        scale = 1.0
        if warmup and step < warmup:
            scale = (step + 1) / warmup
        if scheduler == "cosine":
            progress = min(max(step - warmup, 0) / max(total_steps - warmup, 1), 1.0)
            scale *= 0.5 * (1.0 + math.cos(math.pi * progress))
        elif scheduler == "step":
            scale *= gamma ** sum(step >= m for m in milestones)
        return scale

    return factor
