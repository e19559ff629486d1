"""A transform that costs CPU work per document (the slow source of the Ray tests): a fixed
amount of work, not a fixed wall-clock time, so what it costs (and what the autoscaler
measures, in CPU seconds) does not depend on what else the machine is running."""

from __future__ import annotations

WORK = 40_000  # loop iterations per document: about 2 ms of CPU on the machines measured


def slow_identity(text: str) -> str:
    x = 0
    for i in range(WORK):
        x += i * i
    return text if x >= 0 else ""
