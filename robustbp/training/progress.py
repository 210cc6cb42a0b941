"""What a run prints on stderr: what it trains, a progress bar per epoch, one line per epoch."""
from __future__ import annotations

import sys
from typing import Any


class Progress:
    """Prints only when `enabled` (the CLI's --quiet turns it off)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr)

    def bar(self, epoch: int, epochs: int, steps: int, done: int):
        """The epoch's bar, starting at `done` of `steps`."""
        from tqdm import tqdm

        return tqdm(total=steps, initial=done, desc=f"epoch {epoch}/{epochs}", leave=False,
                    disable=not self.enabled, dynamic_ncols=True, file=sys.stderr)


def describe(config, train_images: int, val_images: int, out, resumed_after: str | None, processes: int = 1) -> str:
    """One line: model, data, method, epochs, processes and precision, run folder, and where a
    resumed run starts."""
    params = ", ".join(f"{k}={v}" for k, v in config.method_params.items())
    val = f", {val_images} validation" if val_images else ""
    where = f" -> {out}" if out is not None else ""
    start = f" (resuming after {resumed_after})" if resumed_after else ""
    parallel = f", {processes} processes of {config.batch_size // processes} images a step" if processes > 1 else ""
    precision = ", bf16 autocast" if getattr(config, "amp", "none") == "bf16" else ""
    return (f"training {config.model} on {config.dataset} ({train_images} images{val}) with {config.method}"
            f"{f' ({params})' if params else ''}, {config.epochs} epochs{parallel}{precision}{where}{start}")


def bar_text(sums: dict[str, float]) -> str:
    """The bar's running numbers: mean loss, mean penalty and clean-batch accuracy of the epoch so far."""
    samples = max(sums["samples"], 1)
    accuracy = f" acc={100 * sums['correct'] / sums['seen']:.1f}%" if sums["seen"] else ""
    return f"loss={sums['loss'] / samples:.4f} pen={sums['reg_loss'] / samples:.4g}{accuracy}"


def format_epoch(record: dict[str, Any], epochs: int) -> str:
    def pct(value):
        return "-" if value is None else f"{value:.2f}%"

    val = f"  val {pct(record['val_error'])}" if record.get("val_error") is not None else ""
    return (
        f"epoch {record['epoch']}/{epochs}  loss {record['loss']:.4f}  penalty {record['penalty']:.4g}  "
        f"train {pct(record['train_error'])}{val}  test {pct(record['test_error'])}  "
        f"lr {record['lr']:.3g}  {record['seconds']:.1f} s"
    )
