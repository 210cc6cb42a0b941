"""Small test models written the way users write them (float64, a few hundred parameters).

MODELS: name -> Entry(constructor, input shape without the batch, train_mode_ok), a NamedTuple;
PIECEWISE_LINEAR names those whose only nonlinearities are ReLU, max-pooling and dropout.
`build(name, seed, train)` returns (model, x, y) like test_methods.build.
Stateful parametrizations (both spectral norms run a power-iteration step on every forward in
train mode) have train_mode_ok=False and are always built in eval mode.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, prune

BATCH = 5


# ---- "No silent wrong gradient" ----
def conv_padding(mode):
    def make():
        return nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1, padding_mode=mode), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode), nn.ReLU(), nn.Flatten(), nn.Linear(64, 4),
        )

    return make


def conv_same(kernel):
    def make():
        return nn.Sequential(
            nn.Conv2d(1, 3, kernel, padding="same"), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(3, 4, kernel, padding="same"), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 4),
        )

    return make


class MaskedLinear(nn.Linear):
    """A Linear subclass with its own forward: a fixed sparsity mask on the weight."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features)
        generator = torch.Generator().manual_seed(in_features * out_features)
        self.register_buffer("mask", (torch.rand(out_features, in_features, generator=generator) > 0.3).float())

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


def masked_linear():
    return nn.Sequential(
        nn.AvgPool2d(2), nn.Flatten(), MaskedLinear(16, 12), nn.ReLU(), MaskedLinear(12, 10), nn.ReLU(), nn.Linear(10, 4)
    )


class LoRAConv2d(nn.Conv2d):
    """A Conv2d subclass with its own forward: a low-rank update B·A added to the frozen-shape kernel."""

    def __init__(self, in_channels, out_channels, kernel_size, rank=2, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)
        self.lora_a = nn.Parameter(0.3 * torch.randn(rank, in_channels * kernel_size * kernel_size))
        self.lora_b = nn.Parameter(0.3 * torch.randn(out_channels, rank))

    def forward(self, x):
        return self._conv_forward(x, self.weight + (self.lora_b @ self.lora_a).view_as(self.weight), self.bias)


def lora_conv():
    return nn.Sequential(
        LoRAConv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), LoRAConv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(16, 4),
    )


class LayerScale(nn.Module):
    """head(body(x) · γ) with γ a parameter of the container itself."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 16))
        self.head = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x):
        return self.head(self.body(x) * self.gamma)


def weight_norm():
    return nn.Sequential(
        nn.AvgPool2d(2), nn.Flatten(), parametrizations.weight_norm(nn.Linear(16, 12)), nn.ReLU(),
        nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4),
    )


def spectral_norm_parametrization():
    return nn.Sequential(
        nn.AvgPool2d(2), nn.Flatten(), parametrizations.spectral_norm(nn.Linear(16, 12)), nn.ReLU(),
        nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4),
    )


def spectral_norm_hook():
    return nn.Sequential(
        nn.AvgPool2d(2), nn.Flatten(), torch.nn.utils.spectral_norm(nn.Linear(16, 12)), nn.ReLU(),
        nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4),
    )


def pruned_conv():
    conv = nn.Conv2d(1, 4, 3, padding=1)
    prune.l1_unstructured(conv, "weight", amount=0.4)
    return nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 4))


def dropout2d():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.4), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(16, 4),
    )


class LeNet(nn.Module):
    """The PyTorch tutorial's LeNet ("Neural Networks" / "Training a classifier"), scaled down."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3)
        self.conv2 = nn.Conv2d(3, 4, 2)
        self.fc1 = nn.Linear(4 * 2 * 2, 10)
        self.fc2 = nn.Linear(10, 8)
        self.fc3 = nn.Linear(8, 4)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.fc2(x).relu()
        return self.fc3(x)


class BasicBlock(nn.Module):
    """As torchvision's ResNet block: one ReLU module called twice, and an in-place residual add."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out += identity
        out = self.relu(out)
        return out


def basic_block_net():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True), BasicBlock(4),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )


# ---- "Any model" ----
class FunctionalResidual(nn.Module):
    """A residual block whose forward calls F.relu."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.conv2(F.relu(self.conv1(x))))
        return self.head(F.adaptive_avg_pool2d(x, 2).flatten(1))


def mlp_layernorm():
    return nn.Sequential(
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 12), nn.LayerNorm(12), nn.GELU(), nn.Linear(12, 10), nn.SiLU(),
        nn.Linear(10, 4),
    )


def cnn_groupnorm():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ELU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3),
        nn.Softplus(), nn.Flatten(), nn.Linear(16, 4),
    )


class TinyViT(nn.Module):
    """Patch embedding, learned positions, one pre-norm transformer block, mean pooling, a head."""

    def __init__(self, dim=8, heads=2, patch=4, tokens=4, classes=4):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, patch, stride=patch)
        self.pos = nn.Parameter(0.1 * torch.randn(1, tokens, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        h = self.norm1(tokens)
        tokens = tokens + self.attn(h, h, h, need_weights=False)[0]
        tokens = tokens + self.mlp(self.norm2(tokens))
        return self.head(self.norm(tokens).mean(dim=1))


class SDPAttention(nn.Module):
    """Tokens (B, T, D) -> two-head attention by F.scaled_dot_product_attention on q, k, v from nn.Linear."""

    def __init__(self, dim=8, heads=2, classes=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        batch, tokens, dim = x.shape

        def split(t):
            return t.view(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        x = x + self.out(attended.transpose(1, 2).reshape(batch, tokens, dim))
        return self.head(x.mean(1))


def conv1d():
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2), nn.Conv1d(4, 4, 3), nn.BatchNorm1d(4), nn.ReLU(),
        nn.AdaptiveAvgPool1d(2), nn.Flatten(), nn.Linear(8, 3),
    )


def upsample():
    """A small decoder step: max-pool down, nn.Upsample (bilinear) back up, a skip added."""
    class UpsampleNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
            self.skip = nn.Conv2d(1, 3, 1)
            self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 3))

        def forward(self, x):
            return self.head(self.up(self.down(x)) + self.skip(x))

    return UpsampleNet()


class Entry(NamedTuple):
    make: Callable[[], nn.Module]
    shape: tuple  # input shape without the batch
    train_mode_ok: bool = True


MODELS = {
    "conv-reflect": Entry(conv_padding("reflect"), (1, 8, 8)),
    "conv-circular": Entry(conv_padding("circular"), (1, 8, 8)),
    "conv-replicate": Entry(conv_padding("replicate"), (1, 8, 8)),
    "conv-same-odd": Entry(conv_same(3), (1, 8, 8)),
    "conv-same-even": Entry(conv_same(4), (1, 8, 8)),
    "masked-linear": Entry(masked_linear, (1, 8, 8)),
    "lora-conv": Entry(lora_conv, (1, 8, 8)),
    "layerscale": Entry(LayerScale, (1, 8, 8)),
    "weight-norm": Entry(weight_norm, (1, 8, 8)),
    "spectral-norm": Entry(spectral_norm_parametrization, (1, 8, 8), train_mode_ok=False),
    "spectral-norm-hook": Entry(spectral_norm_hook, (1, 8, 8), train_mode_ok=False),
    "pruned-conv": Entry(pruned_conv, (1, 8, 8)),
    "dropout2d": Entry(dropout2d, (1, 8, 8)),
    "lenet": Entry(LeNet, (1, 12, 12)),
    "basic-block": Entry(basic_block_net, (1, 6, 6)),
    "functional-residual": Entry(FunctionalResidual, (1, 8, 8)),
    "mlp-layernorm": Entry(mlp_layernorm, (1, 8, 8)),
    "cnn-groupnorm": Entry(cnn_groupnorm, (1, 8, 8)),
    "vit": Entry(TinyViT, (1, 8, 8)),
    "sdpa": Entry(SDPAttention, (6, 8)),
    "conv1d": Entry(conv1d, (2, 16)),
    "upsample": Entry(upsample, (1, 8, 8)),
}
# ReLU, max-pooling, dropout and affine maps only: the held derivatives are the exact ones
PIECEWISE_LINEAR = set(MODELS) - {"mlp-layernorm", "cnn-groupnorm", "vit", "sdpa"}
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


def build(name, seed=0, train=True):
    """(model, x, y): float64, non-trivial normalization parameters, x in [0, 1], random labels."""
    entry = MODELS[name]
    torch.manual_seed(seed)
    model = entry.make().double().train(train and entry.train_mode_ok)
    for m in model.modules():
        if isinstance(m, NORMS) and m.weight is not None:
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(BATCH, *entry.shape, generator=generator, dtype=torch.float64)
    with torch.no_grad():  # no graph left in hook-set attributes (spectral_norm, prune), so deepcopy works
        classes = model(x).shape[1]
    y = torch.randint(0, classes, (BATCH,), generator=generator)
    return model, x, y


def is_image(x) -> bool:
    return x.dim() == 4


def user_tangents(x, count=3, seed=7):
    """Fixed random directions (B, count, *x.shape[1:]) for inputs that are not images."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(count, *x.shape[1:], generator=generator, dtype=x.dtype)
    return lambda inp: directions.expand(inp.shape[0], *directions.shape)
