"""The machine line every benchmark prints with its results."""

from __future__ import annotations

import os
import platform

import torch
import torchvision


def machine(device: torch.device | None = None) -> str:
    """The GPU, or the CPU with its core count and its load when the benchmark started; library versions."""
    versions = f"torch {torch.__version__}, torchvision {torchvision.__version__}"
    if device is not None and device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {versions}"
    cpu = platform.processor() or platform.machine()
    # The load tells whether the machine was shared with other work while it ran.
    load = os.getloadavg()[0]
    return f"{cpu} CPU, {os.cpu_count()} cores, load average {load:.2f} at the start, {versions}"
