"""The device a run trains (or evaluates, or times) on, checked to exist on this machine."""
from __future__ import annotations

import torch

DEVICE_HELP = "cpu, cuda, cuda:K or auto (cuda when a GPU is present, else cpu)"


def check_device(name: str) -> torch.device:
    """torch.device(name), with "auto" meaning cuda when available, else cpu; a ValueError when
    it is not a device or not available here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"invalid device {name!r} (use {DEVICE_HELP}): {error}") from None
    available = {"cpu": lambda: True, "cuda": torch.cuda.is_available,
                 "mps": lambda: hasattr(torch.backends, "mps") and torch.backends.mps.is_available()}
    if not available.get(device.type, lambda: True)():
        raise ValueError(f"device {name!r} is not available on this machine (try --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
