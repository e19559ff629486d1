"""SymmetricHeap: the same buffer on every rank of a group, each rank able to write any rank's
copy (`put`), raise any rank's flags (`signal`) and wait on its own (`wait_until`). The OpenSHMEM
model that the overlapped operations are written against; this file owns the memory, not the
operations.

Backends: `shm`, processes on one machine, each rank's segment in /dev/shm mapped by every
rank and unlinked as soon as all have mapped it (so nothing is left behind, even after a
crash); `cuda`, torch's symmetric memory (GPU only). NVSHMEM would be a third: the protocol
is alloc / local / peer / put / signal / wait_until / barrier.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import mmap
import os
import secrets
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from slipstream.overlap.flags import BARRIER, NUM_SYSTEM_FLAGS, FlagTable, process_alive

ALIGN_BYTES = 64
SHM_DIR = "/dev/shm"
SHM_PREFIX = "slipstream-heap"


@dataclass(frozen=True, slots=True)
class Region:
    """A named piece of the heap, at the same offset on every rank."""

    name: str
    offset_bytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


class SymmetricHeap(Protocol):
    rank: int
    world_size: int

    def alloc(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Region: ...
    def add_flags(self, names: list[str]) -> int: ...
    def local(self, region: Region) -> torch.Tensor: ...
    def peer(self, rank: int, region: Region) -> torch.Tensor: ...
    def put(self, rank: int, region: Region, src: torch.Tensor, index=...) -> None: ...
    def signal(self, rank: int, flag: int, value: int, op: str = "set") -> None: ...
    def wait_until(self, flag: int, value: int, timeout_s: float | None = None) -> float: ...
    def value(self, flag: int) -> int: ...
    def barrier(self) -> None: ...
    def close(self) -> None: ...


def _round_up(n: int, to: int = ALIGN_BYTES) -> int:
    return (n + to - 1) // to * to


class _Arena:
    """Bump allocation of regions and flags; every rank makes the same calls in the same order,
    so offsets agree without talking."""

    def __init__(self, capacity_bytes: int, max_flags: int) -> None:
        self.capacity_bytes, self.max_flags = capacity_bytes, max_flags
        self.used_bytes = 0
        self.flag_names = ["system.abort", "system.barrier"]

    def alloc(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Region:
        nbytes = int(np.prod(shape)) * torch.tensor([], dtype=dtype).element_size()
        if self.used_bytes + nbytes > self.capacity_bytes:
            raise ValueError(
                f"symmetric heap: {name} needs {nbytes} bytes and {self.capacity_bytes - self.used_bytes} "
                f"of {self.capacity_bytes} are free; create the heap with a larger nbytes"
            )
        region = Region(name, self.used_bytes, tuple(shape), dtype)
        self.used_bytes = _round_up(self.used_bytes + nbytes)
        return region

    def add_flags(self, names: list[str]) -> int:
        base = len(self.flag_names)
        if base + len(names) > self.max_flags:
            raise ValueError(
                f"symmetric heap: {len(names)} more flags do not fit in {self.max_flags}; create "
                "the heap with a larger num_flags"
            )
        self.flag_names.extend(names)
        return base


def _group_rank0(group) -> int:
    return dist.get_global_rank(group, 0) if group is not None else 0


def remove_stale_segments() -> int:
    """Unlink segments whose creator has died before mapping completed; returns the count."""
    removed = 0
    for path in glob.glob(f"{SHM_DIR}/{SHM_PREFIX}-*"):
        try:
            pid = int(path.rsplit("-", 1)[1])
        except ValueError:
            continue
        if not process_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed += 1
    return removed


class ShmHeap:
    """The shm backend. Layout of each rank's segment: [pid, 7 spare int64]
    [flags: int64 num_flags x world] [data: nbytes]."""

    def __init__(self, nbytes: int, num_flags: int = 64, group=None) -> None:
        if not os.path.isdir(SHM_DIR):
            raise ValueError(f"symmetric heap 'shm' needs {SHM_DIR} (Linux); use 'collective'")
        self.group = group
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.world_size = dist.get_world_size(group) if dist.is_initialized() else 1
        num_flags += NUM_SYSTEM_FLAGS
        self._arena = _Arena(_round_up(nbytes), num_flags)
        self._flags_offset = ALIGN_BYTES
        self._data_offset = _round_up(self._flags_offset + num_flags * self.world_size * 8)
        size = self._data_offset + self._arena.capacity_bytes
        remove_stale_segments()
        free = os.statvfs(SHM_DIR)
        if free.f_bavail * free.f_frsize < size * self.world_size:
            # tmpfs pages are taken on first touch: a full /dev/shm would kill with SIGBUS later
            raise ValueError(
                f"symmetric heap: {SHM_DIR} has {free.f_bavail * free.f_frsize >> 20} MiB free, "
                f"{size * self.world_size >> 20} MiB are needed; enlarge it (docker: --shm-size) "
                "or use parallel.overlap = 'collective'"
            )
        token = [secrets.token_hex(6) if self.rank == 0 else None]
        if self.world_size > 1:
            dist.broadcast_object_list(token, src=_group_rank0(group), group=group)
        own = self._path(token[0], self.rank, os.getpid())
        self._maps = [None] * self.world_size
        self._maps[self.rank] = self._create(own, size)
        pids = [None] * self.world_size
        if self.world_size > 1:
            dist.all_gather_object(pids, os.getpid(), group=group)
            for r in range(self.world_size):
                if r != self.rank:
                    self._maps[r] = self._open(self._path(token[0], r, pids[r]), size)
            dist.barrier(group)  # all have mapped every segment: the names can go
        else:
            pids = [os.getpid()]
        os.unlink(own)
        atexit.unregister(self._unlink_own)
        self._bytes = [torch.frombuffer(m, dtype=torch.uint8) for m in self._maps]
        self._num_flags = num_flags
        tables = [
            np.frombuffer(m, np.int64, num_flags * self.world_size, self._flags_offset).reshape(
                num_flags, self.world_size
            )
            for m in self._maps
        ]
        self.flags = FlagTable(self.rank, tables[self.rank], tables, pids, self._arena.flag_names)
        self._barrier_epoch = 0

    @staticmethod
    def _path(token: str, rank: int, pid: int) -> str:
        return f"{SHM_DIR}/{SHM_PREFIX}-{token}-r{rank}-{pid}"

    def _create(self, path: str, size: int) -> mmap.mmap:
        self._own_path = path
        atexit.register(self._unlink_own)  # until unlinked: a crash before then leaves nothing
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            return mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def _unlink_own(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._own_path)

    @staticmethod
    def _open(path: str, size: int) -> mmap.mmap:
        fd = os.open(path, os.O_RDWR)
        try:
            return mmap.mmap(fd, size)
        finally:
            os.close(fd)

    # -- the protocol ------------------------------------------------------------------------
    def alloc(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Region:
        return self._arena.alloc(name, shape, dtype)

    def add_flags(self, names: list[str]) -> int:
        return self._arena.add_flags(names)

    def peer(self, rank: int, region: Region) -> torch.Tensor:
        start = self._data_offset + region.offset_bytes
        nbytes = int(np.prod(region.shape)) * torch.tensor([], dtype=region.dtype).element_size()
        return self._bytes[rank][start : start + nbytes].view(region.dtype).view(region.shape)

    def local(self, region: Region) -> torch.Tensor:
        return self.peer(self.rank, region)

    def put(self, rank: int, region: Region, src: torch.Tensor, index=...) -> None:
        self.peer(rank, region)[index].copy_(src)

    def signal(self, rank: int, flag: int, value: int, op: str = "set") -> None:
        self.flags.signal(rank, flag, value, op)

    def wait_until(self, flag: int, value: int, timeout_s: float | None = None) -> float:
        return self.flags.wait_until(flag, value, timeout_s)

    def value(self, flag: int) -> int:
        return self.flags.value(flag)

    def flag_tensor(self, first: int, count: int) -> torch.Tensor:
        """This rank's flags [first, first + count) as an int64 tensor [count, world] over the
        shared words, for a kernel that waits on them itself."""
        words = self._bytes[self.rank][self._flags_offset : self._data_offset].view(torch.int64)
        table = words[: self._num_flags * self.world_size].view(self._num_flags, self.world_size)
        return table[first : first + count]

    def barrier(self) -> None:
        """Every rank raises its barrier slot everywhere, then waits for all slots."""
        self._barrier_epoch += 1
        for r in range(self.world_size):
            self.signal(r, BARRIER, self._barrier_epoch)
        self.wait_until(BARRIER, self._barrier_epoch * self.world_size)

    def close(self) -> None:
        """Drop the mappings (the segments are already unlinked; the memory goes with the last
        mapping). Views handed out keep a mapping alive until they are freed."""
        self._bytes, self.flags = [], None
        for m in self._maps:
            with contextlib.suppress(BufferError):
                m.close()
        self._maps = []
