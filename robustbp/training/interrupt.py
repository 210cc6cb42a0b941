"""Ctrl-C during training: the first asks the loop to stop after the current step, a second stops at once."""
from __future__ import annotations

import signal
import sys
import threading


class StopRequest:
    """While entered, the first SIGINT sets `requested` (the loop then saves a checkpoint and
    returns); a second one raises KeyboardInterrupt. Only in the main thread, where Python
    delivers signals; the previous handler is put back on exit."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self.previous = None

    def __enter__(self) -> "StopRequest":
        if self.enabled:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nrobustbp: stopping after this step to save a checkpoint (Ctrl-C again to quit at once)", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self.previous if self.previous is not None else signal.default_int_handler)
