"""The per-shard token-count cache: how many tokens (with the end-of-document token) each
document of a shard has under one tokenizer and transform. It is what lets every rank plan the
whole step from metadata alone and then tokenize only the documents of its own rows.

Built once per machine by tokenizing the shard (the first process to need it builds it under
a file lock; the others wait and read it), cached beside the shard index as
`.NAME.sliplen.<key>.npz`, invalidated when the shard, the tokenizer or the transform changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
from pathlib import Path

import numpy as np

from slipstream.data.sources.index import NPZ_LOCK, _cache_path

LENGTHS_VERSION = 1
BATCH_DOCS = 512


def cache_key(tokenizer_fingerprint: str, transform: str | None) -> str:
    return hashlib.sha1(f"{tokenizer_fingerprint}|{transform}".encode()).hexdigest()[:12]


def shard_lengths(loader, shard: int) -> np.ndarray:
    """int32 token counts of shard `shard`'s documents (in index order) of `loader` (a
    SourceLoader), from the cache or built and cached."""
    index = loader.shards[shard]
    st = os.stat(index.path)
    key = cache_key(loader.tokenizer.fingerprint, loader.transform_ref)
    stamp = f"{LENGTHS_VERSION}|{key}|{len(index)}|{st.st_size}|{st.st_mtime_ns}"
    base = _cache_path(index.path)
    cache = base.with_name(base.name.replace(".slipidx", f".sliplen.{key}"))
    cached = _read(cache, stamp)
    if cached is not None:
        return cached
    with _locked(cache):  # one builder per machine; the others find its result
        cached = _read(cache, stamp)
        if cached is not None:
            return cached
        start = int(loader.shard_starts[shard])
        lengths = np.empty(len(index), dtype=np.int32)
        for lo in range(0, len(index), BATCH_DOCS):
            ids = np.arange(start + lo, start + min(lo + BATCH_DOCS, len(index)))
            lengths[lo : lo + len(ids)] = [len(t) for t in loader.get_many(ids)]
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}-{threading.get_ident()}.npz")
        np.savez(tmp, lengths=lengths, stamp=np.array(stamp))
        os.replace(tmp, cache)  # renamed when complete: a crash leaves no half file
        return lengths


def _read(cache: Path, stamp: str) -> np.ndarray | None:
    if not cache.is_file():
        return None
    try:
        with NPZ_LOCK, np.load(cache, allow_pickle=False) as z:
            if str(z["stamp"]) == stamp:
                return z["lengths"]
    except Exception:  # noqa: BLE001 - an unreadable cache is rebuilt
        pass
    return None


@contextlib.contextmanager
def _locked(cache: Path):
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.with_name(cache.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
