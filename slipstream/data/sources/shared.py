"""Documents several ranks need, tokenized once per machine.

A document longer than a row lands in the rows of several ranks; each of them needs its
tokens. With the local backend every rank has its own loaders, so without this each would
tokenize it. Instead, the first rank on the machine to need such a document tokenizes it under
a file lock and publishes the tokens as `<key>.npy` in a directory in shared memory; the
others wait on the lock and read them.

Entries are addressed by content (the source's files, the tokenizer, the transform and the
document), so jobs on one machine may share them and a stale entry is never read. They are
small (only documents that span ranks pass here) and removed after `MAX_AGE_S` (each local
backend sweeps the store every minute), so the store holds a few minutes of them; a rank that
finds an entry gone tokenizes the document itself: the same tokens, only slower.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

MAX_AGE_S = 120.0  # ranks of a job are seconds apart; a lagging one re-tokenizes
MIN_FREE_BYTES = 256 * 2**20  # below this free in the directory's file system, publish nothing


def default_root() -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return Path(os.environ.get("SLIPSTREAM_SHARED_DOCS", base / f"slipstream-docs-{os.getuid()}"))


def source_key(loader) -> str:
    """What a source's documents are: its files (path, size, mtime), tokenizer, transform."""
    parts = [loader.tokenizer.fingerprint, str(loader.transform_ref)]
    for shard in loader.shards:
        st = os.stat(shard.path)
        parts.append(f"{shard.path}|{st.st_size}|{st.st_mtime_ns}")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


class SharedDocs:
    """get(key, make): the tokens published under `key`, or make() them, publish and return."""

    made = 0  # documents this process tokenized here (for tests and benchmarks)
    _count_lock = threading.Lock()

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or default_root()
        self.root.mkdir(parents=True, exist_ok=True)

    def get(self, key: str, make: Callable[[], np.ndarray]) -> np.ndarray:
        path = self.root / f"{key}.npy"
        found = _read(path)
        if found is not None:
            return found
        with _locked(self.root / f"{key}.lock"):
            found = _read(path)  # published while this rank waited
            if found is not None:
                return found
            tokens = make()
            with SharedDocs._count_lock:
                SharedDocs.made += 1
            if shutil.disk_usage(self.root).free > MIN_FREE_BYTES + tokens.nbytes:
                tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
                with open(tmp, "wb") as f:
                    np.save(f, tokens)
                os.replace(tmp, path)  # whole or absent: a reader never sees half a file
            return tokens

    def sweep(self, max_age_s: float = MAX_AGE_S) -> int:
        """Remove entries (and their locks) older than `max_age_s`; returns how many."""
        cutoff, removed = time.time() - max_age_s, 0
        for p in self.root.iterdir():
            with contextlib.suppress(OSError):
                if p.stat().st_mtime < cutoff:
                    p.unlink()
                    removed += 1
        return removed


def _read(path: Path) -> np.ndarray | None:
    try:
        with open(path, "rb") as f:
            return np.load(f)
    except (FileNotFoundError, ValueError, EOFError):
        return None  # absent, or removed by a sweep while being read


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
