"""The papers' convolutional networks, each a flat nn.Sequential that starts with Normalize.

Shapes below are for one image; N (the batch) is left out. Each model's `min_image_size`
is the smallest H = W its layers accept; `get` refuses smaller images with a ValueError.

| model      | paper                                  | meant for               | min |
|------------|----------------------------------------|-------------------------|-----|
| ibp-mnist  | IBP §7.5 (MNIST)                       | 1×28×28                 | 10  |
| ibp-cifar  | IBP §7.5 (CIFAR-10/100)                | 3×32×32 (and 28×28)     | 19  |
| ibp-svhn   | IBP §7.5 (SVHN: CIFAR net + one FC)    | 3×32×32                 | 19  |
| lenet      | exact spectral norm, App. A.1          | 1×28×28 (KMNIST, FMNIST)| 12  |
| lenet5     | LeCun et al. 1998, LinBP §4.2.2        | 1×28×28                 | 12  |
| lenet-functional | `lenet` written with F.relu, F.max_pool2d | 1×28×28             | 12  |
| vgg16-bn   | exact spectral norm, App. A.1          | 3×32×32 (any size)      | 1   |
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import Normalize
from .blocks import LayerList, add_classifier, make_activation, output_shape
from .registry import register


def conv_net(in_channels, image_size, num_classes, mean, std, dropout, activation_name,
             convs: list[tuple[int, int, int]], pool, hidden: list[int]) -> nn.Sequential:
    """Normalize, then per (channels, kernel, padding) in `convs`: Conv2d, activation, pool();
    then the FC head of `hidden` units (dropout on its last internal layer) and num_classes logits."""
    layers = LayerList().add_once("normalize", Normalize(mean, std))
    channels = in_channels
    for out_channels, kernel, padding in convs:
        layers.add("conv", nn.Conv2d(channels, out_channels, kernel, padding=padding))
        layers.add("act", make_activation(activation_name))
        layers.add("pool", pool())
        channels = out_channels
    features = math.prod(output_shape(layers, in_channels, image_size))
    return add_classifier(layers, features, hidden, num_classes, dropout, activation_name).sequential()


def _ibp_pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(kernel_size=3, stride=2)  # IBP §7.4: max over 3×3, stride 2, after each conv


@register("ibp-mnist", min_image_size=10)
def ibp_mnist(in_channels, image_size, num_classes, mean, std, dropout, activation):
    """IBP paper §7.5 MNIST net: conv 32@4×4 pad 0, conv 64@5×5 pad 2, each ReLU + max-pool 3×3/2; FC 256.

    1×28×28 → conv 32×25×25 → pool 32×12×12 → conv 64×12×12 → pool 64×5×5 → 1600 → 256 → classes.
    """
    return conv_net(in_channels, image_size, num_classes, mean, std, dropout, activation,
                    convs=[(32, 4, 0), (64, 5, 2)], pool=_ibp_pool, hidden=[256])


@register("ibp-cifar", min_image_size=19)
def ibp_cifar(in_channels, image_size, num_classes, mean, std, dropout, activation):
    """IBP paper §7.5 CIFAR net: 3 conv 5×5 (pads 0, 2, 2; 32, 32, 64 channels), each ReLU + max-pool 3×3/2; FC 256.

    The paper does not give the channel counts; 32, 32, 64 is the ConvNet-toolbox CIFAR layout.
    3×32×32 → 32×28×28 → 32×13×13 → 32×13×13 → 32×6×6 → 64×6×6 → 64×2×2 → 256 → 256 → classes
    (a 28×28 crop, as in the paper, also ends at 64×2×2).
    """
    return conv_net(in_channels, image_size, num_classes, mean, std, dropout, activation,
                    convs=[(32, 5, 0), (32, 5, 2), (64, 5, 2)], pool=_ibp_pool, hidden=[256])


@register("ibp-svhn", min_image_size=19)
def ibp_svhn(in_channels, image_size, num_classes, mean, std, dropout, activation):
    """IBP paper §7.5 SVHN net: the CIFAR net with one more FC layer of 256 ("10 times more samples").

    3×32×32 → … → 64×2×2 → 256 → 256 → 256 → classes; dropout on the second FC 256.
    """
    return conv_net(in_channels, image_size, num_classes, mean, std, dropout, activation,
                    convs=[(32, 5, 0), (32, 5, 2), (64, 5, 2)], pool=_ibp_pool, hidden=[256, 256])


def _max_pool_2() -> nn.MaxPool2d:
    return nn.MaxPool2d(kernel_size=2)


def _avg_pool_2() -> nn.AvgPool2d:
    return nn.AvgPool2d(kernel_size=2)


@register("lenet", min_image_size=12)
def lenet(in_channels, image_size, num_classes, mean, std, dropout, activation):
    """Exact-spectral-norm paper App. A.1 LeNet: conv 6@5×5 pad 2 + max-pool 2, conv 16@5×5 + max-pool 2; FC 120, 84.

    1×28×28 → 6×28×28 → 6×14×14 → 16×10×10 → 16×5×5 → 400 → 120 → 84 → classes (3×32×32 → 576 features).
    """
    return conv_net(in_channels, image_size, num_classes, mean, std, dropout, activation,
                    convs=[(6, 5, 2), (16, 5, 0)], pool=_max_pool_2, hidden=[120, 84])


@register("lenet5", min_image_size=12)
def lenet5(in_channels, image_size, num_classes, mean, std, dropout, activation):
    """Classic LeNet-5 (LeCun et al. 1998; LinBP paper §4.2.2): conv 6@5×5, avg-pool 2, conv 16@5×5, avg-pool 2; FC 120, 84.

    LeNet-5's subsampling layers are average pools (here nn.AvgPool2d, unlike `lenet`'s max-pools).
    The first conv pads by 2 so a 28×28 MNIST digit sees the 32×32 geometry LeCun used:
    1×28×28 → 6×28×28 → 6×14×14 → 16×10×10 → 16×5×5 → 400 → 120 → 84 → classes.
    """
    return conv_net(in_channels, image_size, num_classes, mean, std, dropout, activation,
                    convs=[(6, 5, 2), (16, 5, 0)], pool=_avg_pool_2, hidden=[120, 84])


VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


@register("vgg16-bn")
def vgg16_bn(in_channels, image_size, num_classes, mean, std, dropout, activation):
    """VGG16 with BatchNorm (exact-spectral-norm paper App. A.1, CIFAR-10): 13 conv 3×3 pad 1, each BN + ReLU; 5 max-pools 2.

    3×32×32 → 64×32×32 → … → 512×1×1 → 512 → 512 → 512 → classes.
    Differences from torchvision's vgg16_bn (built for 224×224): no AdaptiveAvgPool2d((7, 7))
    (on 32×32 it would only copy the 1×1 map 49 times) and a 512-512 head instead of 4096-4096,
    the usual CIFAR form; one dropout on the last internal FC layer when dropout > 0. A max-pool
    that would shrink a 1×1 map is left out, so 28×28 (→ 14, 7, 3, 1) and 8×8 images work too.
    """
    layers = LayerList().add_once("normalize", Normalize(mean, std))
    channels, (height, width) = in_channels, image_size
    for item in VGG16_LAYOUT:
        if item == "M":
            if min(height, width) >= 2:
                layers.add("pool", nn.MaxPool2d(kernel_size=2))
                height, width = height // 2, width // 2
            continue
        layers.add("conv", nn.Conv2d(channels, item, kernel_size=3, padding=1))
        layers.add("bn", nn.BatchNorm2d(item))
        layers.add("act", make_activation(activation))
        channels = item
    return add_classifier(layers, channels * height * width, [512, 512], num_classes, dropout, activation).sequential()


class FunctionalLeNet(nn.Module):
    """`lenet` written the way the PyTorch tutorial writes networks: layers as attributes, and
    ReLU, max-pooling and flattening as functional calls in `forward`."""

    def __init__(self, in_channels, image_size, num_classes, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        height, width = image_size
        features = 16 * ((height // 2 - 4) // 2) * ((width // 2 - 4) // 2)
        self.fc1, self.fc2, self.fc3 = nn.Linear(features, 120), nn.Linear(120, 84), nn.Linear(84, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(self.normalize(x))), 2)
        x = F.max_pool2d(self.conv2(x).relu(), 2)
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


@register("lenet-functional", min_image_size=12)
def lenet_functional(in_channels, image_size, num_classes, mean, std):
    """`lenet` in the PyTorch tutorial's functional style (F.relu, F.max_pool2d, torch.flatten in forward)."""
    return FunctionalLeNet(in_channels, image_size, num_classes, mean, std)
