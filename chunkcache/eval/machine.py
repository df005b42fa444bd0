"""What a benchmark ran on, for its report: the accelerator's name when the model is on one, else
the CPU and its thread count."""

from __future__ import annotations

import platform

import torch


def describe(device: torch.device) -> str:
    """e.g. ``NVIDIA H200 (cuda), torch 2.11.0`` or ``x86_64 CPU (2 threads), torch 2.13.0``."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda), torch {torch.__version__}"
    if device.type == "cpu":
        return f"{platform.machine()} CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"
    return f"{device.type}, torch {torch.__version__}"
