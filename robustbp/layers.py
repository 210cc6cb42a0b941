"""Layers the toolkit's models share: input normalization lives inside the model.

Images stay in [0, 1] everywhere (data, noise, attacks, clipping); each model's first layer
maps them to the standardized scale it trains on.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """y = (x - mean) / std, per channel; mean and std are fixed buffers, not parameters."""

    def __init__(self, mean: Sequence[float] | float = 0.0, std: Sequence[float] | float = 1.0):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        if not bool(torch.all(std_t > 0)):
            raise ValueError(f"Normalize: std must be positive, got {std_t.flatten().tolist()}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
