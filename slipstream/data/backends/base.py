"""The backend seam: where source loaders run. The planner reads `lengths()` (token counts
only); each rank's loader calls `submit(source, ids)` for the documents of its own rows and
later `.result()` on what it returns. Nothing else about a backend reaches the stream, so any
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

    num_loaded: list[int]
    """Documents submitted for loading per source (what this client asked tokenized)."""

    def submit(self, source: int, ids: list[int]) -> LoadTask:
        """Start loading documents `ids` of `source`."""
        ...

    def lengths(self) -> list[np.ndarray]:
        """Per source, the token count of every document (by source-global id): from the
        per-shard cache, built by the loaders on first use."""
        ...

    def close(self) -> None: ...
