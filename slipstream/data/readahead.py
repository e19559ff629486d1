"""ReadAhead: keeps each source's next documents loading before the planner asks for them.

Which documents a source yields, and in what order, is fixed by the seeded per-epoch
permutation; only *when* a source is drawn depends on the weights. So each source's upcoming
documents can be requested early, in batches, to a depth that follows the source's weight:
the planner then finds them loaded, and the loaders never idle while it plans. Read-ahead
changes when documents load, never which ones the stream takes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

SubmitFn = Callable[[int, list[int]], Any]  # (source, doc ids) -> a task; .result() = tokens
DocAtFn = Callable[[int, int, int], int]  # (source, epoch, cursor) -> doc id


def advance(epoch: int, cursor: int, num_docs: int) -> tuple[int, int]:
    """The position after (epoch, cursor) in a source of `num_docs`: the next epoch starts
    when the cursor reaches the end. The planner's draws and the read-ahead both step so."""
    cursor += 1
    return (epoch + 1, 0) if cursor == num_docs else (epoch, cursor)


class ReadAhead:
    def __init__(self, submit: SubmitFn, doc_at: DocAtFn, num_docs: list[int]) -> None:
        self._submit = submit
        self._doc_at = doc_at
        self._num_docs = num_docs
        self._queues: list[deque] = [deque() for _ in num_docs]
        self._next: list[tuple[int, int]] = [(0, 0)] * len(num_docs)

    def reset(self, epochs: list[int], cursors: list[int]) -> None:
        """Forget what was requested; the next request for source s starts at its cursor."""
        self._queues = [deque() for _ in self._num_docs]
        self._next = list(zip(epochs, cursors, strict=True))

    def top_up(self, s: int, depth: int, chunk: int) -> None:
        """Request source s's next documents, `chunk` per task, until `depth` are in flight."""
        q = self._queues[s]
        while len(q) < depth:
            epoch, cursor = self._next[s]
            ids = []
            for _ in range(chunk):
                ids.append(self._doc_at(s, epoch, cursor))
                epoch, cursor = advance(epoch, cursor, self._num_docs[s])
            self._next[s] = (epoch, cursor)
            future = self._submit(s, ids)
            q.extend((d, future, j) for j, d in enumerate(ids))

    def pop(self, s: int, doc: int) -> np.ndarray:
        """Tokens of source s's next document, which must be `doc`."""
        if not self._queues[s]:
            self.top_up(s, 1, 1)
        d, future, j = self._queues[s].popleft()
        assert d == doc, f"read-ahead of source {s} diverged from the stream ({d} != {doc})"
        return future.result()[j]
