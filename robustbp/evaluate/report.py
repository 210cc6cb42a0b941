"""Plain-text tables and atomic writes of JSON and PNG files.

A file is written to a temporary name in the same folder and renamed over the target, so an
interrupted run leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from robustbp.io import write_atomic, write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def format_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A title line and columns padded to their widest cell; floats are printed as given by the caller."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in enumerate(zip(row, widths)))

    rule = "-" * len(line(cells[0]))
    return "\n".join([title, rule, line(cells[0]), rule, *(line(row) for row in cells[1:]), rule])


def percent(value: float | None) -> str:
    """0.1234 -> '12.3'; None or nan -> 'n/a'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.1f}"


def json_ready(value):
    """Tuples to lists, non-finite floats to None (strict JSON has no nan or inf)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data: dict) -> None:
    text = json.dumps(json_ready(data), indent=2, allow_nan=False) + "\n"
    write_text(path, text)


def new_figure(n_panels: int = 1, width_per_panel: float = 4.5, height: float = 3.6) -> tuple[Figure, list]:
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend change) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_per_panel * n_panels, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(1, n_panels, i + 1) for i in range(n_panels)]
    return figure, axes


def write_png(path: Path, figure: Figure) -> None:
    write_atomic(path, lambda handle: figure.savefig(handle, format="png", dpi=110))
