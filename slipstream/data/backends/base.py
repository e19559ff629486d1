"""The backend seam: where source loaders run. The planner reads `lengths()` (token counts
only); each rank's loader calls `submit_spans(source, ids, spans, shared)` for the documents
of its own rows (or a machine's group of ranks for all of theirs, `machine_group.py`), `flush()` once
the step's loads are submitted, and later `.result()` on what each returned. Nothing else
about a backend reaches the stream, so any backend (inline, a local pool, Ray actors) yields
the same batches. `Backend` is the whole contract the loader uses; every backend implements
all of it, trivially where a part does not apply.

`spans`: tokens [lo, hi) of each document, as `TokenSpan`s (None: whole documents). Where the
tokens cross a process boundary per request (Ray: `sends_spans`), every rank asks for spans: a
long document's pieces land in several ranks' rows, and without spans each of those ranks
would receive the whole document. `shared`: documents other ranks of the machine need too,
tokenized once per machine where the backend can (local: `shares_docs`)."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Protocol

import numpy as np

from slipstream.data.sources.tokenizers import Tokenizer


class TokenSpan:
    """Tokens [start, start + len(data)) of a document of `length` tokens, indexed like the
    whole document (slices with absolute offsets; `len()` is the whole document's)."""

    __slots__ = ("start", "length", "data")

    def __init__(self, start: int, length: int, data: np.ndarray) -> None:
        self.start, self.length, self.data = start, length, data

    def __len__(self) -> int:
        return self.length

    def _bounds(self, key: slice) -> tuple[int, int]:
        lo = key.start or 0
        return lo, max(lo, self.length if key.stop is None else min(key.stop, self.length))

    def holds(self, key: slice) -> bool:
        lo, hi = self._bounds(key)
        return key.step is None and self.start <= lo and hi <= self.start + len(self.data)

    def __getitem__(self, key: slice) -> np.ndarray:
        if not self.holds(key):
            lo, hi = self._bounds(key)
            raise IndexError(
                f"tokens [{lo}, {hi}) of a document of {self.length}: only "
                f"[{self.start}, {self.start + len(self.data)}) were loaded"
            )
        lo, hi = self._bounds(key)
        return self.data[lo - self.start : hi - self.start]


class TokenSpans:
    """Several loaded spans of one document (a rank's rows hold parts of it with gaps
    between), indexed like the whole document: a slice is served by the span holding it."""

    __slots__ = ("spans",)

    def __init__(self, spans: list[TokenSpan]) -> None:
        self.spans = spans

    def __len__(self) -> int:
        return len(self.spans[0])

    def __getitem__(self, key: slice) -> np.ndarray:
        for span in self.spans:
            if span.holds(key):
                return span[key]
        return self.spans[0][key]  # raises, naming what was loaded


def add_tokens(tokens: dict, key, t) -> None:
    """tokens[key] = t; a second run of the same document joins the first (`TokenSpans`)."""
    got = tokens.get(key)
    tokens[key] = t if got is None else TokenSpans([*getattr(got, "spans", [got]), t])


def check_length(source: str, doc: int, expected: int, got: int) -> None:
    """A loaded document must have the token count the planner planned with."""
    if got != expected:
        raise RuntimeError(
            f"source {source!r}, document {doc}: the token-count cache says {expected} tokens, "
            f"the loader gave {got}; its files or tokenizer changed under a running job. "
            "Restart the job (the cache is rebuilt when files change)"
        )


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
    names: list[str]
    """The sources' names, in the spec's order (for messages)."""

    num_loaded: list[int]
    """Documents submitted for loading per source (what this client asked tokenized)."""
    busy_s: list[float]
    """Seconds loaders worked on this client's loads, per source (wall clock of the worker;
    ray: the CPU seconds of the job's actors, every client's loads together)."""
    cpu_s: list[float]
    """CPU seconds of the same work: well under busy_s, the loads wait on I/O or a sleep."""

    sends_spans: bool
    """Tokens cross a process boundary per request: ask for the runs a rank's rows hold."""
    shares_docs: bool
    """Documents in `shared` are tokenized once per machine (worth computing them)."""

    def submit(self, source: int, ids: list[int]) -> LoadTask:
        """Start loading documents `ids` of `source` (whole)."""
        ...

    def submit_spans(
        self,
        source: int,
        ids: list[int],
        spans: list[tuple[int, int]] | None,
        shared: frozenset[int] | set[int] = frozenset(),
    ) -> LoadTask:
        """Start loading tokens [lo, hi) of each document (`TokenSpan`s), or whole documents
        when `spans` is None."""
        ...

    def flush(self) -> None:
        """The step's loads are submitted: send what waits to be sent."""
        ...

    def upkeep(self, step: int, owner: bool) -> None:
        """Every `backend.autoscale_every` planned steps: the owner (the job's rank 0, on its
        training stream) resizes replicas for the schedule ahead of `step`; the others take
        the new layout."""
        ...

    def replicas(self) -> list[int] | None:
        """Loader replicas serving each source, where the backend scales them (else None)."""
        ...

    def lengths(self) -> list[np.ndarray]:
        """Per source, the token count of every document (by source-global id): from the
        per-shard cache, built by the loaders on first use."""
        ...

    def close(self) -> None: ...


@contextlib.contextmanager
def shard_bar(total: int, what: str = "counting tokens per shard (cached after the first time)"):
    """A progress bar on a terminal's stderr for work over `total` shards, shown only when it
    lasts (over a second; a cached count never shows it); yields `advance()`."""
    if not sys.stderr.isatty() or total < 2:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    columns = (TextColumn(what), BarColumn(), MofNCompleteColumn())
    bar = Progress(*columns, console=Console(stderr=True), transient=True)
    task, start, shown = bar.add_task(what, total=total), time.monotonic(), [False]

    def advance() -> None:
        bar.advance(task)
        if not shown[0] and time.monotonic() - start > 1.0:
            shown[0] = True
            bar.start()

    try:
        yield advance
    finally:
        bar.stop()
