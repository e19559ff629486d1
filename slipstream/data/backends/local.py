"""Local backend: source loaders in a thread pool or a process pool inside this process.

A fetch of many documents is cut into one task per (source, slice of ids) so the pool works on
all sources at once and each task amortizes its call overhead over many documents. Workers
build their own SourceLoaders (file handles are not shared between threads or processes).
A task whose worker process died is issued again on a fresh pool: loaders hold no logical
state, so the retry returns the very same tokens.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from slipstream.data.source_loader import SourceLoader, build_source_loaders
from slipstream.data.spec import MixtureSpec

_local = threading.local()  # per thread (or per process): {spec key: [SourceLoader, ...]}
MAX_RETRIES = 3


def _loaders(spec_dict: dict) -> list[SourceLoader]:
    key = repr(spec_dict)
    cache = getattr(_local, "loaders", None)
    if cache is None:
        cache = _local.loaders = {}
    if key not in cache:
        cache[key] = build_source_loaders(MixtureSpec.from_dict(spec_dict))
    return cache[key]


def _load_task(spec_dict: dict, source: int, ids: list[int]) -> list[np.ndarray]:
    return _loaders(spec_dict)[source].get_many(ids)


class LocalBackend:
    """fetch({source: [doc ids]}) -> {(source, doc): tokens}."""

    def __init__(self, spec: MixtureSpec) -> None:
        self.spec = spec
        self._spec_dict = spec.to_dict()
        # Built here too: it validates every source up front (clear errors before any thread
        # starts) and builds the index caches the workers then read.
        loaders = build_source_loaders(spec)
        self.num_docs = [ldr.num_docs for ldr in loaders]
        self.num_bad = [ldr.num_bad for ldr in loaders]
        self.tokenizer = loaders[0].tokenizer
        for ldr in loaders:
            ldr.close()
        self._pool: Executor | None = None

    def _make_pool(self) -> Executor:
        n = self.spec.backend.num_workers
        if self.spec.backend.pool == "thread":
            return ThreadPoolExecutor(n, thread_name_prefix="slipstream-loader")
        # spawn: the parent runs threads (prefetch, tokenizers), which fork does not survive.
        return ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"))

    def fetch(self, need: dict[int, list[int]]) -> dict[tuple[int, int], np.ndarray]:
        for attempt in range(MAX_RETRIES + 1):
            try:
                return self._fetch_once(need)
            except BrokenProcessPool:
                self.close()  # a worker died: its tasks go to a fresh pool
                if attempt == MAX_RETRIES:
                    raise
        raise AssertionError("unreachable")

    def _fetch_once(self, need: dict[int, list[int]]) -> dict[tuple[int, int], np.ndarray]:
        if self._pool is None:
            self._pool = self._make_pool()
        total = sum(len(v) for v in need.values())
        chunk = max(1, -(-total // (2 * self.spec.backend.num_workers)))
        futures = []
        for s, ids in need.items():
            for i in range(0, len(ids), chunk):
                part = ids[i : i + chunk]
                futures.append((s, part, self._pool.submit(_load_task, self._spec_dict, s, part)))
        out = {}
        for s, part, fut in futures:
            for d, toks in zip(part, fut.result(), strict=True):
                out[(s, d)] = toks
        return out

    def worker_pids(self) -> list[int]:
        """Process ids of the pool's workers (process pools only), for fault injection."""
        procs = getattr(self._pool, "_processes", None) or {}
        return list(procs)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
