"""Flat host buckets: parameters grouped so the host steps a few large buffers, each padded to
a multiple of the data-parallel world size so that every rank owns an equal slice (ZeRO-2) and
holds nothing of the others' (not their gradients, not their weights)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from slipstream.offload.hostmem import host_empty, host_zeros


@dataclass(slots=True)
class Bucket:
    params: list[nn.Parameter]
    offsets: list[int]
    numel: int  # real elements
    padded: int  # numel rounded up to a multiple of the world size: W equal slices
    master: torch.Tensor  # fp32 host, this rank's slice (one process: the whole bucket)
    working: torch.Tensor | None  # bf16 host copy of the slice's new weights (bf16 models)

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        p = self.params[i]
        return flat[self.offsets[i] : self.offsets[i] + p.numel()].view(p.shape)


def make_bucket(
    params: list[nn.Parameter], world: int, rank: int, group: dist.ProcessGroup | None
) -> Bucket:
    """A bucket over `params`, padded to a multiple of `world`, holding rank `rank`'s slice.
    Host memory per rank: 4 (+ 2 for bf16) bytes per element of its slice, beside its
    gradient (`grads.py`); the whole bucket exists only briefly (the first broadcast here; each backward's transient on the
    device, `streams.py`)."""
    if any(p.dtype != params[0].dtype for p in params):
        raise ValueError("optim.offload: every parameter must have the same dtype")
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += p.numel()
    padded = -(-total // world) * world
    # The buffers the new weights leave from are pinned on CUDA: copies from pinned memory run
    # at the link's speed and do not stage through a bounce buffer. The others are in huge
    # pages, which the host step streams faster (hostmem.py).
    bf16 = params[0].dtype == torch.bfloat16
    pin = params[0].is_cuda
    full = host_zeros(padded, pin=pin and world == 1 and not bf16)
    for p, o in zip(params, offsets, strict=True):
        full[o : o + p.numel()].copy_(p.detach().reshape(-1))
    if world > 1:  # every rank starts from rank 0's weights, as DDP would make sure
        dist.broadcast(full, src=dist.get_global_rank(group, 0), group=group)
        with torch.no_grad():
            for p, o in zip(params, offsets, strict=True):
                p.copy_(full[o : o + p.numel()].view(p.shape))
    size = padded // world
    master = full
    if world > 1:
        master = host_empty(size, pin=pin and not bf16)
        master.copy_(full[rank * size : (rank + 1) * size])
        del full
    # bf16 models: the host step writes the slice's bf16 weights in the same pass, and these
    # are what go back to the device (and, W > 1, what the ranks gather).
    working = host_empty(size, torch.bfloat16, pin=pin) if bf16 else None
    return Bucket(params, offsets, total, padded, master, working)


def chunk_params(params: list[nn.Parameter], bucket_numel: int) -> list[list[nn.Parameter]]:
    out: list[list[nn.Parameter]] = [[]]
    size = 0
    for p in params:
        if out[-1] and size + p.numel() > bucket_numel:
            out.append([])
            size = 0
        out[-1].append(p)
        size += p.numel()
    return [c for c in out if c]
