"""SourceLoader: random access to "document k of source s", tokenized.

A loader holds open files, shard indexes and a tokenizer, but no logical state: which document
comes next is the planner's business. So any replica can serve any request, and a request that
failed can simply be issued again elsewhere.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np

from slipstream.data.sources import make_format
from slipstream.data.sources.base import ShardIndex, list_shards
from slipstream.data.sources.index import load_index
from slipstream.data.sources.lengths import shard_lengths
from slipstream.data.sources.tokenizers import Tokenizer, build_tokenizer
from slipstream.data.spec import MixtureSpec, SourceSpec


class SourceLoader:
    def __init__(self, source: SourceSpec, tokenizer: Tokenizer, resolve) -> None:
        self.name = source.name
        self.tokenizer = tokenizer
        self.transform_ref = source.transform
        self._transform = load_transform(source.transform, source.name)
        self._format = make_format(
            source.format,
            text_field=source.text_field,
            separator=source.separator,
            on_error=source.on_error,
        )
        where = f"sources.{source.name}"
        paths = list_shards(source.paths, resolve, where, self._format.suffixes)
        self.shards: list[ShardIndex] = [load_index(self._format, p) for p in paths]
        counts = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)])
        self.num_docs = int(self.shard_starts[-1])
        self.num_bad = sum(s.num_bad for s in self.shards)
        first = next((s.first_bad for s in self.shards if s.first_bad), "")
        if self.num_docs == 0:
            raise ValueError(
                f"{where}: no documents in {len(paths)} file(s)"
                f" ({self.num_bad} corrupt record(s) skipped{'; the first: ' if first else ''}"
                f"{first}); check the paths and text_field = {source.text_field!r}, or remove "
                "the source"
            )
        bad = self.num_bad / (self.num_bad + self.num_docs)
        if bad > source.max_bad_fraction:
            raise ValueError(
                f"{where}: {self.num_bad:,} of {self.num_bad + self.num_docs:,} records are "
                f"corrupt ({bad:.1%} > max_bad_fraction {source.max_bad_fraction:g}); the "
                f"first: {first}. Fix the data, or raise {where}.max_bad_fraction"
            )

    def read_texts(self, ids: np.ndarray | list[int]) -> list[str]:
        """Raw text of documents `ids` (source-global indices), in the order given."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_docs):
            raise IndexError(f"{self.name}: document id out of range [0, {self.num_docs})")
        shard_of = np.searchsorted(self.shard_starts, ids, side="right") - 1
        out: list[str | None] = [None] * len(ids)
        for s in np.unique(shard_of):
            where = np.nonzero(shard_of == s)[0]
            texts = self._format.read(self.shards[s], ids[where] - self.shard_starts[s])
            for w, t in zip(where, texts, strict=True):
                out[w] = t if self._transform is None else self._transform(t)
        return out  # type: ignore[return-value]

    def get_many(self, ids: np.ndarray | list[int]) -> list[np.ndarray]:
        """Token ids (int32, ending with EOS) of documents `ids`."""
        return self.tokenizer.encode_batch(self.read_texts(ids))

    def shard_lengths(self, shard: int) -> np.ndarray:
        """Token counts of one shard's documents (cached per tokenizer: `lengths.py`)."""
        return shard_lengths(self, shard)

    def lengths(self) -> np.ndarray:
        """Token counts of every document, by source-global id."""
        return np.concatenate([self.shard_lengths(i) for i in range(len(self.shards))])

    def close(self) -> None:
        self._format.close()


def load_transform(ref: str | None, source: str) -> Callable[[str], str] | None:
    if ref is None:
        return None
    module, _, name = ref.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"sources.{source}.transform: cannot load {ref!r} ({e})") from None
    if not callable(fn):
        raise ValueError(f"sources.{source}.transform: {ref!r} is not a function")
    return fn


def build_source_loaders(spec: MixtureSpec, tokenizer: str | None = None) -> list[SourceLoader]:
    """One loader per source; `tokenizer` (a name or path) overrides `spec.tokenizer`."""
    tokenizer = build_tokenizer(tokenizer or spec.tokenizer, spec.base_dir)
    return [SourceLoader(s, tokenizer, spec.resolve) for s in spec.sources]
