"""Document masks shared by every model: with packing, a token may attend only to earlier
tokens of its own document. Shapes: B rows, T tokens per row."""

from __future__ import annotations

import torch


def document_mask(doc_ids_BT: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool: query i sees key j when j <= i and both are in the same document
    (padding, doc id -1, sees only padding, so no row is empty)."""
    T = doc_ids_BT.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids_BT.device).tril()
    same = doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :]
    return (same & causal)[:, None]
