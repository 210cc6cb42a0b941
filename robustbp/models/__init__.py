"""The papers' architectures by name (a registry like timm's).

    from robustbp import models
    models.available()        # ['ibp-cifar', 'ibp-mnist', ..., 'vgg16-bn']
    net = models.get("ibp-mnist", in_channels=1, image_size=28, num_classes=10,
                     mean=[0.286], std=[0.353], dropout=0.5)
    logits = net(images)      # images (N, 1, 28, 28) in [0, 1] → (N, 10)

Every model starts with `Normalize(mean, std)`, so it takes images in [0, 1]. Which input
sizes each model supports: `models.info(name).min_image_size` and the tables in
`convnets.py`, `mlp.py`, `resnet.py`. New models: decorate a builder with `@register(name)`;
the tests pick it up from `available()`.
"""
from . import convnets  # noqa: F401  (registers the models)
from . import mlp  # noqa: F401
from . import resnet  # noqa: F401
from .registry import ACTIVATIONS
from .registry import ModelInfo
from .registry import available
from .registry import get
from .registry import info
from .registry import register

__all__ = ["ACTIVATIONS", "ModelInfo", "available", "get", "info", "register"]
