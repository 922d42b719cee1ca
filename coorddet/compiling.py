"""``--compile``: ``torch.compile`` the part of a detector that compiles cleanly.

A detector's backbone is a fixed stack of convolutions on a padded batch: it compiles into
fused kernels. The rest (the transform, the RPN, the RoI heads, post-processing) works on
lists of per-image tensors of data-dependent sizes (proposals kept, boxes after NMS), where
``torch.compile`` would break the graph or recompile for every new shape, so it stays eager.
The backbone is compiled in place (``nn.Module.compile``): parameters, ``state_dict`` keys
and checkpoints are those of the eager model. Measured in docs/speed.md.
"""

from __future__ import annotations

from torch import nn


def compile_backbone(model: nn.Module) -> nn.Module:
    """``model`` (in place, and returned) with ``model.backbone`` compiled by
    ``torch.compile`` (its default mode; shapes marked dynamic after a second one is seen).
    Detectors without a ``backbone`` raise ``ValueError``."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"{type(model).__name__} has no backbone to compile")
    backbone.compile()
    return model
