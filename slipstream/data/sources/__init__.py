"""Sources: one file per format (text, jsonl, parquet), the shard index and its cache, the
tokenizers, and `SourceLoader`, which serves "document k of source s", tokenized."""

from __future__ import annotations

from slipstream.data.sources.base import ShardIndex, SourceFormat
from slipstream.data.sources.jsonl import JsonlFormat
from slipstream.data.sources.parquet import ParquetFormat
from slipstream.data.sources.text import TextFormat
from slipstream.data.spec import FORMATS  # one list: the spec validates against it


def make_format(fmt: str, *, text_field: str, separator: str | None, on_error: str) -> SourceFormat:
    if fmt == "text":
        return TextFormat(separator, on_error)
    if fmt == "jsonl":
        return JsonlFormat(text_field, on_error)
    if fmt == "parquet":
        return ParquetFormat(text_field, on_error)
    raise ValueError(f"format: unknown {fmt!r}; use {', '.join(FORMATS)}")


__all__ = ["FORMATS", "JsonlFormat", "ParquetFormat", "ShardIndex", "SourceFormat", "TextFormat"]
__all__ += ["make_format"]
