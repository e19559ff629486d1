"""Stop signals: SIGINT / SIGTERM ask the run to end at the next step boundary, with a
checkpoint, so the saved state is always a whole step's; a second signal interrupts at once."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable


class StopSignals:
    def __init__(self, on_first: Callable[[], None] = lambda: None) -> None:
        self.requested = False
        self._on_first = on_first
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._on_first()

    def __enter__(self) -> StopSignals:
        # Signal handlers can only be set from the main thread (a trainer run in a thread,
        # as some tests and notebooks do, simply keeps the default handlers).
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
