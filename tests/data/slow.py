"""A transform that costs CPU time per document (the slow source of the Ray tests)."""

from __future__ import annotations

import time


def slow_identity(text: str) -> str:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.002:  # 2 ms of work per document
        pass
    return text
