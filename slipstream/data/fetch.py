"""RankFetch: the loads of one rank's documents of each planned step, alone (a machine's ranks
fetching together is `backends/machine_group.py`, with the same `submit` / `collect`). A document cut
at a step boundary is needed by the next step too: a load in flight that holds the tokens
asked for is shared, not issued again. One load per source and step: a local pool splits it
into a task per worker (and sends the shared documents through the machine's store); Ray
spreads it over the source's replicas, where each extra request would cost every actor a call.

Where the backend `sends_spans` (Ray), only the runs of tokens this rank's rows hold travel
(`token_runs`): a long document cut across several ranks' rows is not sent whole to each."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from slipstream.data.backends.base import Backend, add_tokens, check_length
from slipstream.data.packing import DocKey, doc_keys, token_runs, unpack_keys
from slipstream.data.planner import StepPlan


@dataclass(slots=True)
class _InFlight:
    """A document's load: its task and place in it, the tokens [lo, hi) it holds, and the
    last planned step that needs it."""

    task: object
    index: int
    lo: int
    hi: int
    last_step: int


class RankFetch:
    def __init__(
        self,
        backend: Backend,
        lengths: list[np.ndarray],
        dp_rank: int,
        dp_world_size: int,
        load_all_rows: bool = False,
    ) -> None:
        """load_all_rows: every row of the step, not only this rank's (comparisons only)."""
        self.backend, self.lengths = backend, lengths
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.load_all_rows = load_all_rows
        # Loads of documents that steps not yet built need (a document may have several: spans).
        self._inflight: dict[DocKey, list[_InFlight]] = {}

    def submit(self, plan: StepPlan) -> tuple[StepPlan, list[tuple[DocKey, _InFlight]]]:
        """Submit the loads of this rank's documents in `plan` that no step in flight has
        asked for already. Returns the handle `collect` takes."""
        rows = None if self.load_all_rows else plan.rank_rows(self.dp_rank)
        mine = slice(None) if rows is None else plan.pieces_of(rows)
        src, doc = plan.piece_source[mine], plan.piece_doc[mine]
        if self.backend.sends_spans:
            packed, lo, hi = token_runs(plan, mine, self.lengths)
        else:  # whole documents: every load holds [0, end)
            packed = np.unique(doc_keys(src, doc))  # sorted by (source, doc)
            lo = np.zeros(len(packed), dtype=np.int64)
            hi = np.full(len(packed), np.iinfo(np.int64).max, dtype=np.int64)
        keys = unpack_keys(packed)
        shared = self._shared_docs(plan, np.unique(packed))
        needs: list = [None] * len(keys)
        new: dict[int, list[int]] = defaultdict(list)  # source -> indices into keys
        for i, key in enumerate(keys):
            held = self._inflight.get(key, ())
            entry = next((e for e in held if e.lo <= lo[i] and hi[i] <= e.hi), None)
            if entry is None:
                new[key[0]].append(i)
            else:
                entry.last_step = plan.step  # kept until this step is built
                needs[i] = (key, entry)
        for s in sorted(new):
            idx = new[s]
            ids = [keys[i][1] for i in idx]
            spans = [(int(lo[i]), int(hi[i])) for i in idx] if self.backend.sends_spans else None
            in_store = {keys[i][1] for i in idx if int(packed[i]) in shared}
            task = self.backend.submit_spans(s, ids, spans, shared=in_store)
            for j, i in enumerate(idx):
                entry = _InFlight(task, j, int(lo[i]), int(hi[i]), plan.step)
                self._inflight.setdefault(keys[i], []).append(entry)
                needs[i] = (keys[i], entry)
        self.backend.flush()  # Ray: the step's loads, one call per actor
        return plan, needs

    def _shared_docs(self, plan: StepPlan, mine: np.ndarray) -> set[int]:
        """Of this rank's documents, those other ranks' rows hold too, when the backend can
        tokenize them once per machine (the local one); Ray already routes each document to
        one actor."""
        if self.load_all_rows or not self.backend.shares_docs:
            return set()
        return shared_docs(plan, self.dp_rank, self.dp_world_size, mine)

    def collect(self, handle) -> dict[DocKey, np.ndarray]:
        """The step's tokens by document (waits for its loads)."""
        plan, needs = handle
        tokens, results = {}, {}
        for key, entry in needs:
            task = entry.task
            if id(task) not in results:
                results[id(task)] = task.result()
            t = results[id(task)][entry.index]
            expected = int(self.lengths[key[0]][key[1]])
            check_length(self.backend.names[key[0]], key[1], expected, len(t))
            add_tokens(tokens, key, t)  # several runs of one document join
        for key in list(self._inflight):  # drop what no step still to be built needs
            held = [e for e in self._inflight[key] if e.last_step > plan.step]
            if held:
                self._inflight[key] = held
            else:
                del self._inflight[key]
        return tokens

    def reset(self) -> None:
        """Forget the loads in flight (the planner was rewound)."""
        self._inflight.clear()

    def close(self) -> None:
        self.reset()


def shared_docs(plan: StepPlan, dp_rank: int, dp_world_size: int, mine: np.ndarray) -> set[int]:
    """Of `mine` (this rank's documents, as `doc_keys`), those that other ranks' rows in
    `plan` hold too, or that a neighbouring step holds part of (another rank may build it:
    a rank alone keeps a document cut at a step boundary for the next step itself)."""
    if dp_world_size == 1:
        return set()
    partial = set(np.intersect1d(plan.partial, mine).tolist())
    rank_of_row = np.empty(plan.num_rows, dtype=np.int64)
    rank_of_row[plan.assignment.reshape(dp_world_size, -1)] = np.arange(dp_world_size)[:, None]
    packed = doc_keys(plan.piece_source, plan.piece_doc)
    hits = np.flatnonzero(np.isin(packed, mine))  # pieces of this rank's documents
    row = np.searchsorted(plan.row_offsets, hits, side="right") - 1
    return partial | set(packed[hits[rank_of_row[row] != dp_rank]].tolist())
