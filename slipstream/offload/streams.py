"""Gradients from the device to the host during backward.

On CUDA each gradient is copied on a side stream into its bucket's pinned staging buffer (the
model's dtype), so backward keeps running while the copy crosses the link; the device
gradient is freed at once (the caching allocator keeps its memory until the copy stream is
done with it). When the last gradient of a bucket has been queued, a host thread waits for
that bucket's copies and adds the staging buffer into the bucket's fp32 gradient, so the host
work overlaps backward too. `wait()` (before the optimizer step) finishes what is in flight;
the time it blocks is the copy time backward did not hide (`exposed_s`), beside the copy
streams' own busy time (`copy_s`, from CUDA events).

On a CPU the "device" gradient is already in host memory: it is added straight into the fp32
buffer (the same result).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from slipstream.offload.buckets import Bucket


class GradMover:
    def __init__(self, buckets: list[Bucket], device: torch.device) -> None:
        self.buckets = buckets
        self.cuda = device.type == "cuda"
        self.exposed_s = 0.0  # host time spent moving or waiting for gradients
        self.copy_s = 0.0  # CUDA: the copy stream's busy time (summed per bucket)
        self._index = {id(b): k for k, b in enumerate(buckets)}
        if not self.cuda:
            return
        self.stream = torch.cuda.Stream(device)
        dtype = buckets[0].params[0].dtype if buckets else torch.bfloat16
        self.staging = [torch.empty(b.grad.numel(), dtype=dtype, pin_memory=True) for b in buckets]
        self._left = [len(b.params) for b in buckets]
        self._queued = [False] * len(buckets)
        self._start: list[torch.cuda.Event | None] = [None] * len(buckets)
        self._timed: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._adds: list[Future | None] = [None] * len(buckets)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="slipstream-grad-add")

    def move(self, bucket: Bucket, i: int, p: torch.nn.Parameter) -> None:
        """Called by the post-accumulate-grad hook of parameter i of `bucket`."""
        t0 = time.perf_counter()
        if not self.cuda:
            bucket.view(bucket.grad, i).add_(p.grad.detach().to(torch.float32))
            p.grad = None
            self.exposed_s += time.perf_counter() - t0
            return
        k = self._index[id(bucket)]
        pending = self._adds[k]
        if pending is not None:  # the last micro-step's add must have read the staging buffer
            pending.result()
            self._adds[k] = None
        g = p.grad.detach()
        self.stream.wait_stream(torch.cuda.current_stream(g.device))
        with torch.cuda.stream(self.stream):
            if self._start[k] is None:
                self._start[k] = torch.cuda.Event(enable_timing=True)
                self._start[k].record(self.stream)
            bucket.view(self.staging[k], i).copy_(g, non_blocking=True)
        g.record_stream(self.stream)  # its memory is reused only after the copy
        p.grad = None
        self._queued[k] = True
        self._left[k] -= 1
        if self._left[k] == 0:
            self._finish(k)
        self.exposed_s += time.perf_counter() - t0

    def _finish(self, k: int) -> None:
        """The bucket's copies are queued: a host thread adds them once they have landed."""
        done = torch.cuda.Event(enable_timing=True)
        done.record(self.stream)
        self._timed.append((self._start[k], done))
        self._start[k], self._queued[k] = None, False
        self._left[k] = len(self.buckets[k].params)
        self._adds[k] = self._pool.submit(self._add, k, done)

    def _add(self, k: int, done: torch.cuda.Event) -> None:
        done.synchronize()
        self.buckets[k].grad.add_(self.staging[k])  # bf16 -> fp32 in the add, no temporary

    def wait(self) -> None:
        """Every gradient of this backward is in the fp32 buffers (buckets whose parameters
        did not all get a gradient included)."""
        if not self.cuda:
            return
        t0 = time.perf_counter()
        for k in range(len(self.buckets)):
            if self._queued[k]:
                self._finish(k)
        for k, fut in enumerate(self._adds):
            if fut is not None:
                fut.result()
                self._adds[k] = None
        self.exposed_s += time.perf_counter() - t0
        self.copy_s += sum(a.elapsed_time(b) for a, b in self._timed) / 1e3
        self._timed.clear()

    def close(self) -> None:
        if self.cuda:
            self._pool.shutdown(wait=True)
