"""Parquet sources: rows of a file, the document in one string column; row groups are read
whole and a few kept in memory, since documents of a step cluster in groups only by chance."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from slipstream.data.sources.base import ShardIndex


class ParquetFormat:
    """Rows of a parquet file; the document is column `text_field`. A file that cannot be read
    is skipped (counted as one bad record) or raises; null or empty values are left out."""

    suffixes = (".parquet",)

    def __init__(self, text_field: str, on_error: str = "skip", cache_groups: int = 4) -> None:
        self.text_field = text_field
        self.on_error = on_error
        self.cache_groups = cache_groups
        self._files: dict[str, object] = {}
        self._groups: OrderedDict[tuple[str, int], list] = OrderedDict()

    def fingerprint(self) -> str:
        return f"parquet:{self.text_field}:{self.on_error}"

    def build_index(self, path: str) -> ShardIndex:
        import pyarrow as pa
        import pyarrow.parquet as pq

        groups, rows = [], []
        try:
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
            kind = pf.schema_arrow.field(self.text_field).type if self.text_field in names else None
            text = kind is not None and (pa.types.is_string(kind) or pa.types.is_large_string(kind))
            for g in range(pf.num_row_groups if text else 0):
                table = pf.read_row_group(g, columns=[self.text_field], use_threads=False)
                col = table.column(0).to_pylist()
                keep = [r for r, v in enumerate(col) if isinstance(v, str) and v]
                groups.extend([g] * len(keep))
                rows.extend(keep)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for corrupt files
            if self.on_error == "raise":
                raise ValueError(
                    f"{path}: corrupt parquet file ({e}); replace it, or set on_error = 'skip'"
                ) from None
            empty = np.zeros(0, np.int64)
            return ShardIndex(path, empty, empty, 1, f"{path}: corrupt parquet file ({e})")
        if kind is None:
            raise ValueError(
                f"{path}: no column {self.text_field!r} (columns: {names}); set text_field"
            )
        if not text:
            raise ValueError(
                f"{path}: column {self.text_field!r} holds {kind}, not text; set text_field "
                f"to a string column (columns: {names})"
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
        # On the caller's thread: loaders already run in parallel, and arrow's own thread
        # pool would only add hand-offs (measured: 25% more CPU per row group).
        table = pf.read_row_group(g, columns=[self.text_field], use_threads=False)
        col = table.column(0).to_pylist()
        self._groups[key] = col
        while len(self._groups) > self.cache_groups:
            self._groups.popitem(last=False)
        return col

    def read(self, index: ShardIndex, ids: np.ndarray) -> list[str]:
        return [self._group(index.path, int(index.a[i]))[int(index.b[i])] for i in ids]

    def close(self) -> None:
        self._files.clear()
        self._groups.clear()
