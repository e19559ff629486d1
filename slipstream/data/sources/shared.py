"""Documents several ranks need, tokenized once per machine.

A document longer than a row lands in the rows of several ranks; each of them needs its
tokens. With the local backend every rank has its own loaders, so without this each would
tokenize it. Instead, the first rank on the machine to need such a document tokenizes it under
a file lock and publishes the tokens as `<key>.i32` in a directory in shared memory; the
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
    """get_many(keys, make): the tokens published under `keys`; those absent are made (in one
    call, so a source reads its files once for all of them), published and returned."""

    made = 0  # documents this process tokenized here (for tests and benchmarks)
    _count_lock = threading.Lock()

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or default_root()
        self.root.mkdir(parents=True, exist_ok=True)

    def get(self, key: str, make: Callable[[], np.ndarray]) -> np.ndarray:
        return self.get_many([key], lambda idx: [make()])[0]

    def get_many(
        self, keys: list[str], make: Callable[[list[int]], list[np.ndarray]]
    ) -> list[np.ndarray]:
        """`make(indices)` returns the tokens of `keys[i]` for each i given, in that order.

        Entries nobody is making are locked without waiting and made together; then, with no
        lock held (so no two ranks can wait on each other), each entry another rank was making
        is waited for and read, or made alone if it never appeared."""
        out: list[np.ndarray | None] = [_read(self._path(k)) for k in keys]
        held, busy = {}, []
        try:
            for i, k in enumerate(keys):
                if out[i] is None:
                    f = try_lock(self.root / f"{k}.lock")
                    if f is None:
                        busy.append(i)
                    else:
                        held[i] = f
            mine = []
            for i in held:
                out[i] = _read(self._path(keys[i]))  # published between the look and the lock
                if out[i] is None:
                    mine.append(i)
            if mine:
                for i, tokens in zip(mine, make(mine), strict=True):
                    out[i] = tokens
                    self._publish(keys[i], tokens)
        finally:
            for f in held.values():
                unlock(f)
        for i in busy:
            with _locked(self.root / f"{keys[i]}.lock"):
                out[i] = _read(self._path(keys[i]))  # published while this rank waited
                if out[i] is None:
                    out[i] = make([i])[0]
                    self._publish(keys[i], out[i])
        return out  # type: ignore[return-value]

    def _path(self, key: str) -> Path:
        # Raw int32, not .npy: np.load parses each header with ast.literal_eval, which raises
        # SystemError ("AST constructor recursion depth mismatch") when loader threads call
        # it at once on CPython 3.11.
        return self.root / f"{key}.i32"

    def _publish(self, key: str, tokens: np.ndarray) -> None:
        with SharedDocs._count_lock:
            SharedDocs.made += 1
        if shutil.disk_usage(self.root).free > MIN_FREE_BYTES + tokens.nbytes:
            path = self._path(key)
            tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
            with open(tmp, "wb") as f:
                f.write(np.ascontiguousarray(tokens, dtype=np.int32).tobytes())
            os.replace(tmp, path)  # whole or absent: a reader never sees half a file

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
            return np.frombuffer(f.read(), dtype=np.int32)
    except FileNotFoundError:
        return None  # absent, or removed by a sweep before it was opened


def try_lock(path: Path):
    """The lock file, open and held; None if another process or thread holds it."""
    f = open(path, "a")  # noqa: SIM115 - closed by unlock
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def unlock(f) -> None:
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


def lock(path: Path):
    """The lock file, open and held, once no other process or thread holds it (blocks)."""
    f = open(path, "a")  # noqa: SIM115 - closed by unlock
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
