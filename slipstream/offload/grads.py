"""One bucket's gradient on the host (with W > 1 ranks: this rank's reduced slice), from the
moment backward produces it to the host step that reads it.

Fused (the default): the step's last micro-gradient stays where it was staged, in the model's
dtype (`buf`: 2 bytes per parameter of a bf16 model; the reduced fp32 slice with W > 1), and
the host step reads it there, in its own pass: no fp32 gradient is written and read back.
Earlier micro-steps of gradient accumulation are summed into an fp32 buffer (`acc`, made on
first use), which the step reads beside `buf`. The sum of squares that clipping needs is
taken per segment (a parameter; with W > 1 the slice) in the pass that stages it: clipping
costs no pass of its own.

Which micro-step is the last one the engine learns from `before_backward(last)`; not told,
it stages every micro-step, and a slot that still holds one when the next arrives is first
added into `acc` (the same sum in the same order: the same bits).

Two-pass (`fused=False`, kept to measure against): every micro-gradient is added into the
fp32 `acc` as it arrives, the norm is a pass over `acc`, and the step reads `acc`. Both give
the same bits: acc + g is the same fp32 sum either way, and the sums of squares are taken in
the same blocks.
"""

from __future__ import annotations

import torch

from slipstream.offload.buckets import Bucket
from slipstream.offload.hostmem import host_empty, host_zeros


class HostGrad:
    def __init__(self, bucket: Bucket, world: int, fused: bool, host, pin: bool) -> None:
        """`host`: the HostAdamW whose kernels add, stage and sum squares. `pin`: staging that
        a device's copies land in (CUDA)."""
        self.bucket, self.world, self.fused, self.host, self.pin = bucket, world, fused, host, pin
        self.size = bucket.padded // world
        if world == 1:  # one segment per parameter: its norm is taken when it arrives
            self.segments = [(o, o + p.numel()) for p, o in zip(bucket.params, bucket.offsets)]
        else:
            self.segments = [(0, self.size)]
        self.dtype = bucket.params[0].dtype if world == 1 else torch.float32
        # What the gradients land in: always when fused; two-pass only to take a device's copies.
        self.buf = host_empty(self.size, self.dtype, pin=pin) if fused or pin else None
        self.acc = None if fused else host_zeros(self.size)
        self.acc_live = not fused  # acc holds this step's earlier micro-steps
        n = len(self.segments)
        self.staged = [False] * n  # the segment's latest micro-gradient is in buf, not in acc
        self.sq: list[float | None] = [None] * n  # its whole gradient's sum of squares

    def like(self) -> HostGrad:
        """An empty twin (the delayed update fills one while the host steps the other)."""
        return HostGrad(self.bucket, self.world, self.fused, self.host, self.pin)

    def seg(self, t: torch.Tensor | None, j: int) -> torch.Tensor | None:
        if t is None:
            return None
        lo, hi = self.segments[j]
        return t[lo:hi]

    def _live_acc(self) -> torch.Tensor:
        """acc, zeroed if it holds nothing of this step yet."""
        if self.acc is None:
            self.acc = host_zeros(self.size)
        elif not self.acc_live:
            self.acc.zero_()
        self.acc_live = True
        return self.acc

    def _fold(self, j: int) -> None:
        """Segment j's staged micro-gradient into acc (its slot is about to be reused)."""
        acc = self._live_acc()
        self.host.add_grad(self.seg(acc, j), self.seg(self.buf, j))
        self.staged[j], self.sq[j] = False, None

    # -- a gradient computed on the host (CPU): handed over as it arrives ----------------------
    def put(self, j: int, src: torch.Tensor, last: bool) -> None:
        """Segment j's gradient of this micro-step (flat, the buffer's dtype)."""
        if not self.fused:
            self.host.add_grad(self.seg(self.acc, j), src)
            return
        if not last:  # more micro-steps follow: into the fp32 sum now
            if self.staged[j]:
                self._fold(j)
            self.host.add_grad(self.seg(self._live_acc(), j), src)
            self.sq[j] = None
            return
        fold = self.staged[j]
        acc = self._live_acc() if fold else self.acc if self.acc_live else None
        self.sq[j] = self.host.stage(self.seg(self.buf, j), src, self.seg(acc, j), fold)
        self.staged[j] = True

    # -- a device's copies (CUDA): landed in buf --------------------------------------------------
    def before_copy(self, j: int) -> None:
        """A copy is about to overwrite segment j's slot of buf."""
        if self.fused and self.staged[j]:
            self._fold(j)

    def landed(self, js: list[int], last: bool) -> None:
        """The copies into segments `js` of buf have landed (a host thread calls this)."""
        whole = len(js) == len(self.segments)
        if not self.fused or not last:
            acc = self.acc if not self.fused else self._live_acc()
            if whole:  # one pass over the buffer
                self.host.add_grad(acc, self.buf)
            else:
                for j in js:
                    self.host.add_grad(self.seg(acc, j), self.seg(self.buf, j))
            return
        acc = self.acc if self.acc_live else None
        for j in js:
            self.sq[j] = self.host.sumsq(self.seg(self.buf, j), self.seg(acc, j))
            self.staged[j] = True

    # -- the step -------------------------------------------------------------------------------
    def finish(self) -> tuple[tuple[torch.Tensor, torch.Tensor | None], float]:
        """What the host step reads, (g, acc): the gradient is acc + g; and its sum of
        squares (segment by segment, in order)."""
        if not self.fused:
            return (self.acc, None), sum(self.host.sumsq(self.seg(self.acc, j))
                                         for j in range(len(self.segments)))  # fmt: skip
        acc = self.acc if self.acc_live else None
        total = 0.0
        for j in range(len(self.segments)):
            if not self.staged[j]:  # no gradient this micro-step: the slot must read zero
                self.seg(self.buf, j).zero_()
                self.staged[j] = True
                self.sq[j] = self.host.sumsq(self.seg(acc, j)) if acc is not None else 0.0
            elif self.sq[j] is None:
                self.sq[j] = self.host.sumsq(self.seg(self.buf, j), self.seg(acc, j))
            total += self.sq[j]
        return (self.buf, acc), total

    def clear(self) -> None:
        """zero_grad: nothing of this step is kept."""
        if not self.fused:
            self.acc.zero_()
            return
        self.acc_live = False
        self.staged = [False] * len(self.segments)
        self.sq = [None] * len(self.segments)

    def gradient(self) -> torch.Tensor:
        """The fp32 gradient summed so far (a copy: for tests and inspection)."""
        if not self.fused:
            return self.acc.clone()
        out = self.acc.clone() if self.acc_live else torch.zeros(self.size)
        for j, staged in enumerate(self.staged):
            if staged:
                self.seg(out, j).add_(self.seg(self.buf, j))
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.buf, self.acc) if t is not None)
