"""The machine: what a measurement ran on (hardware, library versions) and process settings."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> dict[str, Any]:
    """CPU, CPU count, torch threads, GPU (or None) and the Python, torch, torchvision and
    lightning versions."""
    import lightning
    import torch
    import torchvision

    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": lightning.__version__,
    }


def use_huge_pages() -> None:
    """Back large CPU tensors with transparent huge pages, unless the user said otherwise.

    Sets PyTorch's ``THP_MEM_ALLOC_ENABLE=1``, which PyTorch reads once: call this before the
    first large tensor is allocated (after ``import torch`` is fine). Without it every tensor of 2 MB or more (an inference batch's RoI
    features are 80 MB) comes from fresh 4 kB pages that the kernel faults in and zeroes one
    by one: allocating and filling 80 MB took 23 ms instead of 4 ms here, and batch-64
    inference ran 1.3x faster with it. ``THP_MEM_ALLOC_ENABLE=0`` in the environment keeps
    PyTorch's default; child processes (DDP workers) inherit the setting.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
