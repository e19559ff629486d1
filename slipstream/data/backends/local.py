"""Local backend: source loaders in a thread pool or a process pool inside this process.

A task loads a batch of one source's documents, so its call overhead is spread over many of
them; the planner's read-ahead keeps tasks of every source in flight. Workers
build their own SourceLoaders (file handles are not shared between threads or processes).
A task whose worker process died is issued again on a fresh pool: loaders hold no logical
state, so the retry returns the very same tokens.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing as mp
import threading
import time
from concurrent.futures import (
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    as_completed,
)
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from slipstream.data.backends import lean_spawn
from slipstream.data.backends.base import TokenSpan, shard_bar
from slipstream.data.sources.loader import SourceLoader, build_source_loaders
from slipstream.data.sources.shared import SharedDocs, source_key
from slipstream.data.sources.tokenizers import one_thread_tokenizer
from slipstream.data.spec import MixtureSpec

_local = threading.local()  # per thread (or per process): {(spec, tokenizer): [SourceLoader]}
MAX_RETRIES = 3
SWEEP_EVERY_S = 60.0


def _loaders(spec_dict: dict, tokenizer: str) -> list[SourceLoader]:
    key = repr((spec_dict, tokenizer))
    cache = getattr(_local, "loaders", None)
    if cache is None:
        cache = _local.loaders = {}
    if key not in cache:
        cache[key] = build_source_loaders(MixtureSpec.from_dict(spec_dict), tokenizer)
    return cache[key]


Timed = tuple[list[np.ndarray], float, float]
"""A task's documents, and its worker's wall and CPU seconds on them (`Backend.busy_s`)."""


def _load_task(spec_dict: dict, tokenizer: str, source: int, ids: list[int]) -> Timed:
    t0, c0 = time.perf_counter(), time.thread_time()
    out = _loaders(spec_dict, tokenizer)[source].get_many(ids)
    return out, time.perf_counter() - t0, time.thread_time() - c0


def _shared_task(
    spec_dict: dict, tokenizer: str, source: int, ids: list[int], key: str, root: str
) -> Timed:
    """Documents other ranks need too: tokenized once per machine (sources/shared.py)."""
    t0, c0 = time.perf_counter(), time.thread_time()
    stores = getattr(_local, "shared", None)
    if stores is None:
        stores = _local.shared = {}
    if root not in stores:
        stores[root] = SharedDocs(Path(root))
    loader, shared = _loaders(spec_dict, tokenizer)[source], stores[root]
    out = shared.get_many(
        [f"{key}-{d}" for d in ids], lambda idx: loader.get_many([ids[i] for i in idx])
    )
    return out, time.perf_counter() - t0, time.thread_time() - c0


def _lengths_task(spec_dict: dict, tokenizer: str, source: int, shard: int) -> np.ndarray:
    return _loaders(spec_dict, tokenizer)[source].shard_lengths(shard)


class _Task:
    """A submitted load that, if its worker process dies, is issued again on a fresh pool."""

    def __init__(self, backend: LocalBackend, source: int, ids: list[int], fn, extra=()) -> None:
        self.backend, self.source, self.ids, self.fn, self.extra = backend, source, ids, fn, extra
        self.pool, self.future = backend._run(source, ids, fn, extra)
        self.counted = False

    def result(self) -> list[np.ndarray]:
        for attempt in range(MAX_RETRIES + 1):
            try:
                out, wall, cpu = self.future.result()
                if not self.counted:  # each task's work once, however often it is asked
                    self.counted = True
                    self.backend.busy_s[self.source] += wall
                    self.backend.cpu_s[self.source] += cpu
                return out
            except BrokenProcessPool:
                if attempt == MAX_RETRIES:
                    raise
                self.backend._replace_broken(self.pool)
                self.pool, self.future = self.backend._run(
                    self.source, self.ids, self.fn, self.extra
                )
        raise AssertionError("unreachable")


class _SpanLoad:
    """Documents loaded whole in tasks, handed out as the spans asked for."""

    def __init__(self, tasks, ids: list[int], spans: list[tuple[int, int]] | None) -> None:
        self.tasks, self.ids, self.spans = tasks, ids, spans

    def result(self) -> list:
        whole = {}
        for chunk, task in self.tasks:
            whole.update(zip(chunk, task.result(), strict=True))
        if self.spans is None:
            return [whole[d] for d in self.ids]
        return [TokenSpan(lo, len(whole[d]), whole[d][lo:hi])
                for d, (lo, hi) in zip(self.ids, self.spans, strict=True)]  # fmt: skip


class LocalBackend:
    """submit(source, ids) -> a task whose result() is the documents' token arrays."""

    sends_spans = False  # the workers' results come back whole, within this machine
    shares_docs = True  # `submit_shared`: a document other ranks need is tokenized once

    def __init__(self, spec: MixtureSpec, tokenizer: str | None = None, run_id: str = "") -> None:
        """run_id: the launcher's name for the job (`Topology.run_id`), so that two jobs on a
        machine never share steps in its store."""
        self.spec = spec
        self._spec_dict = spec.to_dict()
        self._tokenizer = tokenizer or spec.tokenizer
        # Built here too: it validates every source up front (clear errors before any thread
        # starts) and builds the index caches the workers then read.
        loaders = build_source_loaders(spec, self._tokenizer)
        self.num_docs = [ldr.num_docs for ldr in loaders]
        self.num_bad = [ldr.num_bad for ldr in loaders]
        self._num_shards = [len(ldr.shards) for ldr in loaders]
        self.num_loaded = [0] * len(loaders)
        self.busy_s = [0.0] * len(loaders)
        self.cpu_s = [0.0] * len(loaders)
        self.names = [s.name for s in spec.sources]
        self.tokenizer = loaders[0].tokenizer
        self._source_keys = [source_key(ldr) for ldr in loaders]
        # Names this job's stream in the machine's store (`machine_group.py`): the launcher's run id,
        # and what the documents are. Two jobs alike in all of it would build identical steps.
        run = spec.backend.job or run_id
        what = repr((self._spec_dict, self._tokenizer, self._source_keys)).encode()
        self.job = f"{run}-{hashlib.sha1(what).hexdigest()[:10]}"
        for ldr in loaders:
            ldr.close()
        self._shared: SharedDocs | None = None
        self._swept = -math.inf
        self._pool: Executor | None = None
        self._lock = threading.Lock()

    def _make_pool(self) -> Executor:
        n = self.spec.backend.num_workers
        if self.spec.backend.pool == "thread":
            return ThreadPoolExecutor(n, thread_name_prefix="slipstream-loader")
        # spawn: the parent runs threads (prefetch, tokenizers), which fork does not survive;
        # without the main module, which for a trainer imports torch (lean_spawn.py), unless
        # a source's transform lives there.
        in_main = any((s.transform or "").startswith("__main__:") for s in self.spec.sources)
        ctx = mp.get_context("spawn") if in_main else lean_spawn.get_context()
        return ProcessPoolExecutor(n, mp_context=ctx, initializer=one_thread_tokenizer)

    def submit(self, source: int, ids: list[int]) -> _Task:
        """Start loading documents `ids` of `source`; `.result()` gives their token arrays."""
        self.num_loaded[source] += len(ids)
        return _Task(self, source, list(ids), _load_task)

    def submit_shared(self, source: int, ids: list[int]) -> _Task:
        """`submit` for documents other ranks on this machine need too: the first to ask
        tokenizes each and the others read its tokens (sources/shared.py)."""
        if self._shared is None:
            self._shared = SharedDocs()
        now = time.monotonic()
        if now - self._swept >= SWEEP_EVERY_S:  # the store holds only the last few minutes
            self._shared.sweep()
            self._swept = now
        self.num_loaded[source] += len(ids)
        extra = (self._source_keys[source], str(self._shared.root))
        return _Task(self, source, list(ids), _shared_task, extra)

    def submit_spans(
        self,
        source: int,
        ids: list[int],
        spans: list[tuple[int, int]] | None,
        shared: frozenset[int] | set[int] = frozenset(),
    ) -> _SpanLoad:
        """Tokens [lo, hi) of each document, as `TokenSpan`s, for a machine's group of ranks
        (`machine_group.py`). Each document is tokenized once, however many of its spans are asked,
        in up to `num_workers` tasks; those in `shared` (which a neighbouring step holds too,
        and which another rank may build) go through the machine's store."""
        # Sorted, so each task reads a contiguous range of files and row groups.
        docs, workers = sorted(set(ids)), self.spec.backend.num_workers
        tasks = []
        for in_store in (False, True):
            part = [d for d in docs if (d in shared) == in_store]
            for chunk in np.array_split(part, min(len(part), workers)) if part else []:
                chunk = chunk.tolist()
                task = self.submit_shared(source, chunk) if in_store else self.submit(source, chunk)
                tasks.append((chunk, task))
        return _SpanLoad(tasks, list(ids), spans)

    def flush(self) -> None:
        """Nothing waits to be sent: a task starts when submitted."""

    def upkeep(self, step: int, owner: bool) -> None:
        """A fixed pool of workers: nothing to resize."""

    def replicas(self) -> None:
        return None

    def lengths(self) -> list[np.ndarray]:
        """Every shard's token counts, shards in parallel on the pool (cached after the first
        time on this machine)."""
        tasks = [
            [self._run(s, shard, _lengths_task)[1] for shard in range(n)]
            for s, n in enumerate(self._num_shards)
        ]
        with shard_bar(sum(self._num_shards)) as advance:
            for done in as_completed([t for shards in tasks for t in shards]):
                done.result()
                advance()
        return [np.concatenate([t.result() for t in shards]) for shards in tasks]

    def _run(self, source: int, ids, fn, extra=()) -> tuple[Executor, Future]:
        with self._lock:
            for _ in range(MAX_RETRIES + 1):
                if self._pool is None:
                    self._pool = self._make_pool()
                try:
                    return self._pool, self._pool.submit(
                        fn, self._spec_dict, self._tokenizer, source, ids, *extra
                    )
                except BrokenProcessPool:
                    self._pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = None
        raise RuntimeError("source loader workers keep dying; see the errors above")

    def _replace_broken(self, broken: Executor | None) -> None:
        """A worker died: shut that pool down once; the next task starts a fresh one."""
        with self._lock:
            if self._pool is broken and broken is not None:
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    def worker_pids(self) -> list[int]:
        """Process ids of the pool's workers (process pools only), for fault injection."""
        procs = getattr(self._pool, "_processes", None) or {}
        return list(procs)

    def close(self) -> None:
        """Queued loads are cancelled and running ones finish first: once this returns, no
        load of this backend runs (none writes to the machine's store, none is counted)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
