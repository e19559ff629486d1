"""Inline backend: loads in the calling thread, when the planner asks. No pool, no read-ahead
benefit; the simplest backend, for tests, tools and debugging (`backend.kind = "inline"`)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from slipstream.data.backends.base import TokenSpan
from slipstream.data.sources.loader import SourceLoader


class Loaded:
    """A finished load."""

    __slots__ = ("tokens",)

    def __init__(self, tokens: list[np.ndarray]) -> None:
        self.tokens = tokens

    def result(self) -> list[np.ndarray]:
        return self.tokens


class InlineBackend:
    sends_spans = False  # nothing crosses a process boundary
    shares_docs = False

    def __init__(self, loaders: Sequence[SourceLoader]) -> None:
        self.loaders = list(loaders)
        self.names = [ldr.name for ldr in self.loaders]
        self.num_docs = [ldr.num_docs for ldr in self.loaders]
        self.num_bad = [ldr.num_bad for ldr in self.loaders]
        self.tokenizer = self.loaders[0].tokenizer
        self.num_loaded = [0] * len(self.loaders)  # documents tokenized per source
        self.busy_s = [0.0] * len(self.loaders)
        self.cpu_s = [0.0] * len(self.loaders)

    def submit(self, source: int, ids: list[int]) -> Loaded:
        self.num_loaded[source] += len(ids)
        t0, c0 = time.perf_counter(), time.thread_time()
        out = Loaded(self.loaders[source].get_many(ids))
        self.busy_s[source] += time.perf_counter() - t0
        self.cpu_s[source] += time.thread_time() - c0
        return out

    def submit_spans(self, source, ids, spans, shared=frozenset()) -> Loaded:
        """The documents, loaded now; with `spans`, each one's tokens [lo, hi) only."""
        whole = self.submit(source, ids).tokens
        if spans is None:
            return Loaded(whole)
        return Loaded([TokenSpan(lo, len(t), t[lo:hi])
                       for t, (lo, hi) in zip(whole, spans, strict=True)])  # fmt: skip

    def flush(self) -> None:
        """Nothing waits: loads run when submitted."""

    def upkeep(self, step: int, owner: bool) -> None:
        """A fixed loader per source: nothing to resize."""

    def replicas(self) -> None:
        return None

    def lengths(self) -> list[np.ndarray]:
        return [ldr.lengths() for ldr in self.loaders]

    def close(self) -> None:
        for ldr in self.loaders:
            ldr.close()
