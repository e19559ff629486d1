"""Plain text sources: a document per file, or documents split on a separator string."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slipstream.data.sources.base import ByteRangeFormat, ShardIndex, readable_path


class TextFormat(ByteRangeFormat):
    """A document per file, or documents split on a separator string."""

    suffixes = (".txt", ".md", ".rst", ".text", ".txt.gz", ".txt.zst")

    def __init__(self, separator: str | None, on_error: str = "skip") -> None:
        super().__init__(on_error)
        self.separator = separator

    def fingerprint(self) -> str:
        return f"text:{self.separator!r}"

    def build_index(self, path: str) -> ShardIndex:
        data = Path(readable_path(path)).read_bytes()
        if b"\x00" in data[:8192]:  # text has no NUL bytes; binary formats are full of them
            raise ValueError(
                f"{path}: a binary file, not text (a NUL byte in its first 8 KiB); leave it out "
                "of this text source's paths, or give it its own format"
            )
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
