"""MixtureLoader: the per-rank client. An iterator of steps; each step is this rank's list of
micro-batches (dicts of tensors). Every rank plans the whole step from token counts alone (the
same plan everywhere) and loads only the documents of its own rows: a document is tokenized
by the rank whose rows hold it, so a job's data work does not grow with its ranks. A
background thread plans `prefetch_steps` ahead and keeps those steps' loads in flight, so the
training thread does not wait while loaders keep up. Run-time facts (this rank, the number of
ranks, the split, the resolved tokenizer) are arguments: the spec is never changed.

`state_dict()` is the planner state right after the last step handed out (a few counters), so
resuming yields exactly the steps an uninterrupted run would have, whatever was prefetched.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

import numpy as np
import torch

from slipstream.configfile import VERSION_KEY, check_version
from slipstream.data.backends import Backend, build_backend
from slipstream.data.backends.base import add_tokens, check_length
from slipstream.data.backends.group import GroupFetch, group_size
from slipstream.data.balance import imbalance, partition
from slipstream.data.batch import LABELS, build_micro_batch
from slipstream.data.packing import DocKey, doc_keys, token_runs, unpack_keys
from slipstream.data.planner import Planner, StepPlan
from slipstream.data.spec import MixtureSpec
from slipstream.topology import Topology

STATE_VERSION = 1
PLANNER = "planner"
_END = object()  # the producer's last item when `end_step` is reached


@dataclass(slots=True)
class _InFlight:
    """A document's load: its task and place in it, the tokens [lo, hi) it holds, and the
    last planned step that needs it."""

    task: object
    index: int
    lo: int
    hi: int
    last_step: int


@dataclass(slots=True)
class StepStats:
    """What one step held, for previews and metrics (whole step, all ranks)."""

    step: int
    docs_by_source: np.ndarray
    tokens_by_source: np.ndarray
    num_tokens: int
    num_slots: int  # rows x seq_len
    imbalance: float  # max/mean rank cost as assigned (`unbalanced_imbalance`: without balancing)
    max_rank_cost: float  # the costliest rank's cost as assigned: predicts the step's time
    wait_s: float = 0.0  # how long the consumer waited for this step
    replicas: list[int] | None = None  # ray: loader actors serving each source


@dataclass(slots=True)
class StepBatch:
    step: int
    micro_batches: list[dict[str, torch.Tensor]]
    stats: StepStats
    plan: StepPlan = field(repr=False)  # the whole step, all ranks
    state_after: dict = field(repr=False, default_factory=dict)

    @property
    def stream(self) -> list[tuple[int, int]]:
        """(source, doc) in stream order: the whole step, all ranks (built on first use)."""
        return self.plan.stream


class MixtureLoader:
    """This rank's steps of the mixture `spec`.

    dp_rank, dp_world_size: this rank and the number of data-parallel ranks sharing a step.
    split: `train`, or `eval` for the held-out documents (needs `spec.holdout_fraction`).
    tokenizer: overrides `spec.tokenizer` (e.g. a model's own tokenizer file).
    prefetch_steps: overrides `spec.backend.prefetch_steps`.
    end_step: plan no step at or past this index (a run's last step + 1): nothing is loaded
    that no step will take, and `next` past it raises StopIteration. None: endless.
    labels: `next` (labels are the next tokens) or `hf` (Hugging Face: the model shifts);
    see `batch.py`.
    attention_cost: the balance cost per squared document token, from the model being
    trained (`spec.balance.attention_cost` wins when set).
    topology: where this process stands in the job (the trainer's `Topology`); without it,
    one process per data-parallel rank, each alone on its node. Its data-parallel rank and
    size must be `dp_rank` and `dp_world_size` when both are given.
    """

    def __init__(
        self,
        spec: MixtureSpec,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        *,
        split: str = "train",
        tokenizer: str | None = None,
        prefetch_steps: int | None = None,
        labels: str = "next",
        attention_cost: float | None = None,
        load_all_rows: bool = False,
        end_step: int | None = None,
        topology: Topology | None = None,
    ) -> None:
        """load_all_rows: load every row of the step, not only this rank's (each rank then does
        the whole job's data work, as before the plan was shared; for comparisons only)."""
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank: {dp_rank} is outside [0, {dp_world_size})")
        if topology is None:
            topology = Topology.data_parallel(dp_rank, dp_world_size)
        elif (dp_rank, dp_world_size) not in ((0, 1), (topology.dp_rank, topology.dp_size)):
            raise ValueError(
                f"dp_rank {dp_rank} of {dp_world_size}: the topology says "
                f"{topology.dp_rank} of {topology.dp_size}; pass one or the other"
            )
        dp_rank, dp_world_size = topology.dp_rank, topology.dp_size
        self.topology = topology
        if labels not in LABELS:
            raise ValueError(f"labels: {labels!r}; use 'next' or 'hf'")
        self.spec = spec
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.labels = labels
        self.prefetch_steps = prefetch_steps or spec.backend.prefetch_steps
        self.backend: Backend = build_backend(spec, tokenizer, topology)
        self.tokenizer = self.backend.tokenizer
        # Ray: runs of tokens, not whole documents, cross to each rank (`token_runs`).
        self._sends_spans = getattr(self.backend, "sends_spans", False)
        self.load_all_rows = load_all_rows
        self.end_step = end_step
        self.split = split
        self.planner = Planner(
            spec,
            self.backend.lengths(),
            dp_world_size=dp_world_size,
            split=split,
            attention_cost=attention_cost,
        )
        self._state = self.planner.state_dict()
        self._group = self._group_fetch(load_all_rows)
        # Steps planned ahead with their loads in flight. Dealt round a group, a rank makes
        # one step in `size` for all: it plans `size` times further, so each step it makes
        # has as long to load as before, and every rank's loader threads stay busy.
        dealt = self._group is not None and self._group.deal
        self._window = self.prefetch_steps * (len(self._group.ranks) if dealt else 1)
        # Loads of documents that steps not yet built need (a document may have several: spans).
        self._inflight: dict[DocKey, list[_InFlight]] = {}
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _group_fetch(self, load_all_rows: bool) -> GroupFetch | None:
        """Ray: this machine's data-parallel ranks fetch each step together (`group.py`)."""
        size = group_size(self.spec.backend.machine_ranks, self.topology)
        if load_all_rows or size < 2 or not hasattr(self.backend, "submit_spans"):
            return None
        first = self.dp_rank // size * size
        ranks = list(range(first, min(first + size, self.dp_world_size)))
        tag = f"{self.backend.job}|{self.split}|{self.dp_world_size}"
        # Local: the makers' own loader threads do the work, so the steps are dealt round
        # the group; Ray: the actors do it, and whoever gets there first sends the calls.
        deal = not self._sends_spans
        readers = (self.topology.tp_size, self.topology.tp_rank)  # tensor-parallel peers
        return GroupFetch(self.backend, self.planner.lengths, ranks, self.dp_rank, tag,
                          readers=readers, deal=deal)  # fmt: skip

    # -- iteration --------------------------------------------------------------------------
    def __iter__(self) -> MixtureLoader:
        return self

    def __next__(self) -> StepBatch:
        if self._thread is None:
            self._start()
        assert self._queue is not None
        t0 = time.perf_counter()
        item = self._queue.get()
        wait_s = time.perf_counter() - t0
        if item is _END:
            self._thread = None
            raise StopIteration
        if isinstance(item, BaseException):
            # The planner may have stopped mid-step: rewind it to the last step handed out, so
            # a retry (or a checkpoint) neither loses nor repeats anything.
            self._thread = None
            self._inflight.clear()
            self.planner.load_state_dict(self._state)
            raise item
        item.stats.wait_s = wait_s
        self._state = item.state_after
        return item

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch_steps)
        self._thread = threading.Thread(
            target=self._produce, name="slipstream-planner", daemon=True
        )
        self._thread.start()

    def _produce(self) -> None:
        """Plans run `prefetch_steps` ahead (times the group's size when a machine's steps are
        dealt round its ranks), their loads in flight, up to `end_step`; the oldest is built
        when its loads are done. The planner state after each step travels with it."""
        assert self._queue is not None
        q = self._queue
        pending: deque = deque()
        try:
            while not self._stop.is_set():
                while len(pending) < self._window and not self._at_end():
                    self._maintain(self.planner.step)
                    plan = self.planner.plan_step()
                    pending.append((plan, self._load(plan), self.planner.state_dict()))
                if not pending:
                    self._put(q, _END)
                    return
                plan, needs, state_after = pending.popleft()
                item = self._build(plan, self._collect(plan, needs))
                item.state_after = state_after
                self._put(q, item)
        except BaseException as e:  # handed to the consumer, raised at its next step
            q.put(e)

    def _put(self, q: queue.Queue, item) -> None:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _at_end(self) -> bool:
        return self.end_step is not None and self.planner.step >= self.end_step

    def _maintain(self, step: int) -> None:
        """Ray: every `autoscale_every` planned steps the owner (rank 0) has the replicas sized
        for the schedule ahead; the other ranks take the new layout."""
        every = self.spec.backend.autoscale_every
        if not hasattr(self.backend, "autoscale") or not every or step % every:
            return
        if self.split != "train":  # eval restarts at step 0: it must not resize for step 0
            self.backend.refresh()
            return
        if self.topology.is_main:
            self.backend.autoscale(step)
        else:
            self.backend.refresh()

    def _load(self, plan: StepPlan) -> list[tuple[DocKey, _InFlight]]:
        """Submit the loads of this rank's documents in `plan` that no step in flight has
        asked for already (a document cut at a step boundary is needed by the next step too:
        it is loaded once), one load per source. Returns each document with the load that
        holds it.

        Where the backend takes spans (Ray), only the runs of tokens this rank's rows hold
        travel (`token_runs`): a long document cut across several ranks' rows is not sent whole to
        each."""
        if self._group is not None:  # Ray: the machine's group fetches the step once
            return self._group.submit(plan)
        rows = None if self.load_all_rows else plan.rank_rows(self.dp_rank)
        mine = slice(None) if rows is None else plan.pieces_of(rows)
        src, doc = plan.piece_source[mine], plan.piece_doc[mine]
        if self._sends_spans:
            packed, lo, hi = token_runs(plan, mine, self.planner.lengths)
        else:  # whole documents: every load holds [0, end)
            packed = np.unique(doc_keys(src, doc))  # sorted by (source, doc)
            lo = np.zeros(len(packed), dtype=np.int64)
            hi = np.full(len(packed), np.iinfo(np.int64).max, dtype=np.int64)
        keys = unpack_keys(packed)
        shared = self._shared_docs(plan, np.unique(packed))
        needs: list[tuple[DocKey, _InFlight] | None] = [None] * len(keys)
        new: dict[int, list[int]] = defaultdict(list)  # source -> indices into keys
        for i, key in enumerate(keys):
            held = self._inflight.get(key, ())
            entry = next((e for e in held if e.lo <= lo[i] and hi[i] <= e.hi), None)
            if entry is None:
                new[key[0]].append(i)
            else:
                entry.last_step = plan.step  # kept until this step is built
                needs[i] = (key, entry)
        # One load per source: a local pool splits it into a task per worker (and sends the
        # shared documents through the machine's store); Ray spreads it over the source's
        # replicas, where each extra request would cost every actor a call.
        for s in sorted(new):
            idx = new[s]
            ids = [keys[i][1] for i in idx]
            if not hasattr(self.backend, "submit_spans"):  # inline
                task = self.backend.submit(s, ids)
            else:
                spans = [(int(lo[i]), int(hi[i])) for i in idx] if self._sends_spans else None
                in_store = {keys[i][1] for i in idx if int(packed[i]) in shared}
                task = self.backend.submit_spans(s, ids, spans, shared=in_store)
            for j, i in enumerate(idx):
                entry = _InFlight(task, j, int(lo[i]), int(hi[i]), plan.step)
                self._inflight.setdefault(keys[i], []).append(entry)
                needs[i] = (keys[i], entry)
        if hasattr(self.backend, "flush"):  # Ray: the step's loads, one call per actor
            self.backend.flush()
        return needs  # type: ignore[return-value]

    def _shared_docs(self, plan: StepPlan, mine: np.ndarray) -> set[int]:
        """Of this rank's documents, those other ranks' rows hold too, when the backend can
        tokenize them once per machine (the local one); Ray already routes each document to
        one actor."""
        if self.load_all_rows or not hasattr(self.backend, "submit_shared"):
            return set()
        return shared_docs(plan, self.dp_rank, self.dp_world_size, mine)

    def _collect(
        self, plan: StepPlan, needs: list[tuple[DocKey, _InFlight]]
    ) -> dict[DocKey, np.ndarray]:
        if self._group is not None:
            return self._group.collect(needs)
        tokens, results = {}, {}
        for key, entry in needs:
            task = entry.task
            if id(task) not in results:
                results[id(task)] = task.result()
            t = results[id(task)][entry.index]
            expected = int(self.planner.lengths[key[0]][key[1]])
            check_length(self.spec.sources[key[0]].name, key[1], expected, len(t))
            add_tokens(tokens, key, t)  # several runs of one document join
        for key in list(self._inflight):  # drop what no step still to be built needs
            held = [e for e in self._inflight[key] if e.last_step > plan.step]
            if held:
                self._inflight[key] = held
            else:
                del self._inflight[key]
        return tokens

    def _build(self, plan: StepPlan, tokens: dict[DocKey, np.ndarray]) -> StepBatch:
        spec = self.spec
        pad = self.tokenizer.eos_id
        micro = [
            build_micro_batch([plan.row(i) for i in rows], tokens, spec.seq_len, pad, self.labels)
            for rows in plan.assignment[self.dp_rank].tolist()
        ]
        stats = step_stats(spec, plan, self.dp_world_size)
        if hasattr(self.backend, "replicas"):
            stats.replicas = self.backend.replicas()
        return StepBatch(plan.step, micro, stats, plan)

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {VERSION_KEY: STATE_VERSION, PLANNER: self._state}

    def load_state_dict(self, state: dict) -> None:
        check_version(state, STATE_VERSION, "loader state")
        self._halt()
        self.planner.load_state_dict(state[PLANNER])
        self._state = self.planner.state_dict()

    def _halt(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self._inflight.clear()

    def close(self) -> None:
        self._halt()
        if self._group is not None:
            self._group.close()
        self.backend.close()

    def __enter__(self) -> MixtureLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def step_stats(spec: MixtureSpec, plan: StepPlan, dp_world_size: int) -> StepStats:
    n = len(spec.sources)
    tokens = np.bincount(plan.piece_source, weights=plan.piece_length, minlength=n)
    tokens = tokens.astype(np.int64)
    rank_rows = plan.assignment.reshape(dp_world_size, -1)
    return StepStats(
        step=plan.step,
        docs_by_source=plan.docs_drawn,
        tokens_by_source=tokens,
        num_tokens=int(tokens.sum()),
        num_slots=plan.num_rows * spec.seq_len,
        imbalance=imbalance(plan.row_costs, rank_rows),
        max_rank_cost=float(plan.row_costs[rank_rows].sum(axis=1).max()),
    )


def unbalanced_imbalance(
    spec: MixtureSpec, plan: StepPlan, dp_world_size: int
) -> tuple[float, float]:
    """What a user gets without balancing, for comparisons (`slipstream data preview`): the
    max/mean rank cost with rows dealt in packing order, and in an order unrelated to cost.
    Computed on demand: every rank would otherwise pay two more partitions per step."""
    packing = partition(plan.row_costs, dp_world_size, spec.rows_per_rank, "none")
    random = partition(plan.row_costs, dp_world_size, spec.rows_per_rank, "random", plan.step)
    return imbalance(plan.row_costs, packing), imbalance(plan.row_costs, random)


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
