"""A small residual network, to show that residual blocks work with the toolkit's passes.

He et al. 2016 §4.2 CIFAR family with n = 1 (ResNet-8): a 3×3 conv stem with 16 channels and
three BasicBlocks of 16, 32, 64 channels (strides 1, 2, 2), global average pool, FC.
Skip connections are written `out = out + shortcut` (a linear op, no module needed); the
downsampling shortcut is a 1×1 conv + BatchNorm. The LinBP paper (§4.2) attacks ResNet-50,
whose blocks are of the same kind.

3×32×32 → 16×32×32 → 16×32×32 → 32×16×16 → 64×8×8 → pool 64 → classes (1×28×28 → … 64×7×7;
any size works: a 3×3 stride-2 conv with padding 1 keeps a 1×1 map at 1×1).
"""
from __future__ import annotations

from torch import nn

from ..layers import Normalize
from .blocks import make_activation
from .registry import register


class BasicBlock(nn.Module):
    """conv 3×3 → BN → act → conv 3×3 → BN, plus the shortcut, then act. (C_in, H, W) → (C_out, H/s, W/s)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, activation_name: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = make_activation(activation_name)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        else:
            self.shortcut = None  # identity: no module, so no leaf without a rule in the passes
        self.act2 = make_activation(activation_name)

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        out = out + shortcut
        return self.act2(out)


class ResNetSmall(nn.Module):
    """Normalize → stem (conv 3×3 16, BN, act) → 3 BasicBlocks → AdaptiveAvgPool2d(1) → Flatten → FC."""

    def __init__(self, in_channels, num_classes, mean, std, activation_name, widths=(16, 32, 64)):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
            make_activation(activation_name),
        )
        blocks, channels = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(channels, width, stride=1 if i == 0 else 2, activation_name=activation_name))
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(self.normalize(x))))


@register("resnet-small")
def resnet_small(in_channels, image_size, num_classes, mean, std, activation):
    """Small residual net (He et al. 2016 §4.2, n = 1): stem 16, BasicBlocks 16/32/64, avg-pool, FC; no dropout."""
    del image_size  # global average pooling makes the head independent of the image size
    return ResNetSmall(in_channels, num_classes, mean, std, activation)
