"""Planner: the global document stream, and each step's plan (which token ranges go in which
row, which rows go to which rank and micro-batch).

It plans from metadata only: the token count of every document (`lengths`, from the per-shard
cache), never the tokens. Planning a step is cheap, so every rank computes the same plan and
then loads only the documents of its own rows: the data work of a job does not grow with its
number of ranks.

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

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from slipstream.configfile import VERSION_KEY, check_version
from slipstream.data.balance import assign_rows, colocate_whole_rows, row_cost
from slipstream.data.packing import DocKey, Piece, pack_best_fit
from slipstream.data.spec import DEFAULT_ATTENTION_COST, MixtureSpec

STATE_VERSION = 1
# State keys: the planner's state_dict is part of every checkpoint, so its names are fixed.
STEP, NUM_DRAWN, SOURCES, CARRY = "step", "num_drawn", "sources", "carry"
CURSOR, EPOCH, CREDIT = "cursor", "epoch", "credit"
SPLITS = ("train", "eval")


@dataclass(slots=True)
class StepPlan:
    step: int
    rows: list[list[Piece]]
    row_costs: np.ndarray
    assignment: list[list[list[int]]]  # [dp_rank][micro_batch] -> row indices
    docs_drawn: np.ndarray  # new documents started per source in this step
    stream: list[DocKey]  # documents this step takes, in stream order (carried one first)
    state_before: dict  # the planner state that reproduces this step


class _Cursor:
    """Where the stream stands: credits, per-source cursor and epoch."""

    __slots__ = ("credits", "cursors", "epochs", "num_drawn")

    def __init__(self, n: int) -> None:
        self.credits = np.zeros(n)  # float64, as Python floats: the same sums bit for bit
        self.cursors = [0] * n
        self.epochs = [0] * n
        self.num_drawn = 0


def advance(epoch: int, cursor: int, num_docs: int) -> tuple[int, int]:
    """The position after (epoch, cursor) in a source of `num_docs`: the next epoch starts
    when the cursor reaches the end."""
    cursor += 1
    return (epoch + 1, 0) if cursor == num_docs else (epoch, cursor)


class Planner:
    """Plans the whole step for `dp_world_size` ranks from documents of one `split`
    (`train`, or the held-out `eval` documents). `lengths[s][d]` is the token count of
    document d of source s (all splits)."""

    def __init__(
        self,
        spec: MixtureSpec,
        lengths: Sequence[np.ndarray],
        *,
        dp_world_size: int = 1,
        split: str = "train",
        attention_cost: float | None = None,
    ) -> None:
        if dp_world_size < 1:
            raise ValueError(f"dp_world_size: {dp_world_size} must be >= 1")
        if split not in SPLITS or (split == "eval" and spec.holdout_fraction == 0):
            raise ValueError(f"split: {split!r}; use 'train', or 'eval' with holdout_fraction > 0")
        self.spec = spec
        self.dp_world_size = dp_world_size
        # The spec's value wins; then the caller's (the model's); then GPT-2 small's.
        self.attention_cost = next(
            c
            for c in (spec.balance.attention_cost, attention_cost, DEFAULT_ATTENTION_COST)
            if c is not None
        )
        self.names = [s.name for s in spec.sources]
        self.lengths = [np.asarray(x) for x in lengths]
        self._ids = [
            split_ids(len(x), name, spec, split) for x, name in zip(self.lengths, self.names)
        ]
        self.num_docs = [len(ids) for ids in self._ids]  # documents in this split
        self.by_tokens = spec.mix_by == "tokens"
        self.step = 0
        self.carry: Piece | None = None
        self._pos = _Cursor(len(self.names))
        self._perms: dict[tuple[int, int], np.ndarray] = {}  # (source, epoch) -> doc ids
        self._step_draws: list[DocKey] = []
        self._closed = np.zeros(len(self.names))

    # -- the stream -------------------------------------------------------------------------
    def _doc_at(self, s: int, epoch: int, cursor: int) -> int:
        perm = self._perms.get((s, epoch))
        if perm is None:
            key = [self.spec.seed, zlib.crc32(self.names[s].encode()), epoch]
            perm = self._ids[s][np.random.default_rng(key).permutation(self.num_docs[s])]
            self._perms[(s, epoch)] = perm
            self._perms.pop((s, epoch - 1), None)  # draws only move forward
        return int(perm[cursor])

    def _draw(self, pos: _Cursor, weights: np.ndarray) -> DocKey:
        if not self.by_tokens:  # credit first: the unit (one document) is known in advance
            self._credit(pos, weights, None, 1.0)
        # The source with the most credit among those with weight (the first, on a tie).
        s = int(np.argmax(pos.credits + self._closed))
        if not self.by_tokens:
            pos.credits[s] -= 1.0
        doc = self._doc_at(s, pos.epochs[s], pos.cursors[s])
        pos.epochs[s], pos.cursors[s] = advance(pos.epochs[s], pos.cursors[s], self.num_docs[s])
        pos.num_drawn += 1
        return s, doc

    @staticmethod
    def _credit(pos: _Cursor, weights: np.ndarray, source: int | None, amount: float) -> None:
        """Every source earns its weight's share of `amount`; the drawn one spends it all."""
        pos.credits += weights * amount if amount != 1.0 else weights
        if source is not None:
            pos.credits[source] -= amount

    def _next_doc(self, weights: np.ndarray) -> DocKey:
        s, d = self._draw(self._pos, weights)
        if self.by_tokens:  # credit in tokens, once the drawn document's length is known
            self._credit(self._pos, weights, s, float(self.lengths[s][d]))
        self._step_draws.append((s, d))
        return s, d

    def _take(self, weights: np.ndarray, max_len: int) -> Piece:
        """The next piece of at most `max_len` tokens: the carried remainder first."""
        if self.carry is not None:
            s, d, start = self.carry.source, self.carry.doc, self.carry.start
        else:
            (s, d), start = self._next_doc(weights), 0
        total = int(self.lengths[s][d])
        length = min(total - start, max_len)
        self.carry = Piece(s, d, start + length, 0) if start + length < total else None
        return Piece(s, d, start, length)

    @property
    def rows_per_step(self) -> int:
        return self.spec.rows_per_step(self.dp_world_size)

    # -- one step ---------------------------------------------------------------------------
    def plan_step(self) -> StepPlan:
        spec = self.spec
        state = self.state_dict()
        weights = np.array(spec.weights_at(self.step), dtype=np.float64)
        self._closed = np.where(weights > 0, 0.0, -np.inf)  # weight 0: never drawn
        drawn_before = np.array(self._pos.cursors) + np.array(self._pos.epochs) * self.num_docs
        num_rows, seq_len = self.rows_per_step, spec.seq_len
        stream = [] if self.carry is None else [(self.carry.source, self.carry.doc)]
        self._step_draws = stream
        if spec.packing:
            pieces, budget = [], num_rows * seq_len
            while budget > 0:
                pieces.append(self._take(weights, budget))
                budget -= pieces[-1].length
            rows = pack_best_fit(pieces, num_rows, seq_len)
        else:
            rows = [[self._take(weights, seq_len)] for _ in range(num_rows)]
        drawn_after = np.array(self._pos.cursors) + np.array(self._pos.epochs) * self.num_docs
        costs = np.array(
            [
                row_cost([p.length for p in r], spec.balance.linear_cost, self.attention_cost)
                for r in rows
            ]
        )
        assignment = assign_rows(
            costs,
            self.dp_world_size,
            spec.num_micro_batches,
            spec.micro_batch_size,
            spec.balance.method,
            seed=spec.seed * 1_000_003 + self.step,
        )
        # Fewer ranks load each long document; no cost moves. Done at one rank too (between
        # micro-batches), so N ranks x 1 micro-batch group rows as 1 rank x N micro-batches.
        whole = [(r[0].source, r[0].doc) if len(r) == 1 and r[0].length == seq_len else None
                 for r in rows]  # fmt: skip
        assignment = colocate_whole_rows(assignment, whole)
        plan = StepPlan(
            self.step, rows, costs, assignment, drawn_after - drawn_before, stream, state
        )
        self.step += 1
        return plan

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        pos = self._pos
        return {
            VERSION_KEY: STATE_VERSION,
            STEP: self.step,
            NUM_DRAWN: pos.num_drawn,
            SOURCES: {
                n: {CURSOR: pos.cursors[i], EPOCH: pos.epochs[i], CREDIT: float(pos.credits[i])}
                for i, n in enumerate(self.names)
            },
            CARRY: None
            if self.carry is None
            else [self.names[self.carry.source], self.carry.doc, self.carry.start],
        }

    def load_state_dict(self, state: dict) -> None:
        check_version(state, STATE_VERSION, "data state")
        pos = _Cursor(len(self.names))
        for i, name in enumerate(self.names):
            src = state[SOURCES].get(name)
            if src is None:
                continue  # a source added since the checkpoint starts at its beginning
            if src[CURSOR] > self.num_docs[i]:
                raise ValueError(
                    f"data state: source {name!r} is at document {src[CURSOR]} but now has "
                    f"{self.num_docs[i]}; its files changed since the checkpoint"
                )
            pos.cursors[i], pos.epochs[i], pos.credits[i] = src[CURSOR], src[EPOCH], src[CREDIT]
        pos.num_drawn = state[NUM_DRAWN]
        self.carry = None
        if state[CARRY] is not None:
            name, doc, start = state[CARRY]
            if name in self.names:  # a removed source's half-document is dropped
                self.carry = Piece(self.names.index(name), int(doc), int(start), 0)
        self._pos, self.step = pos, int(state[STEP])


def split_ids(num_docs: int, name: str, spec: MixtureSpec, split: str) -> np.ndarray:
    """Document ids of `split`: a fixed share of each source, chosen by a permutation
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
    return np.sort(perm[:num_eval] if split == "eval" else perm[num_eval:])
