"""The per-shard index cache: built once, validated as it is built (corrupt records are left out
and counted), kept in Slipstream's cache folder (`$SLIPSTREAM_CACHE/index`, never beside the
user's data) and invalidated when the shard's size or mtime changes."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from slipstream.cache import cache_root, file_key
from slipstream.data.sources.base import ShardIndex, SourceFormat

INDEX_VERSION = 2
NPZ_LOCK = threading.Lock()
"""Held around np.load of a cache file: np.load parses each member's header with
ast.literal_eval, which raises SystemError ("AST constructor recursion depth mismatch") when
threads call it at once on CPython 3.11; loader threads open their caches at the same time."""


def load_index(fmt: SourceFormat, path: str) -> ShardIndex:
    """The shard's index from its cache when the shard is unchanged, else built and cached."""
    st = os.stat(path)
    stamp = f"{INDEX_VERSION}|{fmt.fingerprint()}|{st.st_size}|{st.st_mtime_ns}"
    cache = _cache_path(path)
    if cache.is_file():
        try:
            with NPZ_LOCK, np.load(cache, allow_pickle=False) as z:
                if str(z["stamp"]) == stamp:
                    return ShardIndex(path, z["a"], z["b"], int(z["num_bad"]), str(z["first_bad"]))
        except Exception:  # noqa: BLE001 - any unreadable cache (truncated zip, ...) is rebuilt
            pass
    index = fmt.build_index(path)
    _save_index(cache, index, stamp)
    return index


def _cache_path(path: str) -> Path:
    """The shard's entry in the cache folder, named by its absolute path's key and its name."""
    return cache_root() / "index" / f"{file_key(path)}-{Path(path).name}.slipidx.npz"


def _save_index(cache: Path, index: ShardIndex, stamp: str) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Written to a temporary name and renamed so a crash never leaves a half-written index.
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}-{threading.get_ident()}.npz")
    np.savez(
        tmp,
        a=index.a,
        b=index.b,
        num_bad=index.num_bad,
        first_bad=np.array(index.first_bad),
        stamp=np.array(stamp),
    )
    os.replace(tmp, cache)
