"""The backend seam: where source loaders run. The planner calls `submit(source, ids)` and
later `.result()` on what it returns; nothing else about a backend reaches the stream, so any
backend (inline, a local pool, Ray actors) yields the same batches."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from slipstream.data.sources.tokenizers import Tokenizer


class LoadTask(Protocol):
    def result(self) -> list[np.ndarray]:
        """The token arrays of the submitted documents, in the order asked (blocks)."""
        ...


class Backend(Protocol):
    num_docs: list[int]
    """Documents per source (all splits)."""
    num_bad: list[int]
    """Corrupt records skipped per source."""
    tokenizer: Tokenizer

    def submit(self, source: int, ids: list[int]) -> LoadTask:
        """Start loading documents `ids` of `source`."""
        ...

    def close(self) -> None: ...
