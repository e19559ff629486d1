"""Planner: the global document stream, and each step's plan (which token ranges go in which
row, which rows go to which rank and micro-batch).

It owns all logical data state: the step, per-source cursors and epochs, the mixing credits
and the carried remainder of a document cut at a step boundary. That state is a few numbers,
so a checkpoint is tiny, and the stream it yields is a pure function of (spec, seed, step):
the same for any number of loader workers, pool kind or data-parallel world size.

Mixing is deterministic (smooth weighted round-robin): sources earn credit in proportion to
their current weights and the source with the most credit is drawn, which keeps realized
proportions within one document of target at every prefix. Credit is counted in documents or,
with `mix_by = "tokens"`, in tokens (earned once the drawn document's length is known). Which document comes next within a source is a
seeded permutation per epoch, so the content is shuffled. Weights may change at any step (by
schedule or at resume): cursors never move back, so nothing is lost or repeated.
"""

from __future__ import annotations

import bisect
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from slipstream.data.balance import partition, row_cost
from slipstream.data.readahead import ReadAhead
from slipstream.data.spec import MixtureSpec

STATE_VERSION = 1
DocKey = tuple[int, int]  # (source index, document index within the source)
SubmitFn = Callable[[int, list[int]], Any]  # (source, doc ids) -> a future of token arrays


@dataclass(slots=True, frozen=True)
class Piece:
    """Tokens [start, start + length) of document `doc` of source `source`."""

    source: int
    doc: int
    start: int
    length: int


@dataclass(slots=True)
class StepPlan:
    step: int
    rows: list[list[Piece]]
    row_costs: np.ndarray
    assignment: list[list[list[int]]]  # [dp_rank][micro_batch] -> row indices
    tokens: dict[DocKey, np.ndarray]  # every document this step touches
    docs_drawn: np.ndarray  # new documents started per source in this step
    stream: list[DocKey]  # documents this step takes, in stream order (carried one first)
    state_before: dict  # the planner state that reproduces this step


class _Cursor:
    """Where the stream stands: credits, per-source cursor and epoch."""

    __slots__ = ("credits", "cursors", "epochs", "num_drawn")

    def __init__(self, n: int) -> None:
        self.credits = [0.0] * n
        self.cursors = [0] * n
        self.epochs = [0] * n
        self.num_drawn = 0


class Planner:
    def __init__(self, spec: MixtureSpec, num_docs: list[int], submit: SubmitFn) -> None:
        self.spec = spec
        self.names = [s.name for s in spec.sources]
        self._ids = [split_ids(n, name, spec) for n, name in zip(num_docs, self.names)]
        self.num_docs = [len(ids) for ids in self._ids]  # documents in this split
        self.by_tokens = spec.mix_by == "tokens"
        self.read_ahead_steps = spec.backend.prefetch_steps
        self.num_workers = spec.backend.num_workers
        self._submit = submit
        self._ahead = ReadAhead(submit, self._doc_at, self.num_docs)
        self._tokens: dict[DocKey, np.ndarray] = {}  # this step's documents and the carried one
        self.step = 0
        self.carry: Piece | None = None
        self._pos = _Cursor(len(self.names))
        self._perms: dict[tuple[int, int], np.ndarray] = {}  # (source, epoch) -> doc ids
        self._mean_len = 512.0  # running estimate of tokens per document, for look-ahead
        self._step_draws: list[DocKey] = []

    # -- the stream -------------------------------------------------------------------------
    def _doc_at(self, s: int, epoch: int, cursor: int) -> int:
        perm = self._perms.get((s, epoch))
        if perm is None:
            key = [self.spec.seed, zlib.crc32(self.names[s].encode()), epoch]
            perm = self._ids[s][np.random.default_rng(key).permutation(self.num_docs[s])]
            self._perms[(s, epoch)] = perm
            # Read-ahead may run an epoch ahead of the draws: keep two epochs per source.
            self._perms.pop((s, epoch - 2), None)
        return int(perm[cursor])

    def _draw(self, pos: _Cursor, weights: list[float]) -> DocKey:
        if not self.by_tokens:  # credit first: the unit (one document) is known in advance
            self._credit(pos, weights, None, 1.0)
        s = max(range(len(weights)), key=lambda i: (weights[i] > 0, pos.credits[i]))
        if not self.by_tokens:
            pos.credits[s] -= 1.0
        doc = self._doc_at(s, pos.epochs[s], pos.cursors[s])
        pos.cursors[s] += 1
        if pos.cursors[s] == self.num_docs[s]:
            pos.cursors[s], pos.epochs[s] = 0, pos.epochs[s] + 1
        pos.num_drawn += 1
        return s, doc

    @staticmethod
    def _credit(pos: _Cursor, weights: list[float], source: int | None, amount: float) -> None:
        """Every source earns its weight's share of `amount`; the drawn one spends it all."""
        for i, w in enumerate(weights):
            pos.credits[i] += w * amount
        if source is not None:
            pos.credits[source] -= amount

    def _next_doc(self, weights: list[float]) -> DocKey:
        s, d = self._draw(self._pos, weights)
        self._tokens[(s, d)] = self._ahead.pop(s, d)
        if self.by_tokens:  # a document's tokens are known only once it is loaded
            self._credit(self._pos, weights, s, float(len(self._tokens[(s, d)])))
        self._step_draws.append((s, d))
        return s, d

    def _take(self, weights: list[float], max_len: int) -> Piece:
        """The next piece of at most `max_len` tokens: the carried remainder first."""
        if self.carry is not None:
            s, d, start = self.carry.source, self.carry.doc, self.carry.start
            if (s, d) not in self._tokens:  # carried over a resume: load it again
                self._tokens[(s, d)] = self._submit(s, [d]).result()[0]
        else:
            s, d = self._next_doc(weights)
            start = 0
            self._mean_len = 0.95 * self._mean_len + 0.05 * len(self._tokens[(s, d)])
        total = len(self._tokens[(s, d)])
        length = min(total - start, max_len)
        self.carry = Piece(s, d, start + length, 0) if start + length < total else None
        return Piece(s, d, start, length)

    def _read_ahead(self, weights: list[float]) -> None:
        """Keep about `read_ahead_steps` steps of each source's documents loading."""
        docs_per_step = self.spec.rows_per_step * self.spec.seq_len / self._mean_len
        for s, w in enumerate(weights):
            if w > 0:
                per_step = w * docs_per_step
                chunk = max(1, int(np.ceil(per_step / self.num_workers)))
                depth = int(np.ceil(per_step * self.read_ahead_steps)) + chunk
                self._ahead.top_up(s, depth, chunk)

    # -- one step ---------------------------------------------------------------------------
    def plan_step(self) -> StepPlan:
        spec = self.spec
        state = self.state_dict()
        weights = spec.weights_at(self.step)
        drawn_before = np.array(self._pos.cursors) + np.array(self._pos.epochs) * self.num_docs
        num_rows, seq_len = spec.rows_per_step, spec.seq_len
        stream = [] if self.carry is None else [(self.carry.source, self.carry.doc)]
        self._step_draws = stream
        self._read_ahead(weights)
        if spec.packing:
            pieces, budget = [], num_rows * seq_len
            while budget > 0:
                pieces.append(self._take(weights, budget))
                budget -= pieces[-1].length
            rows = pack_best_fit(pieces, num_rows, seq_len)
        else:
            rows = [[self._take(weights, seq_len)] for _ in range(num_rows)]
        drawn_after = np.array(self._pos.cursors) + np.array(self._pos.epochs) * self.num_docs
        keys = {(p.source, p.doc) for row in rows for p in row}
        tokens = {k: self._tokens[k] for k in keys}
        carried = None if self.carry is None else (self.carry.source, self.carry.doc)
        self._tokens = {} if carried is None else {carried: self._tokens[carried]}
        costs = np.array(
            [
                row_cost(
                    [p.length for p in r], spec.balance.linear_cost, spec.balance.attention_cost
                )
                for r in rows
            ]
        )
        assignment = assign_rows(
            costs,
            spec.dp_world_size,
            spec.num_micro_batches,
            spec.micro_batch_size,
            spec.balance.method,
        )
        plan = StepPlan(
            self.step, rows, costs, assignment, tokens, drawn_after - drawn_before, stream, state
        )
        self.step += 1
        return plan

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        pos = self._pos
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "num_drawn": pos.num_drawn,
            "sources": {
                n: {"cursor": pos.cursors[i], "epoch": pos.epochs[i], "credit": pos.credits[i]}
                for i, n in enumerate(self.names)
            },
            "carry": None
            if self.carry is None
            else [self.names[self.carry.source], self.carry.doc, self.carry.start],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"data state: version {state.get('version')} is not {STATE_VERSION}; "
                "this checkpoint was written by another Slipstream version"
            )
        pos = _Cursor(len(self.names))
        for i, name in enumerate(self.names):
            src = state["sources"].get(name)
            if src is None:
                continue  # a source added since the checkpoint starts at its beginning
            if src["cursor"] > self.num_docs[i]:
                raise ValueError(
                    f"data state: source {name!r} is at document {src['cursor']} but now has "
                    f"{self.num_docs[i]}; its files changed since the checkpoint"
                )
            pos.cursors[i], pos.epochs[i], pos.credits[i] = (
                src["cursor"],
                src["epoch"],
                float(src["credit"]),
            )
        pos.num_drawn = state["num_drawn"]
        self.carry = None
        if state["carry"] is not None:
            name, doc, start = state["carry"]
            if name in self.names:  # a removed source's half-document is dropped
                self.carry = Piece(self.names.index(name), int(doc), int(start), 0)
        self._pos, self.step = pos, int(state["step"])
        self._tokens = {}
        self._ahead.reset(pos.epochs, pos.cursors)


def split_ids(num_docs: int, name: str, spec: MixtureSpec) -> np.ndarray:
    """Document ids of `spec.split`: a fixed share of each source, chosen by a permutation
    keyed by the source's name only, so no seed or weight change moves a document across."""
    if spec.holdout_fraction == 0:
        return np.arange(num_docs)
    num_eval = max(1, round(spec.holdout_fraction * num_docs))
    if num_eval >= num_docs:
        raise ValueError(
            f"holdout_fraction: source {name!r} has {num_docs} document(s), too few to hold "
            f"out {spec.holdout_fraction:.0%}; lower it or add documents"
        )
    perm = np.random.default_rng([zlib.crc32(name.encode()), num_docs]).permutation(num_docs)
    return np.sort(perm[:num_eval] if spec.split == "eval" else perm[num_eval:])


def pack_best_fit(pieces: list[Piece], num_rows: int, seq_len: int) -> list[list[Piece]]:
    """Best-fit decreasing into `num_rows` rows of `seq_len`: pieces longer than a row are cut
    into row-sized chunks; a piece that fits no row's free space is split across rows (this
    only happens near the end, as the step's token count equals the rows' capacity)."""
    chunks = [
        Piece(p.source, p.doc, p.start + o, min(seq_len, p.length - o))
        for p in pieces
        for o in range(0, p.length, seq_len)
    ]
    chunks.sort(key=lambda p: -p.length)
    free = [(seq_len, r) for r in range(num_rows)]  # sorted (free tokens, row); full rows leave
    rows: list[list[Piece]] = [[] for _ in range(num_rows)]
    for p in chunks:
        while p.length > 0:
            if not free:
                raise AssertionError("pack_best_fit: more tokens than rows can hold")
            i = bisect.bisect_left(free, (p.length, -1))  # the tightest row it fits in
            if i == len(free):  # fits nowhere whole: fill the emptiest row, carry on
                i = len(free) - 1
            room, r = free.pop(i)
            take = min(room, p.length)
            rows[r].append(Piece(p.source, p.doc, p.start, take))
            if room > take:
                bisect.insort(free, (room - take, r))
            p = Piece(p.source, p.doc, p.start + take, p.length - take)
    return rows


def assign_rows(
    costs: np.ndarray, dp_world_size: int, num_micro: int, micro_batch_size: int, method: str
) -> list[list[list[int]]]:
    """Rows to ranks (equal counts, smallest max cost), then each rank's rows to micro-batches."""
    out = []
    for rank_rows in partition(costs, dp_world_size, num_micro * micro_batch_size, method):
        rank_rows = np.asarray(rank_rows)
        micro = partition(costs[rank_rows], num_micro, micro_batch_size, method)
        out.append([sorted(int(rank_rows[j]) for j in m) for m in micro])
    return out
