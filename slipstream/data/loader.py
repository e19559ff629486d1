"""MixtureLoader: the per-rank client. An iterator of steps; each step is this rank's list of
micro-batches (dicts of tensors). Every rank plans the whole step from token counts alone (the
same plan everywhere) and loads only the documents of its own rows: a document is tokenized
by the rank whose rows hold it, so a job's data work does not grow with its ranks (alone:
`fetch.py`; with the machine's other ranks: `backends/machine_group.py`). A background thread
(`prefetch.py`) plans `prefetch_steps` ahead and keeps those steps' loads in flight, so the
training thread does not wait while loaders keep up. Run-time facts (this rank, the number of
ranks, the split, the resolved tokenizer) are arguments: the spec is never changed.

`state_dict()` is the planner state right after the last step handed out (a few counters), so
resuming yields exactly the steps an uninterrupted run would have, whatever was prefetched.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from slipstream.configfile import VERSION_KEY, check_version
from slipstream.data.backends import Backend, build_backend
from slipstream.data.backends.machine_group import GroupFetch, group_size
from slipstream.data.balance import imbalance, partition
from slipstream.data.batch import LABELS, build_micro_batch
from slipstream.data.fetch import RankFetch, shared_docs
from slipstream.data.packing import DocKey
from slipstream.data.planner import Planner, StepPlan
from slipstream.data.prefetch import Prefetcher
from slipstream.data.spec import MixtureSpec
from slipstream.topology import Topology

STATE_VERSION = 1
PLANNER = "planner"
__all__ = ["MixtureLoader", "StepBatch", "StepStats", "shared_docs", "step_stats"]


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
    queue_depth: int = 0  # steps ready ahead of the consumer when it asked for this one
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
        self._fetch = self._group or RankFetch(
            self.backend, self.planner.lengths, dp_rank, dp_world_size, load_all_rows
        )
        # Steps planned ahead with their loads in flight. Dealt round a group, a rank makes
        # one step in `size` for all: it plans `size` times further, so each step it makes
        # has as long to load as before, and every rank's loader threads stay busy.
        dealt = self._group is not None and self._group.deal
        self._window = self.prefetch_steps * (len(self._group.ranks) if dealt else 1)
        self._prefetch: Prefetcher | None = None

    def _group_fetch(self, load_all_rows: bool) -> GroupFetch | None:
        """This machine's data-parallel ranks fetch each step together (`machine_group.py`)."""
        size = group_size(self.spec.backend.machine_ranks, self.topology)
        if load_all_rows or size < 2:
            return None
        first = self.dp_rank // size * size
        ranks = list(range(first, min(first + size, self.dp_world_size)))
        # The group's first rank too: two groups on one machine (nodes simulated on one host)
        # never contend for one step's lock.
        tag = f"{self.backend.job}|{self.split}|{self.dp_world_size}|{first}"
        # Local: the makers' own loader threads do the work, so the steps are dealt round
        # the group; Ray: the actors do it, and whoever gets there first sends the calls.
        deal = not self.backend.sends_spans
        readers = (self.topology.tp_size, self.topology.tp_rank)  # tensor-parallel peers
        return GroupFetch(self.backend, self.planner.lengths, ranks, self.dp_rank, tag,
                          readers=readers, deal=deal)  # fmt: skip

    @property
    def machine_group(self) -> list[int]:
        """The data-parallel ranks that fetch each step together with this one (itself
        alone when there is no group)."""
        return list(self._group.ranks) if self._group is not None else [self.dp_rank]

    # -- iteration --------------------------------------------------------------------------
    def __iter__(self) -> MixtureLoader:
        return self

    def __next__(self) -> StepBatch:
        if self._prefetch is None:
            self._prefetch = Prefetcher(self._steps, self.prefetch_steps, "slipstream-planner")
        try:
            item, wait_s = self._prefetch.get()
        except StopIteration:
            self._prefetch = None
            raise
        except BaseException:
            # The planner may have stopped mid-step: rewind it to the last step handed out, so
            # a retry (or a checkpoint) neither loses nor repeats anything.
            self._prefetch = None
            self._fetch.reset()
            self.planner.load_state_dict(self._state)
            raise
        item.stats.wait_s = wait_s
        item.stats.queue_depth = self._prefetch.depth
        self._state = item.state_after
        return item

    def _steps(self):
        """Plans run `prefetch_steps` ahead (times the group's size when a machine's steps are
        dealt round its ranks), their loads in flight, up to `end_step`; the oldest is built
        when its loads are done. The planner state after each step travels with it. Runs on
        the prefetch thread."""
        pending: deque = deque()
        while True:
            while len(pending) < self._window and not self._at_end():
                self._upkeep(self.planner.step)
                plan = self.planner.plan_step()
                pending.append((plan, self._fetch.submit(plan), self.planner.state_dict()))
            if not pending:
                return
            plan, handle, state_after = pending.popleft()
            item = self._build(plan, self._fetch.collect(handle))
            item.state_after = state_after
            yield item

    def _at_end(self) -> bool:
        return self.end_step is not None and self.planner.step >= self.end_step

    def _upkeep(self, step: int) -> None:
        """Every `autoscale_every` planned steps, the backend's upkeep: the job's rank 0 owns
        the resizing on its training stream (eval restarts at step 0: it must not resize for
        step 0)."""
        every = self.spec.backend.autoscale_every
        if every and not step % every:
            self.backend.upkeep(step, owner=self.topology.is_main and self.split == "train")

    def _build(self, plan: StepPlan, tokens: dict[DocKey, np.ndarray]) -> StepBatch:
        spec = self.spec
        pad = self.tokenizer.eos_id
        micro = [
            build_micro_batch([plan.row(i) for i in rows], tokens, spec.seq_len, pad, self.labels)
            for rows in plan.assignment[self.dp_rank].tolist()
        ]
        stats = step_stats(spec, plan, self.dp_world_size)
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
        if self._prefetch is not None:
            self._prefetch.stop()
            self._prefetch = None
        self._fetch.reset()

    def close(self) -> None:
        self._halt()
        self._fetch.close()
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
