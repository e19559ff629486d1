"""What every source format shares: the shard index (two int64 arrays per shard), the
`SourceFormat` seam, and reading byte ranges of a file (text and jsonl).

The index maps a shard's documents to (byte offset, length) for text and jsonl, (row group,
row) for parquet: numpy arrays, not Python lists, so forked workers do not copy them on read.
This package knows nothing of tokens' use or of mixtures.
"""

from __future__ import annotations

import glob
import gzip
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from slipstream.cache import cache_root, file_key

COMPRESSED = (".gz", ".zst")  # read through a decompressed copy in the cache folder


@dataclass(slots=True)
class ShardIndex:
    path: str
    a: np.ndarray  # int64: byte offset (text, jsonl) or row group (parquet)
    b: np.ndarray  # int64: byte length (text, jsonl) or row within the group (parquet)
    num_bad: int  # corrupt records left out
    first_bad: str = ""  # the first of them, "file:line: what is wrong", for the user

    def __len__(self) -> int:
        return len(self.a)


class SourceFormat(Protocol):
    """A file format: index a shard once, then read documents by index."""

    suffixes: tuple[str, ...]  # the file names a folder in `paths` stands for

    def build_index(self, path: str) -> ShardIndex: ...

    def fingerprint(self) -> str: ...

    def read(self, index: ShardIndex, ids: np.ndarray) -> list[str]: ...

    def close(self) -> None: ...


def list_shards(patterns: list[str], resolve, where: str, suffixes: tuple[str, ...]) -> list[str]:
    """Expand files, folders and globs (sorted, de-duplicated). A folder stands for the files
    in it and below it whose names end in one of the format's `suffixes` (hidden ones left
    out); a pattern matching nothing, or a folder holding no such file, is an error."""
    out: list[str] = []
    for pattern in patterns:
        full = str(resolve(pattern))
        matches = sorted(glob.glob(full, recursive=True)) if glob.has_magic(full) else [full]
        files = [m for m in matches if os.path.isfile(m)]
        for folder in (m for m in matches if os.path.isdir(m)):
            found = _files_in(folder, suffixes)
            if not found and not glob.has_magic(full):
                raise ValueError(
                    f"{where}.paths: the folder {pattern!r} holds no {'/'.join(suffixes)} "
                    f"file (looked in {full}); set the source's format, or name the files "
                    "with a glob such as 'folder/*.ext'"
                )
            files.extend(found)
        if not files:
            raise ValueError(
                f"{where}.paths: {pattern!r} matches no file (looked for {full}); "
                "check the path, or run `slipstream data prepare-demo` for the demo corpus"
            )
        out.extend(m for m in sorted(set(files)) if m not in out)
    return out


def _files_in(folder: str, suffixes: tuple[str, ...]) -> list[str]:
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, n) for n in names if n.endswith(suffixes) and n[0] != "."]
    return sorted(found)


def readable_path(path: str) -> str:
    """`path` itself, or for a compressed file (.gz, .zst) its decompressed copy in the cache
    folder, made on first use (and again wherever the cache lacks it: another node, a cleared
    cache), keyed by the file's path, size and modification time."""
    if not path.endswith(COMPRESSED):
        return path
    st = os.stat(path)
    name = Path(path).name.rsplit(".", 1)[0]
    plain = cache_root() / "plain" / f"{file_key(path)}-{st.st_size}-{st.st_mtime_ns}-{name}"
    if plain.is_file():
        return str(plain)
    plain.parent.mkdir(parents=True, exist_ok=True)
    tmp = plain.with_name(f"{plain.name}.tmp{os.getpid()}-{threading.get_ident()}")
    try:
        with open(path, "rb") as raw, _decompressed(raw, path) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except Exception as e:  # noqa: BLE001 - BadGzipFile, EOFError, ZstdError, ...
        tmp.unlink(missing_ok=True)
        raise ValueError(f"{path}: cannot be decompressed ({e}); replace the file") from None
    os.replace(tmp, plain)  # renamed when complete: a crash leaves no half copy
    return str(plain)


def _decompressed(raw, path: str):
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    try:
        import zstandard
    except ImportError:
        raise ValueError(
            f"{path}: reading .zst files needs the zstandard package (pip install zstandard)"
        ) from None
    return zstandard.ZstdDecompressor().stream_reader(raw)


class ByteRangeFormat:
    """Shared reading for formats whose documents are byte ranges of a file."""

    def __init__(self, on_error: str) -> None:
        self.on_error = on_error
        self._files: dict[str, object] = {}

    def _raw(self, index: ShardIndex, i: int) -> bytes:
        f = self._files.get(index.path)
        if f is None:
            path = readable_path(index.path)
            f = self._files[index.path] = open(path, "rb")  # noqa: SIM115 - kept open
        f.seek(int(index.a[i]))
        return f.read(int(index.b[i]))

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
