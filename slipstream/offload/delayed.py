"""The delayed parameter update (DPU, ZeRO-Offload): the host step of step k runs in a
background thread during step k + 1's forward and backward, so the gradient of step k + 1 is
taken one update behind. The kernel is called through ctypes, which releases the GIL, so it
runs beside the training thread; collectives stay on the calling thread."""

from __future__ import annotations

import threading
from collections.abc import Callable


class DelayedUpdate:
    def __init__(self, enabled: bool, start: int) -> None:
        """start: ordinary steps before the delay begins (the paper's warm-up)."""
        self.enabled, self.start = enabled, start
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def active(self, num_steps: int) -> bool:
        """Whether the step after `num_steps` finished steps is delayed."""
        return self.enabled and num_steps >= self.start

    @property
    def pending(self) -> bool:
        return self._thread is not None

    def launch(self, host_step: Callable[[], None]) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(host_step,), name="slipstream-host-adam", daemon=True
        )
        self._thread.start()

    def _run(self, host_step: Callable[[], None]) -> None:
        try:
            host_step()
        except BaseException as e:  # raised on the training thread at the next join
            self._error = e

    def join(self) -> bool:
        """Wait for the step in flight; True if there was one (its weights are ready to
        write back). Raises what it raised."""
        if self._thread is None:
            return False
        self._thread.join()
        self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return True
