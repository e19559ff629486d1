"""StepPlan: one step of the global stream as the planner laid it out: which token ranges of
which documents go in which row, which rows go to which data-parallel rank and micro-batch.
The same on every rank; a rank loads only the documents of its own rows."""

from __future__ import annotations

import numpy as np

from slipstream.data.packing import DocKey, Piece


class StepPlan:
    """One step of the whole job, as arrays.

    Pieces (tokens [start, start + length) of document `doc` of source `source`) are grouped
    by row: row i holds pieces `row_offsets[i]:row_offsets[i + 1]`. `assignment[r, m]` are the
    rows of micro-batch m of data-parallel rank r (sorted). `rows` and `stream` give the same as
    lists of `Piece` and of (source, doc), built on first use."""

    __slots__ = ("step", "piece_source", "piece_doc", "piece_start", "piece_length",
                 "row_offsets", "row_costs", "assignment", "docs_drawn", "stream_source",
                 "stream_doc", "state_before", "partial", "_rows", "_stream")  # fmt: skip

    def __init__(self, step, piece_source, piece_doc, piece_start, piece_length, row_offsets,
                 row_costs, assignment, docs_drawn, stream_source, stream_doc, state_before,
                 partial):  # fmt: skip
        self.step = step
        self.piece_source, self.piece_doc = piece_source, piece_doc
        self.piece_start, self.piece_length = piece_start, piece_length
        self.row_offsets = row_offsets
        self.row_costs: np.ndarray = row_costs
        self.assignment: np.ndarray = assignment  # [dp_rank, micro_batch, row in it]
        self.docs_drawn: np.ndarray = docs_drawn  # new documents started per source
        self.stream_source, self.stream_doc = stream_source, stream_doc  # carried one first
        self.state_before: dict = state_before  # the planner state that reproduces this step
        # Documents (`doc_keys`) this step holds only part of: the one carried in from the step
        # before and the one cut at its end (a neighbouring step, maybe another rank's, needs
        # them too).
        self.partial: np.ndarray = partial
        self._rows: list[list[Piece]] | None = None
        self._stream: list[DocKey] | None = None

    @property
    def num_rows(self) -> int:
        return len(self.row_offsets) - 1

    def row(self, i: int) -> list[Piece]:
        a, b = int(self.row_offsets[i]), int(self.row_offsets[i + 1])
        return [
            Piece(*t)
            for t in zip(
                self.piece_source[a:b].tolist(),
                self.piece_doc[a:b].tolist(),
                self.piece_start[a:b].tolist(),
                self.piece_length[a:b].tolist(),
            )  # fmt: skip
        ]

    @property
    def rows(self) -> list[list[Piece]]:
        if self._rows is None:
            self._rows = [self.row(i) for i in range(self.num_rows)]
        return self._rows

    @property
    def stream(self) -> list[DocKey]:
        """The documents this step takes, in stream order (the carried one first)."""
        if self._stream is None:
            self._stream = list(zip(self.stream_source.tolist(), self.stream_doc.tolist()))
        return self._stream

    def rank_rows(self, dp_rank: int) -> np.ndarray:
        """The rows of `dp_rank`, micro-batch by micro-batch."""
        return self.assignment[dp_rank].reshape(-1)

    def pieces_of(self, rows: np.ndarray) -> np.ndarray:
        """Indices of the pieces in `rows`."""
        a, b = self.row_offsets[rows], self.row_offsets[np.asarray(rows) + 1]
        n = b - a
        return np.repeat(a - np.cumsum(n) + n, n) + np.arange(n.sum())
