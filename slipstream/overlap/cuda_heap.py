"""The `cuda` symmetric heap over torch's symmetric memory (torch.distributed._symmetric_memory):
peer buffers are device pointers into the other GPUs' memory (NVLink), flags live in each
rank's signal pad. Puts and signals are queued on the caller's (side) stream, so stream order
puts a flag after its data. Host-side waits poll the signal pad (a device sync per poll); the
Triton consumer kernel waits on the device instead. GPU only: not run on the CPU machines the
tests use.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist

from slipstream.overlap.flags import NUM_SYSTEM_FLAGS
from slipstream.overlap.symmetric import Region, _Arena, _round_up


class CudaHeap:
    """The cuda backend over torch's symmetric memory: peer buffers are device pointers on
    the other GPUs (NVLink), flags live in each rank's signal pad. Host-side waits poll (a
    device sync each time); the Triton consumer kernel waits on the device instead."""

    def __init__(self, nbytes: int, num_flags: int = 64, group=None, device=None) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        group = group or dist.group.WORLD
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.device = device or torch.device("cuda", torch.cuda.current_device())
        num_flags += NUM_SYSTEM_FLAGS
        self._arena = _Arena(_round_up(nbytes), num_flags)
        self._buf = symm_mem.empty(
            self._arena.capacity_bytes, dtype=torch.uint8, device=self.device
        )
        self._handle = symm_mem.rendezvous(self._buf, group.group_name)
        size = (self._arena.capacity_bytes,)
        self._bytes = [
            self._handle.get_buffer(r, size, torch.uint8) for r in range(self.world_size)
        ]
        pad = (num_flags, self.world_size)
        self.pads = [
            self._handle.get_signal_pad(r, pad, dtype=torch.int64) for r in range(self.world_size)
        ]
        self.pads[self.rank].zero_()
        self._handle.barrier()
        self._barrier_epoch = 0

    def alloc(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Region:
        return self._arena.alloc(name, shape, dtype)

    def add_flags(self, names: list[str]) -> int:
        return self._arena.add_flags(names)

    def peer(self, rank: int, region: Region) -> torch.Tensor:
        nbytes = int(np.prod(region.shape)) * torch.tensor([], dtype=region.dtype).element_size()
        start = region.offset_bytes
        return self._bytes[rank][start : start + nbytes].view(region.dtype).view(region.shape)

    def local(self, region: Region) -> torch.Tensor:
        return self.peer(self.rank, region)

    def put(self, rank: int, region: Region, src: torch.Tensor, index=...) -> None:
        self.peer(rank, region)[index].copy_(src, non_blocking=True)

    def signal(self, rank: int, flag: int, value: int, op: str = "set") -> None:
        # Stream order: this write is queued after the put on the same stream, so the peer
        # cannot see the flag before the data.
        slot = self.pads[rank][flag, self.rank : self.rank + 1]
        if op == "set":
            # A copy from pinned host memory: the copy engine writes the flag, no SM needed.
            # A kernel (fill_) would wait for a free SM, and this GPU's consumer kernel,
            # spinning on every SM for a peer's shard, could hold up the very signal that
            # peer's consumer waits for. The caching host allocator keeps the pinned value
            # until the copy has run.
            value_t = torch.tensor([value], dtype=torch.int64).pin_memory()
            slot.copy_(value_t, non_blocking=True)
        else:
            slot.add_(value)

    def wait_until(self, flag: int, value: int, timeout_s: float | None = None) -> float:
        t0 = time.monotonic()
        limit = 60.0 if timeout_s is None else timeout_s
        while int(self.pads[self.rank][flag].sum()) < value:
            if time.monotonic() - t0 > limit:
                raise TimeoutError(
                    f"rank {self.rank}: timed out waiting for flag {flag} "
                    f"({self._arena.flag_names[flag]}) >= {value}; flags: "
                    f"{self.pads[self.rank].tolist()}"
                )
        return time.monotonic() - t0

    def value(self, flag: int) -> int:
        return int(self.pads[self.rank][flag].sum())

    def flag_tensor(self, first: int, count: int) -> torch.Tensor:
        return self.pads[self.rank][first : first + count]

    def barrier(self) -> None:
        self._handle.barrier()

    def close(self) -> None:
        self._bytes, self.pads = [], []
