"""What every source format shares: the shard index (two int64 arrays per shard), the
`SourceFormat` seam, and reading byte ranges of a file (text and jsonl).

The index maps a shard's documents to (byte offset, length) for text and jsonl, (row group,
row) for parquet: numpy arrays, not Python lists, so forked workers do not copy them on read.
This package knows nothing of tokens' use or of mixtures.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(slots=True)
class ShardIndex:
    path: str
    a: np.ndarray  # int64: byte offset (text, jsonl) or row group (parquet)
    b: np.ndarray  # int64: byte length (text, jsonl) or row within the group (parquet)
    num_bad: int  # corrupt records left out

    def __len__(self) -> int:
        return len(self.a)


class SourceFormat(Protocol):
    """A file format: index a shard once, then read documents by index."""

    def build_index(self, path: str) -> ShardIndex: ...

    def fingerprint(self) -> str: ...

    def read(self, index: ShardIndex, ids: np.ndarray) -> list[str]: ...

    def close(self) -> None: ...


def list_shards(patterns: list[str], resolve, where: str) -> list[str]:
    """Expand files and globs (sorted, de-duplicated); a pattern matching nothing is an error."""
    out: list[str] = []
    for pattern in patterns:
        full = str(resolve(pattern))
        matches = sorted(glob.glob(full, recursive=True)) if glob.has_magic(full) else [full]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise ValueError(
                f"{where}.paths: {pattern!r} matches no file (looked for {full}); "
                "check the path, or run `slipstream data prepare-demo` for the demo corpus"
            )
        out.extend(m for m in matches if m not in out)
    return out


class ByteRangeFormat:
    """Shared reading for formats whose documents are byte ranges of a file."""

    def __init__(self, on_error: str) -> None:
        self.on_error = on_error
        self._files: dict[str, object] = {}

    def _raw(self, index: ShardIndex, i: int) -> bytes:
        f = self._files.get(index.path)
        if f is None:
            f = self._files[index.path] = open(index.path, "rb")  # noqa: SIM115 - kept open
        f.seek(int(index.a[i]))
        return f.read(int(index.b[i]))

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
