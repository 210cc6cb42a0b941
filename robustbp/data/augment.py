"""Random affine augmentation of a batch of training images, in one `grid_sample` call.

IBP paper §7.4: "During training each sample was randomly cropped with ... maximum shift from
the central position in each dimension 2 pixels, scale range in each dimension [0.7 1.4],
random horizontal reflection for CIFAR-10 and CIFAR-100, value to use if the cropped image is
out of the borders of the original image 0. Test images were centrally cropped without any
random factors."

Here the output keeps the input's size (the paper cut 28×28 crops out of 32×32 CIFAR images;
our models adapt to 32×32 instead). Only training batches are augmented: the trainer calls
`Augment` on them and never on test or validation images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .readers import DataError


@dataclass(frozen=True)
class Augment:
    """augment(images, generator) → images: per-image random shift, scale, rotation and flip.

    images: float (N, C, H, W) in [0, 1] → same shape, in [0, 1]; pixels from outside the image are 0.
    Per image, independently:
      shift    dx, dy ~ U[-shift, shift] pixels (continuous; +dx moves content right, +dy down)
      scale    sx, sy log-uniform in [scale[0], scale[1]] (s > 1 enlarges the content)
      rotation angle ~ U[-rotation, rotation] degrees about the image centre (+ turns clockwise on screen)
      flip     horizontal mirror with probability 0.5 when flip=True (CIFAR only in the paper)
    Sampling is bilinear (float32 resampling is exact to about 1e-5). All random numbers come
    from `generator` (torch.rand(N, 6)), so a seeded generator gives the same batch every time;
    an Augment whose ranges are all zero returns a copy of the images and draws nothing.
    """

    shift: float = 2.0
    scale: tuple[float, float] = (0.7, 1.4)
    rotation: float = 0.0
    flip: bool = False

    def __post_init__(self):
        if not (math.isfinite(self.shift) and self.shift >= 0):
            raise ValueError(f"Augment: shift must be a finite number ≥ 0 pixels, got {self.shift}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] < math.inf:
            raise ValueError(f"Augment: scale must be (low, high) with 0 < low ≤ high, got {self.scale}")
        if not (math.isfinite(self.rotation) and self.rotation >= 0):
            raise ValueError(f"Augment: rotation must be a finite number ≥ 0 degrees, got {self.rotation}")
        object.__setattr__(self, "scale", (float(self.scale[0]), float(self.scale[1])))

    @classmethod
    def paper(cls, dataset_name: str) -> "Augment":
        """The IBP paper's setting (§7.4): shift 2 px, scale [0.7, 1.4], no rotation, flips for CIFAR only.

        The paper gives it for MNIST, CIFAR and SVHN; the other grey-image datasets get MNIST's.
        """
        from .registry import available

        if dataset_name not in available():
            raise DataError(f"Augment.paper: unknown dataset {dataset_name!r}; available: {', '.join(available())}")
        return cls(shift=2.0, scale=(0.7, 1.4), rotation=0.0, flip=dataset_name.startswith("cifar"))

    @property
    def is_identity(self) -> bool:
        """True when every range is zero (shift 0, scale (1, 1), rotation 0, no flip): a no-op."""
        return self.shift == 0 and self.scale == (1.0, 1.0) and self.rotation == 0 and not self.flip

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        _check_images(images)
        return self.apply(images, self.draw(images.shape[0], generator))

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor | None:
        """The random numbers of `n` images, (n, 6) uniforms on the generator's device; None (and
        nothing drawn) for the identity. Row i is what image i of a batch of n gets, so a slice of
        one batch's draws augments that slice as the whole batch would (several processes)."""
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"Augment: pass a seeded torch.Generator, got {type(generator).__name__}")
        if self.is_identity:
            return None
        return torch.rand(n, 6, generator=generator, device=generator.device)

    def apply(self, images: torch.Tensor, draws: torch.Tensor | None) -> torch.Tensor:
        """The images augmented with the random numbers `draws` (from `draw`, one row per image)."""
        _check_images(images)
        if draws is None:
            return images.clone()  # nothing to draw; also exact, unlike float32 resampling (~4e-6 off)
        n = images.shape[0]
        if draws.shape != (n, 6):
            raise ValueError(f"Augment: draws must have shape ({n}, 6) for {n} images, got {tuple(draws.shape)}")
        u = draws.to(images.device, torch.float32)
        shift = (2 * u[:, 0:2] - 1) * self.shift
        low, high = math.log(self.scale[0]), math.log(self.scale[1])
        scale = torch.exp(low + u[:, 2:4] * (high - low))
        angle = (2 * u[:, 4] - 1) * self.rotation
        flip = (u[:, 5] < 0.5) if self.flip else torch.zeros(n, dtype=torch.bool, device=images.device)
        return self.transform(images, shift, scale, angle, flip)

    @staticmethod
    def transform(images: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, angle: torch.Tensor,
                  flip: torch.Tensor) -> torch.Tensor:
        """Apply given per-image parameters: shift (N, 2) pixels (dx, dy), scale (N, 2) (sx, sy),
        angle (N,) degrees, flip (N,) bool. The content point q moves to p = R(angle)·S·(F q) + shift
        (in pixels about the centre), so the output samples the input at q = F·S⁻¹·R(-angle)·(p - shift).
        """
        _check_images(images)
        n, _, height, width = images.shape
        dtype, device = images.dtype, images.device
        shift, scale, angle = (t.to(device, dtype) for t in (shift, scale, angle))
        radians = torch.deg2rad(angle)
        cos, sin = torch.cos(radians), torch.sin(radians)
        mirror = 1.0 - 2.0 * flip.to(device, dtype)
        # A = F · S⁻¹ · R(-angle) in pixel units (x right, y down), as (N, 2, 2).
        a = torch.stack([
            torch.stack([mirror * cos / scale[:, 0], mirror * sin / scale[:, 0]], dim=1),
            torch.stack([-sin / scale[:, 1], cos / scale[:, 1]], dim=1),
        ], dim=1)
        # affine_grid works in normalized coordinates ([-1, 1] across the image, align_corners=False):
        # pixel = normalized · half, with half = (W/2, H/2).
        half = torch.tensor([width / 2.0, height / 2.0], dtype=dtype, device=device)
        a_norm = a * half[None, None, :] / half[None, :, None]
        offset = -(a_norm @ (shift / half)[:, :, None])
        theta = torch.cat([a_norm, offset], dim=2)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.clamp_(0.0, 1.0)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"Augment: images must be a float tensor (N, C, H, W), got {shape}")
