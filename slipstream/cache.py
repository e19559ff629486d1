"""Where Slipstream keeps what it builds once and reuses: compiled kernels, shard indexes,
token counts, decompressed copies of compressed shards, the demo corpus' download. One folder,
`$SLIPSTREAM_CACHE` (default `~/.cache/slipstream`); nothing is written beside a user's data.
Every entry is keyed by what it was built from and renamed into place when complete, so a
crashed build leaves nothing half-written and deleting the folder only costs a rebuild."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("SLIPSTREAM_CACHE") or Path.home() / ".cache" / "slipstream")


def file_key(path: str | os.PathLike) -> str:
    """A short key for one file by its absolute path: its cache entries' names start with it."""
    return hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:16]
