"""The backpropagation extensions, by name: `get("loss-ibp", beta=0.01, p=1)`, `available()`."""

from . import adversarial, ibp, jacobian, linbp, standard, tangent  # noqa: F401  (they register themselves)
from .base import (
    Method,
    Parameter,
    StepStats,
    available,
    bench_specs,
    cross_entropy_per_sample,
    get,
    parameter,
    parameter_help,
    parameters_of,
    register,
)
from .tangent import image_tangents

__all__ = [
    "Method",
    "Parameter",
    "StepStats",
    "available",
    "bench_specs",
    "cross_entropy_per_sample",
    "get",
    "image_tangents",
    "parameter",
    "parameter_help",
    "parameters_of",
    "register",
]
