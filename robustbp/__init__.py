"""robustbp: backpropagation extensions that train classifiers robust to small input changes.

The subpackages are attributes (`import robustbp; robustbp.methods.get(...)`), each imported on
first use, so `import robustbp` and the command line do not pay for the plotting library that
`robustbp.evaluate` loads.
"""
import importlib

__version__ = "0.1.0"

SUBPACKAGES = ("attacks", "data", "evaluate", "methods", "models", "studies", "training")


def __getattr__(name: str):
    if name in SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *SUBPACKAGES])
