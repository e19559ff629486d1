"""The batch builder: one micro-batch of planned rows (packing happened in the planner) into
tensors.

Per row: `input_ids`, `labels`, `position_ids` that restart at every piece (a document cut
across rows or steps restarts its positions in each piece), `doc_ids` (the piece's number
within its row, -1 on padding) for a block-diagonal causal mask, and `source_ids`.
`cu_seqlens` gives the segment boundaries of the flattened micro-batch (padding is a segment
of its own) for variable-length attention kernels. Nothing here decides what goes where.

Two label conventions:
- `next` (Slipstream's trainer): `labels[t]` is the token after `input_ids[t]` in the same
  document, -100 where there is none or on padding. A piece's last token keeps its target
  even when the document was cut there, so no prediction target is lost.
- `hf` (Hugging Face models, which shift `labels` themselves): `labels[t] = input_ids[t]`,
  -100 on padding and on the first token of every piece, so the shifted loss never predicts
  across a document boundary. The target of a cut piece's last token is not expressible this
  way and is lost (one per cut).
"""

from __future__ import annotations

import numpy as np
import torch

from slipstream.data.packing import DocKey, Piece

IGNORE_INDEX = -100
LABELS = ("next", "hf")


def build_micro_batch(
    rows: list[list[Piece]],
    tokens: dict[DocKey, np.ndarray],
    seq_len: int,
    pad_id: int,
    labels_as: str = "next",
) -> dict[str, torch.Tensor]:
    num_rows = len(rows)
    input_ids = np.full((num_rows, seq_len), pad_id, dtype=np.int64)
    labels = np.full((num_rows, seq_len), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((num_rows, seq_len), dtype=np.int64)
    doc_ids = np.full((num_rows, seq_len), -1, dtype=np.int64)
    source_ids = np.full((num_rows, seq_len), -1, dtype=np.int64)
    cu_seqlens = [0]
    for r, row in enumerate(rows):
        pos = 0
        for j, p in enumerate(row):
            doc = tokens[(p.source, p.doc)]
            n, end = p.length, pos + p.length
            input_ids[r, pos:end] = doc[p.start : p.start + n]
            if labels_as == "hf":
                labels[r, pos + 1 : end] = doc[p.start + 1 : p.start + n]
            else:
                # The target of a piece's last token is the document's next token, when it has
                # one: a document cut across rows or steps loses no prediction target.
                tail = doc[p.start + 1 : p.start + n + 1]
                labels[r, pos : pos + len(tail)] = tail
            position_ids[r, pos:end] = np.arange(n)
            doc_ids[r, pos:end] = j
            source_ids[r, pos:end] = p.source
            pos = end
            cu_seqlens.append(r * seq_len + pos)
        if pos < seq_len:
            cu_seqlens.append((r + 1) * seq_len)
    lengths = np.diff(cu_seqlens)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "doc_ids": torch.from_numpy(doc_ids),
        "source_ids": torch.from_numpy(source_ids),
        "cu_seqlens": torch.tensor(cu_seqlens, dtype=torch.int32),
        "max_seqlen": torch.tensor(int(lengths.max()) if len(lengths) else 0),
    }
