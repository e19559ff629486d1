"""OverlapGroup: a tensor-parallel group as the overlapped operations see it: which
implementation they use, their symmetric workspaces (one per operation and shape, created on
first use by every rank together), the producer thread that issues puts while the caller
computes, and the optional simulated link and event trace.

Implementations: `shm` and `cuda` (symmetric heap, tile-ordered put / signal / wait, each
shard sent in `chunks` row pieces), `collective` (`chunks` async torch.distributed collectives,
any backend), `reference` (one blocking collective, then the matmul: what the others are
checked against)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist

from slipstream.overlap.symmetric import Region, ShmHeap, SymmetricHeap
from slipstream.overlap.trace import SimLink, Trace

IMPLEMENTATIONS = ("shm", "cuda", "collective", "reference")


def create_heap(backend: str, nbytes: int, num_flags: int = 64, group=None) -> SymmetricHeap:
    if backend == "shm":
        return ShmHeap(nbytes, num_flags, group)
    if backend == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("symmetric heap 'cuda' needs a CUDA device; use 'shm' on CPU")
        from slipstream.overlap.cuda_heap import CudaHeap

        return CudaHeap(nbytes, num_flags, group)
    raise ValueError(f"symmetric heap backend {backend!r}: use 'shm' or 'cuda'")


@dataclass(slots=True)
class Workspace:
    """One operation's symmetric buffer and flags: `ready + src` is raised on a rank when
    src's data has landed in its buffer; `ack + dst` on a producer when dst has finished
    reading what that producer put there (so the next call may overwrite it)."""

    heap: SymmetricHeap
    buf: Region
    ready: int
    ack: int
    epoch: int = 0

    def next_epoch(self) -> int:
        self.epoch += 1
        return self.epoch

    def acknowledge(self, rank: int, world_size: int) -> None:
        """This rank is done with every slot of the current call: producers may overwrite."""
        for src in range(world_size):
            if src != rank:
                self.heap.signal(src, self.ack + rank, self.epoch)

    def abort(self) -> None:
        """Fail every rank's waits at once (the shm heap; the cuda one has no abort flag)."""
        flags = getattr(self.heap, "flags", None)
        if flags is not None:
            flags.abort()


class OverlapGroup:
    def __init__(
        self,
        group=None,
        impl: str = "shm",
        *,
        link: SimLink | None = None,
        trace: bool = False,
        chunks: int = 2,
        kernel: str = "torch",
        timeout_s: float | None = None,
    ) -> None:
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"overlap implementation {impl!r}: use one of {IMPLEMENTATIONS}")
        if kernel not in ("torch", "triton"):
            raise ValueError(f"overlap kernel {kernel!r}: use 'torch' or 'triton'")
        if chunks < 1:
            raise ValueError(f"overlap chunks {chunks}: use 1 or more")
        self.group = group
        self.impl, self.kernel, self.chunks = impl, kernel, chunks
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.world_size = dist.get_world_size(group) if dist.is_initialized() else 1
        self.link = link or SimLink()
        self.trace = Trace(self.rank) if trace else None
        self.timeout_s = timeout_s
        self._workspaces: dict[tuple, Workspace] = {}
        self._producer: ThreadPoolExecutor | None = None
        self._copy_stream = None
        self.exposed_s = 0.0
        """Seconds the calling thread has spent waiting for communication (not overlapped),
        summed over all calls: the trainer's profiler reads it as exposed communication."""

    @property
    def producer(self) -> ThreadPoolExecutor:
        """One thread issues this rank's puts in order (a rank's link sends one at a time)."""
        if self._producer is None:
            self._producer = ThreadPoolExecutor(1, thread_name_prefix="slipstream-put")
        return self._producer

    def copy_stream(
        self, tensor: torch.Tensor, owned: bool = True
    ) -> Callable[[], contextlib.AbstractContextManager]:
        """For the put thread: on CUDA, a context that runs its copies and signals on a side
        stream (so they overlap the caller's matmuls) after the caller's stream has produced
        `tensor` (an event recorded now, in the caller's thread); elsewhere, nothing. `owned`:
        `tensor` comes from the caching allocator (not a view of the symmetric heap), which
        must keep it until the side stream is done."""
        if not tensor.is_cuda:
            return contextlib.nullcontext
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(tensor.device)
        stream = self._copy_stream
        ready = torch.cuda.current_stream(tensor.device).record_event()
        if owned:
            tensor.record_stream(stream)  # the allocator keeps it until the side stream is done

        @contextlib.contextmanager
        def on_side_stream():
            with torch.cuda.stream(stream):
                stream.wait_event(ready)
                yield

        return on_side_stream

    def row_chunks(self, rows: int, geometric: bool = False) -> list[slice]:
        """The same split of `rows` on every rank, in `chunks` pieces (fewer if rows are few):
        equal, or `geometric` (each piece twice the one before, the first two equal: 1/8,
        1/8, 1/4, 1/2), so that a producer that computes what it sends gets the link busy
        after a small first matmul and does the rest in large, efficient ones."""
        n = min(self.chunks, max(rows, 1))
        weights = [1.0] + [2.0 ** max(i - 1, 0) for i in range(1, n)] if geometric else [1.0] * n
        cuts = torch.tensor([0.0, *weights]).cumsum(0) / sum(weights) * rows
        bounds = cuts.round().long().tolist()
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def record(self, kind: str, peer: int, call: int) -> None:
        if self.trace is not None:
            self.trace.record(kind, peer, call)

    def workspace(self, op: str, shape: tuple[int, ...], dtype: torch.dtype) -> Workspace:
        """The symmetric buffer of `op` at `shape` ([world, rows, cols]); every rank of the
        group reaches this at the same call, so creating it here is collective."""
        key = (op, shape, dtype)
        ws = self._workspaces.get(key)
        if ws is None:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            heap = create_heap(self.impl, nbytes, 2 * self.world_size, self.group)
            buf = heap.alloc(f"{op}.buf", shape, dtype)
            ready = heap.add_flags([f"{op}.ready[src={r}]" for r in range(self.world_size)])
            ack = heap.add_flags([f"{op}.ack[dst={r}]" for r in range(self.world_size)])
            ws = self._workspaces[key] = Workspace(heap, buf, ready, ack)
        return ws

    def wait(self, ws: Workspace, flag: int, value: int) -> None:
        waited = ws.heap.wait_until(flag, value, self.timeout_s)
        if not threading.current_thread().name.startswith("slipstream-put"):
            self.exposed_s += waited  # the caller's compute stood still: exposed

    @contextlib.contextmanager
    def exposed(self):
        """Time a blocking wait of the caller's as exposed communication."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.exposed_s += time.perf_counter() - t0

    def close(self) -> None:
        if self._producer is not None:
            self._producer.shutdown(wait=True)
            self._producer = None
        for ws in self._workspaces.values():
            ws.heap.close()
        self._workspaces.clear()
