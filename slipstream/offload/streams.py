"""Gradients from the device to the host during backward.

One process: on CUDA each gradient is copied on a side stream into its bucket's pinned staging
buffer (the model's dtype; `grads.py`), so backward keeps running while the copy crosses the
link; the device gradient is freed at once (the caching allocator keeps its memory until the
copy stream is done with it). When the last gradient of a bucket has been queued, a host
thread waits for that bucket's copies and hands them to the bucket's `HostGrad`: the step's
last micro-gradient stays staged (its sum of squares taken), earlier ones are added into the
fp32 sum, so the host work overlaps backward too.

W data-parallel ranks (ZeRO-2): each gradient is added into its bucket's whole-bucket fp32
buffer on the device, a transient that lives from the bucket's first gradient to its last;
then the bucket is reduce-scattered there (NCCL on GPUs: NVLink, not PCIe) and only this
rank's slice, 1/W of it, crosses to the host into the slice's staging.
Neither the link nor host memory ever carries the other ranks' slices. On CUDA the
reduce-scatter runs on the collective's stream and the copy stream waits for it, so both
overlap the rest of backward.

`wait()` (before the optimizer step) finishes what is in flight; the time it blocks is the
copy time backward did not hide (`exposed_s`), beside the copy streams' own busy time
(`copy_s`, from CUDA events).

On a CPU the "device" gradient is already in host memory: one process stages it (or adds it)
as it arrives; W ranks reduce-scatter each bucket (gloo) as it completes, as above.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist

from slipstream.comm import reduce_scatter_single
from slipstream.offload.buckets import Bucket


class GradMover:
    def __init__(
        self,
        buckets: list[Bucket],
        device: torch.device,
        group: dist.ProcessGroup | None = None,
        host_group: dist.ProcessGroup | None = None,
        world: int = 1,
        on_ready=None,
        grads: list | None = None,
        last=None,
    ) -> None:
        """`group`: the data-parallel ranks on the device's backend (the reduce-scatters);
        `host_group`: the same ranks over gloo (a few flags per step). Both only when W > 1.
        `grads[k]`: bucket k's `HostGrad` (the engine may swap them between steps); `last()`:
        whether this backward is the step's last."""
        assert grads is not None
        self.grads, self.last = grads, last or (lambda: True)
        self.buckets, self.group, self.host_group, self.world = buckets, group, host_group, world
        # Called with a bucket's index once its gradient of this backward is complete in the
        # host buffer (every parameter's; with W > 1 reduced): the engine may step it then.
        self.on_ready = on_ready or (lambda k: None)
        self.cuda = device.type == "cuda"
        self.exposed_s = 0.0  # host time spent moving or waiting for gradients
        self.copy_s = 0.0  # CUDA: the copy stream's busy time (summed per bucket)
        # CUDA: the event after the last copy that `wait()` saw land; with an event recorded
        # when backward ended it gives the copy time backward did not hide, on the device's
        # own clock (benchmarks/gpu_offload.py).
        self.last_copy_done: torch.cuda.Event | None = None
        self._index = {id(b): k for k, b in enumerate(buckets)}
        self._left = [len(b.params) for b in buckets]
        self._flat: list[torch.Tensor | None] = [None] * len(buckets)  # W > 1, on the device
        self._moved = False  # a gradient arrived since the last wait()
        if not self.cuda:
            return
        self.stream = torch.cuda.Stream(device)
        self._queued = [False] * len(buckets)
        # Which parameters of each bucket have a gradient in its staging buffer since the last
        # add: a bucket completed by `wait()` adds only those (the others' slots hold an older
        # backward's gradient, or nothing).
        self._written: list[set[int]] = [set() for _ in buckets]
        self._start: list[torch.cuda.Event | None] = [None] * len(buckets)
        self._timed: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._adds: list[Future | None] = [None] * len(buckets)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="slipstream-grad-add")

    def move(self, bucket: Bucket, i: int, p: torch.nn.Parameter) -> None:
        """Called by the post-accumulate-grad hook of parameter i of `bucket`."""
        t0 = time.perf_counter()
        self._moved = True
        k = self._index[id(bucket)]
        g = p.grad.detach()
        if self.world > 1:
            flat = self._flat[k]
            if flat is None:
                flat = self._flat[k] = torch.zeros(
                    bucket.padded, dtype=torch.float32, device=g.device
                )
            bucket.view(flat, i).add_(g)  # on the device's stream; fp32 from here on
            p.grad = None
            self._left[k] -= 1
            if self._left[k] == 0:
                self._reduce(k)
        elif not self.cuda:
            self.grads[k].put(i, g.reshape(-1), self.last())
            p.grad = None
            self._left[k] -= 1
            if self._left[k] == 0:
                self._left[k] = len(bucket.params)
                self.on_ready(k)
        else:
            self._await_add(k)  # the last micro-step's add must have read the staging buffer
            if i in self._written[k]:
                # Its slot still holds an earlier micro-step's gradient, never added: the
                # bucket did not complete then (some parameter got no gradient). Add what is
                # staged first (no early step: the bucket is not whole), then overwrite.
                self._finish(k, ready=False)
                self._await_add(k)
            self.grads[k].before_copy(i)  # a staged earlier micro-step goes into the fp32 sum
            self.stream.wait_stream(torch.cuda.current_stream(g.device))
            with torch.cuda.stream(self.stream):
                if self._start[k] is None:
                    self._start[k] = torch.cuda.Event(enable_timing=True)
                    self._start[k].record(self.stream)
                bucket.view(self.grads[k].buf, i).copy_(g, non_blocking=True)
            self._written[k].add(i)
            g.record_stream(self.stream)  # its memory is reused only after the copy
            p.grad = None
            self._queued[k] = True
            self._left[k] -= 1
            if self._left[k] == 0:
                self._finish(k)
        self.exposed_s += time.perf_counter() - t0

    def clean(self) -> bool:
        """No bucket holds part of a backward's gradients: each one's next `on_ready` will
        mean its gradient of the next backward is whole (False for good once some parameter
        gets no gradient, which leaves its bucket's count open)."""
        return all(n == len(b.params) for n, b in zip(self._left, self.buckets, strict=True))

    def _await_add(self, k: int) -> None:
        pending = self._adds[k]
        if pending is not None:
            pending.result()
            self._adds[k] = None

    def _reduce(self, k: int) -> None:
        """W > 1: bucket k's whole gradient is on the device; reduce-scatter it and bring this
        rank's slice to the host."""
        b, flat = self.buckets[k], self._flat[k]
        assert flat is not None
        self._flat[k], self._left[k] = None, len(b.params)
        hg = self.grads[k]
        if not self.cuda:
            mine = torch.empty(hg.size, dtype=torch.float32)
            reduce_scatter_single(mine, flat, group=self.group)
            hg.put(0, mine, self.last())
            self.on_ready(k)
            return
        self._await_add(k)
        hg.before_copy(0)
        mine = torch.empty(hg.size, dtype=torch.float32, device=flat.device)
        # Launched on the collective's stream, after what the device's stream queued so far
        # (the adds into `flat`); the copy stream waits for it, not the device's stream.
        work = reduce_scatter_single(mine, flat, group=self.group, async_op=True)
        start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            work.wait()
            start.record(self.stream)
            hg.buf.copy_(mine, non_blocking=True)
            done.record(self.stream)
        mine.record_stream(self.stream)
        self._timed.append((start, done))
        # The transients stay referenced until the copy has landed.
        self._adds[k] = self._pool.submit(self._add, k, done, [0], self.last(), (flat, mine, work))

    def _finish(self, k: int, ready: bool = True) -> None:
        """One process: the bucket's copies are queued; a host thread adds them once they have
        landed."""
        done = torch.cuda.Event(enable_timing=True)
        done.record(self.stream)
        self._timed.append((self._start[k], done))
        self._start[k], self._queued[k] = None, False
        self._left[k] = len(self.buckets[k].params)
        written, self._written[k] = sorted(self._written[k]), set()
        self._adds[k] = self._pool.submit(self._add, k, done, written, self.last(), ready=ready)

    def _add(self, k: int, done, written: list[int], last: bool, keep=None, ready=True) -> None:
        """Once the copies have landed: segments `written` of bucket k's staging hold this
        micro-step's gradient (a slot no gradient reached since the last hand-over is left
        out)."""
        done.synchronize()
        self.grads[k].landed(written, last)
        if ready:
            self.on_ready(k)

    def wait(self) -> None:
        """Every gradient of the backward passes so far is in the fp32 buffers (buckets whose
        parameters did not all get a gradient included). With W ranks, the buckets still open
        on any rank are reduced on every rank, in order (a few flags are exchanged first), so
        the ranks' collectives always match."""
        t0 = time.perf_counter()
        if self.world > 1 and self._moved:
            open_ = torch.tensor([f is not None for f in self._flat], dtype=torch.int32)
            dist.all_reduce(open_, op=dist.ReduceOp.MAX, group=self.host_group)
            for k in open_.nonzero().flatten().tolist():
                if self._flat[k] is None:  # no gradient here: this rank adds zeros
                    b = self.buckets[k]
                    self._flat[k] = torch.zeros(
                        b.padded, dtype=torch.float32, device=b.params[0].device
                    )
                self._reduce(k)
        self._moved = False
        if self.cuda:
            for k in range(len(self.buckets)):
                if self._queued[k]:
                    self._finish(k)
            for k in range(len(self.buckets)):
                self._await_add(k)
            self.copy_s += sum(a.elapsed_time(b) for a, b in self._timed) / 1e3
            if self._timed:  # one copy stream: the last recorded is the last to land
                self.last_copy_done = self._timed[-1][1]
            self._timed.clear()
        self.exposed_s += time.perf_counter() - t0

    def close(self) -> None:
        if self.cuda:
            self._pool.shutdown(wait=True)
