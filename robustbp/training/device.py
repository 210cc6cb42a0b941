"""The device a run trains on, checked to exist on this machine."""
from __future__ import annotations

import torch


def check_device(name: str) -> torch.device:
    """torch.device(name), or a ValueError when it is not a device or not available here."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"invalid device {name!r}: {error}") from None
    available = {"cpu": lambda: True, "cuda": torch.cuda.is_available,
                 "mps": lambda: hasattr(torch.backends, "mps") and torch.backends.mps.is_available()}
    if not available.get(device.type, lambda: True)():
        raise ValueError(f"device {name!r} is not available on this machine (try --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
