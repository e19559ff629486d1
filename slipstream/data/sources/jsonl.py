"""JSON-lines sources: one object per line, the document in one string field; `.jsonl.gz` and
`.jsonl.zst` files are read through a decompressed copy in the cache folder."""

from __future__ import annotations

import json

import numpy as np

from slipstream.data.sources.base import ByteRangeFormat, ShardIndex, readable_path


class JsonlFormat(ByteRangeFormat):
    """One JSON object per line; the document is `text_field`. Bad lines are skipped and
    counted, or raise, as `on_error` says."""

    suffixes = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson")

    def __init__(self, text_field: str, on_error: str = "skip") -> None:
        super().__init__(on_error)
        self.text_field = text_field

    def fingerprint(self) -> str:
        return f"jsonl:{self.text_field}:{self.on_error}"

    def build_index(self, path: str) -> ShardIndex:
        offsets, lengths, bad, first_bad, pos = [], [], 0, "", 0
        with open(readable_path(path), "rb") as f:
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
                        first_bad = first_bad or f"{path}:{lineno}: {problem}"
                pos += n
        a, b = np.array(offsets, dtype=np.int64), np.array(lengths, dtype=np.int64)
        return ShardIndex(path, a, b, bad, first_bad)

    def _check(self, body: bytes) -> str | None:
        try:
            obj = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "not valid JSON"
        if not isinstance(obj, dict):
            return f"a JSON {type(obj).__name__}, not an object with a field {self.text_field!r}"
        if self.text_field not in obj:
            return f"no field {self.text_field!r} (fields: {', '.join(list(obj)[:8])})"
        value = obj[self.text_field]
        if not isinstance(value, str):
            return f"field {self.text_field!r} holds a {type(value).__name__}, not text"
        return None if value else f"empty field {self.text_field!r}"

    def read(self, index: ShardIndex, ids: np.ndarray) -> list[str]:
        return [json.loads(self._raw(index, int(i)))[self.text_field] for i in ids]
