"""The package's names: `import robustbp` gives every subpackage as an attribute, without cycles."""
from __future__ import annotations

import subprocess
import sys

import pytest

import robustbp

# In a fresh interpreter: `import robustbp` alone loads no subpackage (not even torch); then each
# subpackage is imported first, with every robustbp module forgotten before, so an import cycle
# in any order that a user's first import can start shows up as an ImportError.
FRESH_IMPORTS = """
import importlib, sys
import robustbp
assert "torch" not in sys.modules
for name in robustbp.SUBPACKAGES:
    for module in [m for m in sys.modules if m == "robustbp" or m.startswith("robustbp.")]:
        del sys.modules[module]
    importlib.import_module("robustbp." + name)
    import robustbp
    assert all(getattr(robustbp, other).__name__ == "robustbp." + other for other in robustbp.SUBPACKAGES)
print("ok")
"""


def test_every_subpackage_imports_first_and_is_an_attribute():
    result = subprocess.run([sys.executable, "-c", FRESH_IMPORTS], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    assert set(robustbp.SUBPACKAGES) <= set(dir(robustbp))
    with pytest.raises(AttributeError, match="no attribute 'trainer'"):
        robustbp.trainer

