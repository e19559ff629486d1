"""Data-parallel ranks on one machine fetch each step once, together.

Alone, every rank loads its own rows each step, in pieces that shrink as the ranks grow. On
Ray each actor then serves as many small requests per step as there are ranks, and both sides
pay Ray's fixed cost per call; locally each rank's loader threads read and tokenize in
smaller batches, decode the same parquet row groups as the others, and tokenize again a
document cut at a step boundary that another rank built the step before. Either way the
job's data CPU per step grows with its ranks. Instead, one rank of a group of consecutive
ranks takes the step's lock file and loads the runs of tokens of every rank of the group at
once, then publishes each rank's runs as a file in shared memory. The others wait on the
lock and read their file (and remove it: each is read once).

Which rank makes a step: on Ray the first to reach it (it only sends one call per actor; the
actors do the work). Locally the maker's own loader threads do the work, so the steps are
dealt round the group (step N to its rank N mod size) and each rank plans that many times
further ahead, so that every rank's threads stay busy and each step has as long to load as
before. A rank that needs a step nobody has started makes it itself.

Nothing depends on the group being right: every rank plans the same step, files are named by
a fingerprint of the plan and the rank, and a rank that finds no file after the lock (its
maker died, or sits on another machine) fetches for the group itself: the same tokens. A lock
is released by the OS when its holder dies.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from slipstream.data.backends.base import TokenSpan, add_tokens, check_length
from slipstream.data.packing import DocKey, token_runs, unpack_keys
from slipstream.data.sources.shared import MIN_FREE_BYTES, SharedDocs, lock, try_lock, unlock
from slipstream.topology import Topology

SWEEP_EVERY_S = 60.0


def group_size(configured: int, topology: Topology) -> int:
    """Consecutive data-parallel ranks per machine: `configured`, else the data-parallel ranks
    whose processes share this node (`Topology.dp_ranks_per_node`)."""
    if configured:
        return min(configured, topology.dp_size)
    return topology.dp_ranks_per_node


def plan_fingerprint(plan) -> str:
    h = hashlib.blake2b(digest_size=12)
    for a in (plan.piece_source, plan.piece_doc, plan.piece_start, plan.piece_length,
              plan.assignment):  # fmt: skip
        h.update(np.ascontiguousarray(a).tobytes())
    return f"{plan.step}-{h.hexdigest()}"


class _Step:
    """One step's fetch as this rank sees it: read (its file is there or will be), or make
    (it holds the lock and the group's loads are in flight)."""

    __slots__ = ("plan", "name", "lock", "runs", "loads", "done")

    def __init__(self, plan, name: str, lock=None) -> None:
        self.plan, self.name, self.lock = plan, name, lock
        self.runs = self.loads = self.done = None


class GroupFetch:
    """Runs of tokens of this rank's rows, fetched once per step by its machine's group.

    backend: a span-capable backend (`submit_spans`, `flush`); lengths: the planner's token
    counts; ranks: the group's data-parallel ranks (this one included); tag: names the job and
    split, so that two streams never meet in the store; deal: make only the steps dealt to
    this rank (step mod group size), and those nobody started. Each rank's file has a hard
    link per process that takes that rank's data (its tensor-parallel peers); each reads and
    removes its own, so the file goes with its last reader. A step dealt here is published
    by a thread of its own as soon as its loads are done, not when this rank gets to it (the
    local backend's tasks may be waited on from any thread)."""

    def __init__(
        self, backend, lengths, ranks: list[int], rank: int, tag: str, *,
        readers: tuple[int, int] = (1, 0), root=None, deal: bool = False,
    ) -> None:  # fmt: skip
        self.backend, self.lengths, self.ranks, self.rank = backend, lengths, ranks, rank
        self.deal, self.index = deal, ranks.index(rank)
        self._publisher: ThreadPoolExecutor | None = None
        self.store = SharedDocs(Path(root) if root else None)
        self.tag = hashlib.sha1(tag.encode()).hexdigest()[:12]
        self._swept = -float("inf")
        self.readers, self.reader = readers
        self.steps_made = 0  # steps this rank fetched for the group (tests, benchmarks)
        self.recent_made: deque[int] = deque(maxlen=64)  # which: the last ones

    def _lock_path(self, name: str) -> Path:
        return self.store.root / f"step-{self.tag}-{name}.lock"

    def _path(self, name: str, rank: int, reader: int | None = None) -> Path:
        k = self.reader if reader is None else reader
        return self.store.root / f"step-{self.tag}-{name}-r{rank}-{k}.bin"

    def submit(self, plan) -> _Step:
        """Start this step: make it for the group (loads in flight) unless its file is there
        or another rank of the group holds the step's lock."""
        now = time.monotonic()
        if now - self._swept >= SWEEP_EVERY_S:  # leftovers of ranks that died
            self.store.sweep()
            self._swept = now
        name = plan_fingerprint(plan)
        if self.deal and plan.step % len(self.ranks) != self.index:
            return _Step(plan, name)  # another's: read it, or make it if nobody started it
        if self._path(name, self.rank).exists():
            return _Step(plan, name)
        lock = try_lock(self._lock_path(name))
        if lock is None:
            return _Step(plan, name)
        if self._path(name, self.rank).exists():  # published between the look and the lock
            self._release(name, lock)
            return _Step(plan, name)
        step = self._make(_Step(plan, name, lock))
        if self.deal:  # dealt steps are made far ahead: publish each as soon as it is loaded
            if self._publisher is None:
                self._publisher = ThreadPoolExecutor(1, thread_name_prefix="slipstream-group")
            step.done = self._publisher.submit(self._publish, step)
        return step

    def _release(self, name: str, held) -> None:
        """Unlock a step that is published (or failed): its lock file goes too. The files are
        the truth, the lock only keeps two makers apart: a rank still waiting on it holds it
        open and then finds its file; a later one opens a fresh lock and finds its file."""
        with contextlib.suppress(OSError):
            os.unlink(self._lock_path(name))
        unlock(held)

    def _make(self, step: _Step) -> _Step:
        plan = step.plan
        step.runs = {
            r: token_runs(plan, plan.pieces_of(plan.rank_rows(r)), self.lengths) for r in self.ranks
        }
        by_source: dict[int, list[tuple[int, int, int]]] = {}
        for packed, lo, hi in step.runs.values():
            for (s, d), a, b in zip(unpack_keys(packed), lo.tolist(), hi.tolist(), strict=True):
                by_source.setdefault(s, []).append((d, a, b))
        # Documents cut at a step boundary: the neighbouring step's maker needs them too.
        partial: dict[int, set[int]] = {}
        for s, d in unpack_keys(plan.partial):
            partial.setdefault(s, set()).add(d)
        step.loads = {}
        for s, items in by_source.items():
            items = list(dict.fromkeys(items))  # a run two ranks need travels once
            load = self.backend.submit_spans(s, [d for d, _, _ in items],
                                             [(a, b) for _, a, b in items],
                                             shared=partial.get(s, frozenset()))  # fmt: skip
            step.loads[s] = (items, load)
        self.backend.flush()
        self.steps_made += 1
        self.recent_made.append(plan.step)
        return step

    def collect(self, step: _Step) -> dict[DocKey, object]:
        """This rank's tokens of the step, by document: `TokenSpan`s (or `TokenSpans`)."""
        if step.done is not None:  # made here, dealt: published by the publisher thread
            return step.done.result()
        if step.lock is not None:  # made here (Ray): published now, on this thread, which
            return self._publish(step)  # alone calls into the backend
        got = self._read(step.name)
        if got is not None:
            return got
        held = lock(self._lock_path(step.name))  # the maker's
        got = self._read(step.name)
        if got is not None:
            self._release(step.name, held)
            return got
        step.lock = held  # its maker left no file (it died, or is on another machine)
        return self._publish(self._make(step))

    def _publish(self, step: _Step) -> dict[DocKey, object]:
        try:
            tokens: dict[tuple[int, int, int, int], np.ndarray] = {}
            for s, (items, load) in step.loads.items():
                for (d, a, b), t in zip(items, load.result(), strict=True):
                    check_length(self.backend.names[s], d, int(self.lengths[s][d]), len(t))
                    tokens[(s, d, a, b)] = t.data
            mine = None
            for r, (packed, lo, hi) in step.runs.items():
                keys = [(s, d, a, b) for (s, d), a, b in zip(unpack_keys(packed), lo.tolist(),
                                                             hi.tolist())]  # fmt: skip
                data = [tokens[k] for k in keys]
                readers = [k for k in range(self.readers) if (r, k) != (self.rank, self.reader)]
                if readers:
                    self._write([self._path(step.name, r, k) for k in readers], keys, data)
                if r == self.rank:
                    mine = self._spans(keys, data)
            return mine or {}
        finally:
            self._release(step.name, step.lock)
            step.lock = None

    def _write(self, paths: list[Path], keys: list, data: list[np.ndarray]) -> None:
        """Raw, to be read in one call: the run count n; n x (source, doc, lo, hi); the
        tokens (int32) of every run, concatenated (a run's length is hi - lo). One file,
        a name (hard link) per reader. Nothing is written when the store is short of space
        (a container's small /dev/shm): its readers then find no file and load the step
        themselves, the same tokens."""
        head = np.array([len(keys), *(x for k in keys for x in k)], dtype=np.int64)
        size = head.nbytes + 4 * sum(len(t) for t in data)
        if shutil.disk_usage(self.store.root).free < MIN_FREE_BYTES + size:
            return
        tmp = paths[0].with_name(f"{paths[0].name}.{os.getpid()}.tmp")
        links = [p.with_name(f"{p.name}.{os.getpid()}.tmp") for p in paths[1:]]
        try:
            with open(tmp, "wb") as f:
                f.write(head.tobytes())
                for t in data:
                    f.write(np.ascontiguousarray(t, dtype=np.int32).tobytes())
            for link, path in zip(links, paths[1:], strict=True):
                os.link(tmp, link)
                os.replace(link, path)
            os.replace(tmp, paths[0])  # whole or absent
        except OSError:  # full after all: leave nothing half-written
            for p in [tmp, *links]:
                p.unlink(missing_ok=True)

    def _read(self, name: str) -> dict[DocKey, object] | None:
        path = self._path(name, self.rank)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        path.unlink(missing_ok=True)  # read once, by its rank
        n = int(np.frombuffer(raw, dtype=np.int64, count=1)[0])
        head = np.frombuffer(raw, dtype=np.int64, count=1 + 4 * n)[1:].reshape(n, 4)
        flat = np.frombuffer(raw, dtype=np.int32, offset=8 * (1 + 4 * n))
        ends = np.cumsum(head[:, 3] - head[:, 2]).tolist()
        starts = [0, *ends[:-1]]
        keys = [tuple(k) for k in head.tolist()]
        return self._spans(keys, [flat[a:b] for a, b in zip(starts, ends, strict=True)])

    def _spans(self, keys: list, data: list[np.ndarray]) -> dict[DocKey, object]:
        out: dict[DocKey, object] = {}
        for (s, d, a, _), t in zip(keys, data, strict=True):
            add_tokens(out, (s, d), TokenSpan(a, int(self.lengths[s][d]), t))
        return out

    def reset(self) -> None:
        """Nothing to forget: each step is fetched by its fingerprint."""

    def close(self) -> None:
        """Publish the steps made here (other ranks may wait on them), then remove this
        rank's files of steps it read ahead of and will not take."""
        if self._publisher is not None:
            self._publisher.shutdown(wait=True)
            self._publisher = None
        for path in self.store.root.glob(f"step-{self.tag}-*-r{self.rank}-{self.reader}.bin"):
            path.unlink(missing_ok=True)
