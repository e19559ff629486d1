"""What the peer pipelines share: a map-style dataset over every (source, document) that reads
and tokenizes one document per item (as a torch Dataset does), and nanoGPT-style packing in
collate_fn. Reading uses Slipstream's format readers so both sides do the same I/O."""

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

    def __getitem__(self, i: int) -> np.ndarray:
        if self.loaders is None:
            from slipstream.data import MixtureSpec, build_source_loaders

            self.loaders = build_source_loaders(MixtureSpec.from_dict(self.spec))
        s = int(np.searchsorted(self.starts, i, side="right") - 1)
        ldr = self.loaders[s]
        doc = int(self.ids[s][i - int(self.starts[s])])
        text = ldr.read_texts([doc])[0]  # applies the source's transform
        tok = ldr.tokenizer
        if hasattr(tok, "_tok"):  # a tokenizers BPE: one document at a time
            ids = tok._tok.encode(text, add_special_tokens=False).ids
            return np.array([*ids, tok.eos_id], dtype=np.int64)
        return tok.encode_batch([text])[0].astype(np.int64)

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
        return {"input_ids": x, "labels": rows[:, 1:], "num_tokens": int(min(take, n * seq_len))}

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
