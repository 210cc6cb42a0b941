"""The one in-memory dataset type: images in [0, 1] and integer labels."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageSet:
    """images: float32 (N, C, H, W) in [0, 1]; labels: int64 (N,) in [0, num_classes)."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str = ""

    def __post_init__(self):
        if self.images.dim() != 4:
            raise ValueError(f"{self.name or 'ImageSet'}: images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"{self.name or 'ImageSet'}: {self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])

    def take(self, index: torch.Tensor, name: str | None = None) -> "ImageSet":
        """The images at `index` (a LongTensor), as a new ImageSet."""
        return ImageSet(self.images[index], self.labels[index], self.num_classes, name or self.name)
