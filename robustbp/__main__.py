"""`python -m robustbp ...` is the `robustbp` command."""
import sys

from robustbp.cli import main

sys.exit(main())
