"""Host-to-device copies that do not wait for the device.

``torch.tensor(values, device="cuda")`` and ``cpu_tensor.to("cuda")`` copy from pageable
memory, which makes the host wait until the GPU has finished the work queued before the copy:
a few small copies per step (image sizes, box counts, CoordConv extents) each stall the
pipeline. :func:`to_device` stages the tensor in pinned memory and copies it asynchronously
in stream order instead; PyTorch's pinned-memory allocator keeps the staging buffer until the
copy has run. On the CPU (and under TorchScript) it is a plain ``.to(device)``.

This module must stay TorchScript-compatible: no ``from __future__ import annotations``.
"""

import torch
from torch import Tensor


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` (on the CPU) on ``device``, without a host sync when ``device`` is a GPU."""
    if device.type == "cpu" or tensor.device.type != "cpu" or torch.jit.is_scripting():
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def ints_to_device(values: list[int], device: torch.device) -> Tensor:
    """``torch.tensor(values, device=device)`` (int64) through :func:`to_device`."""
    return to_device(torch.tensor(values, dtype=torch.int64), device)
