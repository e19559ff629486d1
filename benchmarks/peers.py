"""The peers' data pipelines, built as their users build them: a map-style dataset over every
(source, document) with packing in collate_fn; an IterableDataset that carries a token buffer
across rows; nanoGPT's pre-tokenized memory-mapped token file with random windows. Reading uses
Slipstream's format readers so every side does the same I/O and the same transforms."""

from __future__ import annotations

import numpy as np
import torch


class MixtureDocs:
    """Map-style dataset: item i is document i of the concatenated sources, tokenized."""

    def __init__(self, spec, split: str | None = None) -> None:
        """`split`: None = every document; `train` = all but the held-out ones."""
        from slipstream.data import build_source_loaders
        from slipstream.data.planner import split_ids

        loaders = build_source_loaders(spec)
        self.spec = spec.to_dict()
        ids = [
            np.arange(ld.num_docs) if split is None else split_ids(ld.num_docs, s.name, spec, split)
            for ld, s in zip(loaders, spec.sources, strict=True)
        ]
        self.ids = ids  # numpy, not lists: forked workers do not copy them on read
        self.starts = np.cumsum([0] + [len(x) for x in ids])
        self.loaders = None  # opened per worker process

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _open(self):
        if self.loaders is None:
            from slipstream.data import MixtureSpec, build_source_loaders

            self.loaders = build_source_loaders(MixtureSpec.from_dict(self.spec))
        return self.loaders

    def __getitem__(self, i: int) -> np.ndarray:
        return self.__getitems__([i])[0]

    def __getitems__(self, items: list[int]) -> list[np.ndarray]:
        """A whole batch at once (the DataLoader calls this when it exists): each source's
        documents are read together and tokenized with one batched call."""
        loaders = self._open()
        src = np.searchsorted(self.starts, items, side="right") - 1
        out: list[np.ndarray | None] = [None] * len(items)
        for s in np.unique(src):
            where = np.nonzero(src == s)[0]
            docs = [int(self.ids[s][items[w] - int(self.starts[s])]) for w in where]
            texts = loaders[s].read_texts(docs)  # applies the source's transform
            for w, ids in zip(where, loaders[s].tokenizer.encode_batch(texts), strict=True):
                out[w] = ids.astype(np.int64)
        return out  # type: ignore[return-value]

    def sample_weights(self, weights: list[float]) -> np.ndarray:
        counts = np.diff(self.starts)
        return np.repeat(np.array(weights) / counts, counts)


def pack_rows(seq_len: int, num_rows: int | None = None):
    """collate_fn: concatenate the documents and cut rows of seq_len + 1 tokens (x = row[:-1],
    y = row[1:]). With `num_rows`, exactly that many rows; a short batch pads labels with -100."""

    def collate(docs: list[np.ndarray]) -> dict[str, torch.Tensor]:
        flat = np.concatenate(docs)
        n = num_rows if num_rows is not None else len(flat) // (seq_len + 1)
        buf = np.full(n * (seq_len + 1), -100, dtype=np.int64)
        take = min(len(flat), len(buf))
        buf[:take] = flat[:take]
        rows = torch.from_numpy(buf.reshape(n, seq_len + 1))
        x = rows[:, :-1].clamp(min=0)
        return {
            "input_ids": x,
            "labels": rows[:, 1:],
            "num_tokens": int(min(take, n * seq_len)),
            "num_tokenized": len(flat),  # what the workers tokenized; the rest is dropped
        }

    return collate


def docs_per_batch(spec, rows: int | None = None, margin: float = 1.0) -> int:
    """Documents per batch so that it holds about `rows` rows (default: one step's rows)."""
    from slipstream.data import build_source_loaders

    loaders = build_source_loaders(spec)
    rng = np.random.default_rng(0)
    mean = sum(
        w * np.mean([len(t) for t in ld.get_many(rng.choice(ld.num_docs, 16))])
        for ld, w in zip(loaders, spec.weights_at(0))
    )
    rows = rows or spec.micro_batch_size
    return max(1, int(np.ceil(margin * rows * (spec.seq_len + 1) / mean)))


class TokenBufferDocs(torch.utils.data.IterableDataset):
    """An IterableDataset (the torch pattern for streams): each DataLoader worker draws
    documents by source weight (seeded per worker), reads and tokenizes them in batches of
    `chunk` (batched encoding, as a careful user writes it), appends them to a token buffer and
    yields rows of seq_len + 1 tokens, carrying the remainder into the next row: every token
    read is trained on, once. Document boundaries are ignored (nanoGPT-style rows)."""

    def __init__(self, spec, split: str | None = "train", chunk: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.docs = MixtureDocs(spec, split)
        self.spec, self.chunk, self.seed = spec, chunk, seed
        self.weights = np.array(spec.weights_at(0), dtype=np.float64)
        self.weights /= self.weights.sum()

    def __iter__(self):
        import torch.utils.data as tud

        from slipstream.data import MixtureSpec, build_source_loaders

        info = tud.get_worker_info()
        wid = info.id if info is not None else 0
        rng = np.random.default_rng([self.seed, wid])
        loaders = build_source_loaders(MixtureSpec.from_dict(self.docs.spec))
        tok = loaders[0].tokenizer
        n = self.spec.seq_len + 1
        buf = np.zeros(0, dtype=np.int64)
        while True:
            s = int(rng.choice(len(self.weights), p=self.weights))
            ids = self.docs.ids[s][rng.integers(0, len(self.docs.ids[s]), self.chunk)]
            texts = loaders[s].read_texts(ids)  # applies the source's transform
            buf = np.concatenate([buf, *tok.encode_batch(texts)]).astype(np.int64)
            while len(buf) >= n:
                row, buf = buf[:n], buf[n:]
                yield torch.from_numpy(row.copy())


def rows_to_batch(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """collate_fn for rows of seq_len + 1 tokens: x = row[:-1], y = row[1:]."""
    r = torch.stack(rows)
    return {"input_ids": r[:, :-1], "labels": r[:, 1:], "num_tokens": r[:, 1:].numel()}


def write_token_file(spec, path, split: str | None = "train") -> int:
    """nanoGPT's prepare.py: tokenize every document once (transforms applied), concatenate
    with end-of-document tokens, and write a uint16 (or uint32) memory-mappable file."""
    from slipstream.data import build_source_loaders

    ds = MixtureDocs(spec, split)
    loaders = build_source_loaders(spec)
    dtype = np.uint16 if loaders[0].tokenizer.vocab_size < 2**16 else np.uint32
    parts = []
    for ldr, ids in zip(loaders, ds.ids, strict=True):
        for start in range(0, len(ids), 256):
            parts.extend(ldr.get_many(ids[start : start + 256]))
    tokens = np.concatenate(parts).astype(dtype)
    tokens.tofile(path)
    return len(tokens)


class MemmapWindows:
    """nanoGPT's get_batch: random windows of seq_len + 1 tokens from a memory-mapped token
    file, document boundaries ignored."""

    def __init__(self, path, dtype, seq_len: int, rows: int, seed: int = 0) -> None:
        self.data = np.memmap(path, dtype=dtype, mode="r")
        self.seq_len, self.rows = seq_len, rows
        self.rng = np.random.default_rng(seed)

    def __next__(self) -> dict[str, torch.Tensor]:
        starts = self.rng.integers(0, len(self.data) - self.seq_len - 1, self.rows)
        r = torch.from_numpy(
            np.stack([self.data[i : i + self.seq_len + 1].astype(np.int64) for i in starts])
        )
        return {"input_ids": r[:, :-1], "labels": r[:, 1:], "num_tokens": r[:, 1:].numel()}
