"""Source formats: shard listing, a per-shard document index, and reading one document.

The index maps a shard's documents to two int64 arrays (byte offset and length for text and
jsonl; row group and row for parquet). It is built once, validated as it is built (corrupt
records are left out and counted), and cached beside the shard in `.NAME.slipidx.npz`,
invalidated when the shard's size or mtime changes. numpy arrays, not Python lists, so that
forked workers do not copy them on read. This module knows nothing of tokens or mixtures.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

INDEX_VERSION = 1


@dataclass(slots=True)
class ShardIndex:
    path: str
    a: np.ndarray  # int64: byte offset (text, jsonl) or row group (parquet)
    b: np.ndarray  # int64: byte length (text, jsonl) or row within the group (parquet)
    num_bad: int  # corrupt records left out

    def __len__(self) -> int:
        return len(self.a)


class SourceFormat(Protocol):
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


class _ByteRangeFormat:
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


class TextFormat(_ByteRangeFormat):
    """A document per file, or documents split on a separator string."""

    def __init__(self, separator: str | None, on_error: str = "skip") -> None:
        super().__init__(on_error)
        self.separator = separator

    def fingerprint(self) -> str:
        return f"text:{self.separator!r}"

    def build_index(self, path: str) -> ShardIndex:
        data = Path(path).read_bytes()
        if self.separator is None:
            spans = [(0, len(data))] if data.strip() else []
        else:
            sep = self.separator.encode()
            spans, start = [], 0
            while start <= len(data):
                end = data.find(sep, start)
                end = len(data) if end < 0 else end
                if data[start:end].strip():
                    spans.append((start, end - start))
                start = end + len(sep)
        arr = np.array(spans, dtype=np.int64).reshape(-1, 2)
        return ShardIndex(path, arr[:, 0].copy(), arr[:, 1].copy(), 0)

    def read(self, index: ShardIndex, ids: np.ndarray) -> list[str]:
        return [self._raw(index, int(i)).decode("utf-8", errors="replace") for i in ids]


class JsonlFormat(_ByteRangeFormat):
    """One JSON object per line; the document is `text_field`. Bad lines are skipped and
    counted, or raise, as `on_error` says."""

    def __init__(self, text_field: str, on_error: str = "skip") -> None:
        super().__init__(on_error)
        self.text_field = text_field

    def fingerprint(self) -> str:
        return f"jsonl:{self.text_field}:{self.on_error}"

    def build_index(self, path: str) -> ShardIndex:
        offsets, lengths, bad, pos = [], [], 0, 0
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                n = len(line)
                body = line.rstrip(b"\r\n")
                if body.strip():
                    problem = self._check(body)
                    if problem is None:
                        offsets.append(pos)
                        lengths.append(len(body))
                    elif self.on_error == "raise":
                        raise ValueError(
                            f"{path}:{lineno}: {problem}; fix the line, or set on_error = 'skip'"
                        )
                    else:
                        bad += 1
                pos += n
        return ShardIndex(
            path, np.array(offsets, dtype=np.int64), np.array(lengths, dtype=np.int64), bad
        )

    def _check(self, body: bytes) -> str | None:
        try:
            obj = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "not valid JSON"
        if not isinstance(obj, dict) or not isinstance(obj.get(self.text_field), str):
            return f"no string field {self.text_field!r}"
        return None if obj[self.text_field] else f"empty field {self.text_field!r}"

    def read(self, index: ShardIndex, ids: np.ndarray) -> list[str]:
        return [json.loads(self._raw(index, int(i)))[self.text_field] for i in ids]


class ParquetFormat:
    """Rows of a parquet file; the document is column `text_field`. A file that cannot be read
    is skipped (counted as one bad record) or raises; null or empty values are left out."""

    def __init__(self, text_field: str, on_error: str = "skip", cache_groups: int = 4) -> None:
        self.text_field = text_field
        self.on_error = on_error
        self.cache_groups = cache_groups
        self._files: dict[str, object] = {}
        self._groups: OrderedDict[tuple[str, int], list] = OrderedDict()

    def fingerprint(self) -> str:
        return f"parquet:{self.text_field}:{self.on_error}"

    def build_index(self, path: str) -> ShardIndex:
        import pyarrow.parquet as pq

        groups, rows = [], []
        try:
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
            for g in range(pf.num_row_groups if self.text_field in names else 0):
                col = pf.read_row_group(g, columns=[self.text_field]).column(0).to_pylist()
                keep = [r for r, v in enumerate(col) if isinstance(v, str) and v]
                groups.extend([g] * len(keep))
                rows.extend(keep)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for corrupt files
            if self.on_error == "raise":
                raise ValueError(
                    f"{path}: corrupt parquet file ({e}); replace it, or set on_error = 'skip'"
                ) from None
            return ShardIndex(path, np.zeros(0, np.int64), np.zeros(0, np.int64), 1)
        if self.text_field not in names:
            raise ValueError(
                f"{path}: no column {self.text_field!r} (columns: {names}); set text_field"
            )
        return ShardIndex(path, np.array(groups, np.int64), np.array(rows, np.int64), 0)

    def _group(self, path: str, g: int) -> list:
        import pyarrow.parquet as pq

        key = (path, g)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        pf = self._files.get(path)
        if pf is None:
            pf = self._files[path] = pq.ParquetFile(path)
        col = pf.read_row_group(g, columns=[self.text_field]).column(0).to_pylist()
        self._groups[key] = col
        while len(self._groups) > self.cache_groups:
            self._groups.popitem(last=False)
        return col

    def read(self, index: ShardIndex, ids: np.ndarray) -> list[str]:
        return [self._group(index.path, int(index.a[i]))[int(index.b[i])] for i in ids]

    def close(self) -> None:
        self._files.clear()
        self._groups.clear()


def make_format(fmt: str, *, text_field: str, separator: str | None, on_error: str) -> SourceFormat:
    if fmt == "text":
        return TextFormat(separator, on_error)
    if fmt == "jsonl":
        return JsonlFormat(text_field, on_error)
    if fmt == "parquet":
        return ParquetFormat(text_field, on_error)
    raise ValueError(f"format: unknown {fmt!r}; use text, jsonl or parquet")


def load_index(fmt: SourceFormat, path: str) -> ShardIndex:
    """The shard's index from its cache when the shard is unchanged, else built and cached."""
    st = os.stat(path)
    stamp = f"{INDEX_VERSION}|{fmt.fingerprint()}|{st.st_size}|{st.st_mtime_ns}"
    cache = _cache_path(path)
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                if str(z["stamp"]) == stamp:
                    return ShardIndex(path, z["a"], z["b"], int(z["num_bad"]))
        except Exception:  # noqa: BLE001 - any unreadable cache (truncated zip, ...) is rebuilt
            pass
    index = fmt.build_index(path)
    _save_index(cache, index, stamp)
    return index


def _cache_path(path: str) -> Path:
    """Beside the shard; in the user's cache when the shard's folder is read-only."""
    p = Path(path).resolve()
    if os.access(p.parent, os.W_OK):
        return p.with_name(f".{p.name}.slipidx.npz")
    digest = hashlib.sha1(str(p).encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "slipstream" / "index" / f"{digest}.npz"


def _save_index(cache: Path, index: ShardIndex, stamp: str) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Written to a temporary name and renamed so a crash never leaves a half-written index.
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}-{threading.get_ident()}.npz")
    np.savez(tmp, a=index.a, b=index.b, num_bad=index.num_bad, stamp=np.array(stamp))
    os.replace(tmp, cache)
