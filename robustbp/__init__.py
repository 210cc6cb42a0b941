"""robustbp: backpropagation extensions that train classifiers robust to small input changes."""

__version__ = "0.1.0"
