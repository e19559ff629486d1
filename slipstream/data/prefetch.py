"""Prefetcher: a producer thread that runs a generator of steps `depth` items ahead of the
consumer. What the producer raises is handed to the consumer, raised at its next `get`; the
end of the generator is the consumer's StopIteration. Stopping waits for the thread: a step
is never half put."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator

_END = object()  # the producer's last item when its generator is done


class Prefetcher:
    def __init__(self, produce: Callable[[], Iterator], depth: int, name: str) -> None:
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self.depth = 0
        self._thread = threading.Thread(target=self._run, args=(produce,), name=name, daemon=True)
        self._thread.start()

    def get(self):
        """(the next item, seconds waited for it). StopIteration at the end; the producer's
        exception if it failed (the prefetcher is then finished)."""
        t0 = time.perf_counter()
        self.depth = self._queue.qsize()  # steps ready when asked (0: the consumer waits)
        item = self._queue.get()
        wait_s = time.perf_counter() - t0
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item, wait_s

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self, produce: Callable[[], Iterator]) -> None:
        try:
            for item in produce():
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer, raised at its next get
            self._queue.put(e)

    def _put(self, item) -> bool:
        """Wait for room, unless stopped (False)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False
