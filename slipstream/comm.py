"""Collectives under the names torch 2.13 gives them (`all_gather_single`,
`reduce_scatter_single`), falling back to the older names on releases that lack them, so no
rank prints a deprecation warning and older torch still runs. Shared by the pillars that call
them (offload, overlap)."""

from __future__ import annotations

import torch.distributed as dist

all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

__all__ = ["all_gather_single", "reduce_scatter_single"]
