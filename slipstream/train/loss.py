"""The loss of packed batches: cross-entropy per target token, summed by the caller and
divided by the step's number of targets, so every token of a packed step weighs the same."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from slipstream.data.batch import IGNORE_INDEX


def token_losses(model, mb: dict[str, torch.Tensor], autocast: torch.dtype | None) -> torch.Tensor:
    """Cross-entropy of every position (0 where there is no target), flattened [B * T]."""
    device_type = mb["input_ids"].device.type
    ctx = torch.autocast(device_type, dtype=autocast) if autocast else nullcontext()
    with ctx:
        logits = model(
            mb["input_ids"],
            mb["position_ids"],
            mb["doc_ids"],
            mb["cu_seqlens"],
            int(mb["max_seqlen"]),
        )
    return F.cross_entropy(
        logits.float().flatten(0, 1),
        mb["labels"].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )


def num_targets(mb: dict[str, torch.Tensor]) -> int:
    return int((mb["labels"] != IGNORE_INDEX).sum())
