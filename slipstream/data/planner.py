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

import numpy as np

from slipstream.configfile import VERSION_KEY, check_version
from slipstream.data.balance import assign_rows, colocate_whole_rows
from slipstream.data.packing import Piece, doc_keys, pack_pieces
from slipstream.data.plan import StepPlan
from slipstream.data.plankernels import Lookahead, draw_docs
from slipstream.data.spec import DEFAULT_ATTENTION_COST, MixtureSpec

STATE_VERSION = 1
# State keys: the planner's state_dict is part of every checkpoint, so its names are fixed.
STEP, NUM_DRAWN, SOURCES, CARRY = "step", "num_drawn", "sources", "carry"
CURSOR, EPOCH, CREDIT = "cursor", "epoch", "credit"
SPLITS = ("train", "eval")


class _Cursor:
    """Where the stream stands: credits, per-source cursor and epoch."""

    __slots__ = ("credits", "cursors", "epochs", "num_drawn")

    def __init__(self, n: int) -> None:
        self.credits = np.zeros(n)  # float64: the same sums bit for bit on every machine
        self.cursors = [0] * n
        self.epochs = [0] * n
        self.num_drawn = 0


class Planner:
    """Plans the whole step for `dp_world_size` ranks from documents of one `split`
    (`train`, or the held-out `eval` documents). `lengths[s][d]` is the token count of
    document d of source s (all splits). native: None uses the C kernels when they build,
    False the Python twins (the same plans)."""

    def __init__(
        self,
        spec: MixtureSpec,
        lengths: Sequence[np.ndarray],
        *,
        dp_world_size: int = 1,
        split: str = "train",
        attention_cost: float | None = None,
        native: bool | None = None,
    ) -> None:
        if dp_world_size < 1:
            raise ValueError(f"dp_world_size: {dp_world_size} must be >= 1")
        if split not in SPLITS or (split == "eval" and spec.holdout_fraction == 0):
            raise ValueError(f"split: {split!r}; use 'train', or 'eval' with holdout_fraction > 0")
        self.spec = spec
        self.dp_world_size = dp_world_size
        self.native = native
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
        self._mean_len = np.array(  # to size the lookahead of draws
            [
                max(1.0, float(x[ids].mean())) if len(ids) else 1.0
                for x, ids in zip(self.lengths, self._ids)
            ]  # fmt: skip
        )
        self.by_tokens = spec.mix_by == "tokens"
        self.step = 0
        self.carry: Piece | None = None
        self._pos = _Cursor(len(self.names))
        self._perms: dict[tuple[int, int], np.ndarray] = {}  # (source, epoch) -> doc ids

    # -- the stream -------------------------------------------------------------------------
    def _perm(self, s: int, epoch: int) -> np.ndarray:
        """Source s's documents in epoch `epoch`'s order: a seeded permutation."""
        perm = self._perms.get((s, epoch))
        if perm is None:
            key = [self.spec.seed, zlib.crc32(self.names[s].encode()), epoch]
            perm = self._ids[s][np.random.default_rng(key).permutation(self.num_docs[s])]
            self._perms[(s, epoch)] = perm
            for old in [k for k in self._perms if k[0] == s and k[1] < self._pos.epochs[s]]:
                del self._perms[old]  # draws only move forward
        return perm

    def _upcoming(self, s: int, count: int) -> np.ndarray:
        """The next `count` documents of source s, across epochs."""
        epoch, cursor = self._pos.epochs[s], self._pos.cursors[s]
        if count > 0 and self.num_docs[s] == 0:
            raise ValueError(f"source {self.names[s]!r} has no documents to draw from")
        out = []
        while count > 0:
            part = self._perm(s, epoch)[cursor : cursor + count]
            out.append(part)
            count -= len(part)
            epoch, cursor = epoch + 1, 0
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def _lookahead(self, expected: np.ndarray, open_: np.ndarray) -> Lookahead:
        """Each open source's next documents, enough for `expected` draws with margin."""
        counts = np.where(open_, np.ceil(1.25 * expected + 4 * np.sqrt(expected)) + 8, 0)
        docs = [self._upcoming(s, int(c)) for s, c in enumerate(counts)]
        doc = np.concatenate(docs).astype(np.int64, copy=False)
        length = np.concatenate([x[d] for x, d in zip(self.lengths, docs)] or [np.zeros(0)]).astype(
            np.int64, copy=False
        )
        off = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum([len(d) for d in docs], out=off[1:])
        return Lookahead(length, doc, off, np.zeros(len(docs), dtype=np.int64))

    def _commit(self, ahead: Lookahead) -> None:
        """Move each source's cursor past the documents of `ahead` that were drawn."""
        pos = self._pos
        for s in np.flatnonzero(ahead.pos).tolist():
            epoch, cursor = divmod(pos.cursors[s] + int(ahead.pos[s]), self.num_docs[s])
            pos.epochs[s] += epoch
            pos.cursors[s] = cursor
        pos.num_drawn += int(ahead.pos.sum())

    def _draw(self, weights: np.ndarray, budget: int, used: int) -> tuple[np.ndarray, ...]:
        """Draw new documents until `budget` units are used: (sources, docs, lengths)."""
        spec, open_ = self.spec, weights > 0
        share = np.where(open_, weights, 0.0) / weights[open_].sum()
        # Expected draws per source: tokens split by weight (or documents by weight).
        tokens = max(0, budget - used) * (1 if spec.packing else spec.seq_len)
        if self.by_tokens:
            expected = tokens * share / self._mean_len
        else:
            expected = share * tokens / float((share * self._mean_len).sum())
        src, doc, length = [], [], []
        while True:
            ahead = self._lookahead(expected, open_)
            flat, used, short = draw_docs(
                self._pos.credits, weights, open_, ahead,
                by_tokens=self.by_tokens, packing=spec.packing, seq_len=spec.seq_len,
                budget=budget, used=used, native=self.native,
            )  # fmt: skip
            src.append(np.searchsorted(ahead.off, flat, side="right") - 1)
            doc.append(ahead.doc[flat])
            length.append(ahead.length[flat])
            self._commit(ahead)
            if short is None or used >= budget:
                break
            expected = expected.copy()  # a source ran out of lookahead: ask for more
            expected[short] = 2 * expected[short] + 64
        return tuple(np.concatenate(x).astype(np.int64, copy=False) for x in (src, doc, length))

    @property
    def rows_per_step(self) -> int:
        return self.spec.rows_per_step(self.dp_world_size)

    # -- one step ---------------------------------------------------------------------------
    def plan_step(self) -> StepPlan:
        spec = self.spec
        state = self.state_dict()
        carried = self.carry is not None
        src, doc, starts, take = self._take_step()
        row_of, p_src, p_doc, p_start, p_len = self._place(src, doc, starts, take)
        num_rows = self.rows_per_step
        row_offsets = np.zeros(num_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(row_of, minlength=num_rows), out=row_offsets[1:])
        lens = p_len.astype(np.float64)
        costs = spec.balance.linear_cost * np.bincount(
            row_of, weights=lens, minlength=num_rows
        ) + self.attention_cost * np.bincount(row_of, weights=lens * lens, minlength=num_rows)
        assignment = self._assign(costs, row_offsets, p_src, p_doc, p_len)
        fresh = src[1:] if carried else src
        cut = [(int(src[0]), int(doc[0]))] if carried else []
        if self.carry is not None:
            cut.append((self.carry.source, self.carry.doc))
        partial = np.unique(doc_keys(np.array([s for s, _ in cut], dtype=np.int64),
                                     np.array([d for _, d in cut], dtype=np.int64)))  # fmt: skip
        plan = StepPlan(
            self.step, p_src, p_doc, p_start, p_len, row_offsets, costs, assignment,
            np.bincount(fresh, minlength=len(self.names)), src, doc, state, partial,
        )  # fmt: skip
        self.step += 1
        return plan

    def _take_step(self) -> tuple[np.ndarray, ...]:
        """The step's documents in stream order, the carried remainder first: (sources, docs,
        first token, tokens taken). The last one is cut at the step's capacity and its rest
        carried into the next step."""
        spec, seq_len = self.spec, self.spec.seq_len
        weights = np.array(spec.weights_at(self.step), dtype=np.float64)
        # A unit is a token when packing (rows are filled to the token), else a row.
        budget = self.rows_per_step * (seq_len if spec.packing else 1)

        def units(n: np.ndarray) -> np.ndarray:
            return n if spec.packing else np.maximum(1, -(-n // seq_len))

        carry, used = self.carry, 0
        if carry is not None:
            used = int(units(np.int64(int(self.lengths[carry.source][carry.doc]) - carry.start)))
        src, doc, total = self._draw(weights, budget, used)
        starts = np.zeros(len(src), dtype=np.int64)
        if carry is not None:
            src, doc = np.r_[carry.source, src], np.r_[carry.doc, doc]
            total = np.r_[int(self.lengths[carry.source][carry.doc]), total]
            starts = np.r_[carry.start, starts]
        need = units(total - starts)
        over = int(need.sum()) - budget
        take = total - starts
        if over > 0:
            take[-1] = (need[-1] - over) * (1 if spec.packing else seq_len)
        cut = starts[-1] + take[-1] if len(src) else 0
        self.carry = (
            Piece(int(src[-1]), int(doc[-1]), int(cut), 0) if len(src) and cut < total[-1] else None
        )
        return src, doc, starts, take

    def _place(self, src, doc, starts, take) -> tuple[np.ndarray, ...]:
        """Pieces into rows: best fit when packing, else one piece per row (a long document
        over several rows). Returns (row, source, doc, start, length) of each part, by row."""
        num_rows, seq_len = self.rows_per_step, self.spec.seq_len
        if self.spec.packing:
            return pack_pieces(src, doc, starts, take, num_rows, seq_len, native=self.native)
        n = np.maximum(1, -(-take // seq_len))
        idx = np.repeat(np.arange(len(src)), n)
        k = np.arange(len(idx)) - np.repeat(np.cumsum(n) - n, n)
        p_start = starts[idx] + k * seq_len
        p_len = np.minimum(seq_len, starts[idx] + take[idx] - p_start)
        return np.arange(len(idx)), src[idx], doc[idx], p_start, p_len

    def _assign(self, costs, row_offsets, p_src, p_doc, p_len) -> np.ndarray:
        """Rows to ranks and micro-batches, balanced; then the rows that are one piece of one
        long document gathered on as few ranks as possible (no cost moves). Done at one rank
        too (between micro-batches), so N ranks x 1 micro-batch group rows as 1 rank x N
        micro-batches."""
        spec = self.spec
        assignment = assign_rows(
            costs,
            self.dp_world_size,
            spec.num_micro_batches,
            spec.micro_batch_size,
            spec.balance.method,
            seed=spec.seed * 1_000_003 + self.step,
            native=self.native,
        )
        single = np.flatnonzero(np.diff(row_offsets) == 1)
        first = row_offsets[single]
        whole = p_len[first] == spec.seq_len
        row_doc = np.full(len(costs), -1, dtype=np.int64)  # the document filling the row, keyed
        row_doc[single[whole]] = doc_keys(p_src[first[whole]], p_doc[first[whole]])
        return colocate_whole_rows(assignment, row_doc)

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
