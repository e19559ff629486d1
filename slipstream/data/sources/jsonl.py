"""JSON-lines sources: one object per line, the document in one string field."""

from __future__ import annotations

import json

import numpy as np

from slipstream.data.sources.base import ByteRangeFormat, ShardIndex


class JsonlFormat(ByteRangeFormat):
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
