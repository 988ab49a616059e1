"""How a device is named in benchmark and result rows (shared by the bench entry points)."""
from __future__ import annotations

import platform

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
