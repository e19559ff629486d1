"""OffloadOptimizer: fp32 master weights, Adam moments and the optimizer step on the host; the
model keeps only its working copy (bf16, or fp32) and, briefly, each gradient. With a process
group of W data-parallel ranks it is ZeRO-2: each rank keeps and steps 1/W of the masters and
moments.

- Parameters are grouped into flat buckets, in the reverse of registration order (about the
  order backward produces their gradients), never mixing weight-decay groups. A bucket is
  padded to a multiple of W; rank r owns the r-th slice.
- A post-accumulate-grad hook moves each parameter's gradient to the host as soon as backward
  has produced it, and frees the model's gradient. With W > 1 the bucket is reduce-scattered
  on the device when its last gradient arrives, and only this rank's slice goes to the host
  (`streams.py`). Every micro-step of gradient accumulation is counted, none is dropped;
  `zero_grad()` clears the buffers.
- One fused host pass per step (`grads.py`): the step's last micro-gradient stays staged in
  the model's dtype and the host step reads it there (plus the fp32 sum of earlier
  micro-steps, if any), with its sum of squares taken as it was staged: 28 bytes per
  parameter of a bf16 model, no fp32 gradient buffer. `fused=False` is the two-pass path
  (add into fp32, a norm pass, a step over fp32) with the same bits.
- `step(max_norm)`: the gradients are summed over ranks, then averaged like DDP; the global
  norm is summed across ranks (segment by segment in a fixed order, so the same for any thread
  count);
  HostAdamW steps each slice with the clipping scale fused in and, for bf16 models, writes
  the slice's bf16 weights in the same pass; with W > 1 those slices are all-gathered on the
  device; the model's weights are written from them.
- Without clipping, fp16 or the delayed update, a bucket's host step starts as soon as its
  gradient is complete in the step's last backward (`early.py`), in a worker thread beside
  the rest of backward: the same update, bit for bit.
- `state_dict()` is this rank's slices only (one process: the whole state); the checkpoint
  writes one file per rank, and any number of ranks loads them, each reading what it needs.
- fp16 models get dynamic loss scaling (`loss_scale.py`): `begin_step` returns the factor
  the trainer multiplies the loss by.
- The delayed parameter update (`delayed.py`, opt-in, after `delay_start` ordinary steps).
  Checkpoints finish the step in flight, so a resumed run equals an uninterrupted one that
  checkpointed at the same steps.
- The engine implements the trainer's step-optimizer seam (`begin_step`, `before_backward`,
  `finish_backward`, `step`, `flush`, `meters`, `state_parts`), structurally: it imports
  nothing from the trainer.

On CUDA the gradients' copies run on a side stream into pinned staging buffers and are added
on the host by a worker thread, both overlapping the rest of backward (`streams.py`). Not for
use under DDP: this engine reduces the gradients itself.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from slipstream.comm import all_gather_single
from slipstream.offload.buckets import Bucket, chunk_params, make_bucket
from slipstream.offload.delayed import DelayedUpdate
from slipstream.offload.early import EarlySteps
from slipstream.offload.grads import HostGrad
from slipstream.offload.host_adam import HostAdamW
from slipstream.offload.loss_scale import LossScaler
from slipstream.offload.state import STATE_VERSION, load_slices, save_slices
from slipstream.offload.streams import GradMover

__all__ = ["STATE_VERSION", "OffloadOptimizer"]
PART = "optimizer"  # the state's name in a checkpoint; sharded: PART.shard<rank>


class OffloadOptimizer:
    def __init__(
        self,
        param_groups: list[dict],
        lr: float,
        betas: tuple[float, float],
        eps: float,
        num_threads: int = 0,
        bucket_numel: int = 16 * 2**20,
        group: dist.ProcessGroup | None = None,
        delayed_update: bool = False,
        delay_start: int = 0,
        device_group: dist.ProcessGroup | None = None,
        max_norm: float = float("inf"),
        tp_group: dist.ProcessGroup | None = None,
        fused: bool = True,
    ) -> None:
        """`group`: the data-parallel ranks over gloo (host tensors: the broadcast of the first
        weights, the norm); `device_group`: the same ranks on the device's backend (NCCL on
        GPUs) for the gradients' reduce-scatter and the weights' all-gather, `group` if not
        given. No group: one process. `max_norm`: the gradient clipping norm (inf: none).
        `tp_group`: the tensor-parallel peers over gloo, when the model is split: parameter
        groups marked `tp_sharded` hold this rank's slices, whose squares the global norm sums
        over the peers (the others are the same on every peer: counted once). `fused`: the
        one-pass host step (`grads.py`); False: the two-pass path, the same bits."""
        self.group, self.tp_group = group, tp_group
        self._sharded: set[torch.Tensor] = set()  # masters of tensor-parallel slices
        self.device_group = device_group if device_group is not None else group
        self.max_norm = max_norm
        self.delayed = DelayedUpdate(delayed_update, delay_start)
        self._num_steps = 0
        self.world = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.buckets: list[Bucket] = []
        host_groups = []
        for g in param_groups:
            params = [p for p in g["params"] if p.requires_grad]
            for chunk in chunk_params(list(reversed(params)), bucket_numel):
                bucket = make_bucket(chunk, self.world, self.rank, self.group)
                self.buckets.append(bucket)
                host_groups.append({"params": [bucket.master], "weight_decay": g["weight_decay"]})
                if g.get("tp_sharded"):
                    self._sharded.add(bucket.master)
        self.host = HostAdamW(host_groups, lr=lr, betas=betas, eps=eps, num_threads=num_threads)
        self.device = self.buckets[0].params[0].device if self.buckets else torch.device("cpu")
        self.fused = fused
        pin = self.device.type == "cuda"
        self.grads = [HostGrad(b, self.world, fused, self.host, pin) for b in self.buckets]
        self._spare: list[HostGrad | None] = [None] * len(self.buckets)  # the delayed update's
        self._last = True  # whether the backward under way is the step's last
        self.early = EarlySteps(self._step_bucket)
        self._busy_seen, self._acc_read = 0.0, False  # the host's busy seconds at the last stats()
        self._numel = sum(b.master.numel() for b in self.buckets)  # this rank's slices
        self.mover = GradMover(
            self.buckets, self.device, self.device_group, group, self.world,
            self.early.bucket_ready, grads=self.grads, last=lambda: self._last,
        )  # fmt: skip
        fp16 = any(b.params[0].dtype == torch.float16 for b in self.buckets)
        self.scaler = LossScaler(fp16)
        self._handles = [
            p.register_post_accumulate_grad_hook(self._hook(b, i))
            for b in self.buckets
            for i, p in enumerate(b.params)
        ]

    # -- the step-optimizer seam -----------------------------------------------------------
    def begin_step(self, lr: float) -> float:
        """The step's learning rate (every group); returns the loss scale (1 unless fp16)."""
        for g in self.host.param_groups:
            g["lr"] = lr
        return self.scaler.scale

    def before_backward(self, last: bool) -> None:
        """Before the step's last backward, without clipping, fp16 or the delayed update,
        each bucket's host step is armed to start as soon as its gradient is complete. Not
        when some parameter got no gradient earlier (its bucket never completes). Not the
        last: its gradients go into the fp32 sum as they arrive (the last one stays staged)."""
        self._last = last
        if not last:
            return
        armed = (
            not math.isfinite(self.max_norm)
            and not self.scaler.enabled
            and not self.delayed.active(self._num_steps)
            and self.mover.clean()
        )
        if armed:
            self.early.arm([g["lr"] for g in self.host.param_groups])

    def finish_backward(self) -> None:
        """Every gradient of the backward passes so far is in the host buffers (CUDA: the
        copies in flight have landed and been added). `step()` does it too."""
        self.mover.wait()

    wait_grads = finish_backward

    def meters(self) -> list:
        """Host seconds spent moving gradients or waiting for them, inside other phases."""
        return [("grad_offload", lambda: self.mover.exposed_s)]

    def stats(self) -> dict[str, float]:
        """The host step's seconds since the last call (with the delayed update, the step
        that finished in the background meanwhile), the bytes it moves per parameter, and
        the bandwidth that makes (bytes per second over the slices it stepped)."""
        busy, self._busy_seen = self.host.busy_s - self._busy_seen, self.host.busy_s
        row = {
            "offload/host_step_s": busy,
            "offload/host_bytes_per_param": self.host_bytes_per_param,
        }
        if busy > 0:
            row["offload/host_gb_per_s"] = self.host_bytes_per_param * self._numel / busy / 1e9
        return row

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale

    @property
    def early_steps(self) -> int:
        return self.early.num_steps

    @property
    def param_groups(self) -> list[dict]:
        return self.host.param_groups

    def gradient(self, k: int) -> torch.Tensor:
        """Bucket k's fp32 gradient summed so far (this rank's slice; a copy)."""
        return self.grads[k].gradient()

    @property
    def host_bytes_per_param(self) -> float:
        """Bytes the host step moves per parameter of this rank's slices: fused, the staged
        gradient (2 for a bf16 model, 4 for fp32) read, the master and moments read and
        written (24), the bf16 copy written (2 for bf16 models), and the fp32 sum of earlier
        micro-steps read (4) when the last step had one; two-pass, also the fp32 add (10 or
        12) and the norm's pass (4)."""
        if not self.grads:
            return 0.0
        g = self.grads[0]
        stage = g.dtype.itemsize
        out = 2 if self.buckets[0].working is not None else 0
        if self.fused:
            return stage + 24 + out + (4 if self._acc_read else 0)
        return (stage + 8) + 4 + (4 + 24 + out)

    def _step_bucket(self, k: int, lrs: list[float]) -> None:
        b = self.buckets[k]
        out = {b.master: b.working} if b.working is not None else None
        source, _ = self.grads[k].finish()
        # The scale `_launch` uses without clipping: clip = 1.0.
        self.host.step(grad_scale=1.0 / (self.world * self.scaler.scale), bf16_out=out,
                       only={b.master}, lrs=lrs, sources={b.master: source})  # fmt: skip

    def _hook(self, bucket: Bucket, i: int):
        def move_to_host(p: nn.Parameter) -> None:
            # Runs inside backward as soon as p's gradient is complete: on its way to the
            # bucket's fp32 host buffer; the model's copy is freed.
            self.mover.move(bucket, i, p)

        return move_to_host

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.mover.wait()  # no add in flight into the buffers cleared here
        for g in self.grads:
            g.clear()
        for b in self.buckets:
            for p in b.params:
                p.grad = None

    @torch.no_grad()
    def step(self, max_norm: float | None = None) -> float:
        """Reduce, clip to `max_norm` (the configured one unless given), step this rank's
        slices, gather and write back the new weights. Returns the global gradient norm
        before clipping.

        With the delayed update (after `delay_start` ordinary steps), the host step of this
        step's gradients runs in a background thread while the next forward and backward
        run, and its weights reach the model at the next `step()`: the gradient of step k is
        taken at the weights of step k - 2 (one update behind)."""
        max_norm = self.max_norm if max_norm is None else max_norm
        delayed = self.delayed.active(self._num_steps)
        self._num_steps += 1
        self._last = True  # the next step's backward passes, until told otherwise
        if not delayed:
            norm = self._launch(max_norm, background=False)
            self._write_back()
            return norm
        self.flush()  # the previous step's update reaches the model now
        return self._launch(max_norm, background=True)

    def flush(self) -> None:
        """Wait for a host step in flight and write its weights into the model (before a
        checkpoint, an evaluation and at the end of training)."""
        if self.delayed.join():
            self._write_back()

    def _launch(self, max_norm: float, background: bool) -> float:
        self.mover.wait()  # with W > 1 already summed over ranks: this rank's slices
        early = self.early.join()
        assert not early or not math.isfinite(max_norm), "buckets stepped early, then clipped"
        grads = list(self.grads)
        if background:  # the host step reads one set of buffers while backward fills the other
            for k, g in enumerate(grads):
                spare = self._spare[k] or g.like()
                self.grads[k], self._spare[k] = spare, g
        self._acc_read = any(g.acc_live for g in grads)  # the step reads an fp32 sum too
        parts = [g.finish() for g in grads]  # (what the step reads, sum of squares) per bucket
        sources = {b.master: src for b, (src, _) in zip(self.buckets, parts, strict=True)}
        sq = self._grad_sq_norm([s for _, s in parts])
        # Unscale by the scale these gradients were made with (before any growth below).
        made_with = self.scaler.scale
        norm = math.sqrt(sq) / made_with
        if not self.scaler.update(norm):  # fp16 overflow: this step is skipped
            return norm
        clip = 1.0 if not math.isfinite(max_norm) else min(1.0, max_norm / (norm + 1e-6))
        scale = clip / (self.world * made_with)
        outs = {b.master: b.working for b in self.buckets if b.working is not None}
        # The learning rates now: a background step must not see the next step's.
        lrs = [g["lr"] for g in self.host.param_groups]
        kwargs = {"grad_scale": scale, "bf16_out": outs or None, "lrs": lrs, "sources": sources}
        if early:  # stepped during backward (no clipping, so with this very scale)
            assert self.early.lrs == lrs, "the learning rate changed during the step"
            kwargs["only"] = {b.master for k, b in enumerate(self.buckets) if k not in early}
        if background:
            self.delayed.launch(lambda: self.host.step(**kwargs))
        else:
            self.host.step(**kwargs)
        return norm

    def _grad_sq_norm(self, sqs: list[float]) -> float:
        """The squared norm of the whole model's averaged gradient from each bucket's sum of
        squares (`sqs`, this rank's slices): summed over the data-parallel ranks, and
        tensor-parallel slices also over their peers."""
        if self.tp_group is None:
            sq = sum(sqs)
            if self.world > 1:
                t = torch.tensor([sq], dtype=torch.float64)
                dist.all_reduce(t, group=self.group)
                sq = float(t)
            return sq / self.world**2  # of the averaged gradient, as DDP would give
        split = [0.0, 0.0]  # tensor-parallel slices, the rest
        for b, s in zip(self.buckets, sqs, strict=True):
            split[b.master not in self._sharded] += s
        t = torch.tensor(split, dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(t, group=self.group)
        split = t[:1].clone()
        dist.all_reduce(split, group=self.tp_group)
        return float(split[0] + t[1]) / self.world**2

    @torch.no_grad()
    def _write_back(self) -> None:
        for b in self.buckets:
            # bf16 models: the weights the kernel wrote in its pass (half the bytes to move).
            src = b.working if b.working is not None else b.master
            if self.world > 1:  # every slice, gathered on the device (a transient)
                # Blocking: the next host step may rewrite `src` (the delayed update).
                mine = src.to(self.device)
                src = torch.empty(b.padded, dtype=src.dtype, device=self.device)
                all_gather_single(src, mine, group=self.device_group)
            for i, p in enumerate(b.params):
                p.copy_(b.view(src, i))

    # -- state: each rank's own slices; loads on any number of ranks --------------------------
    def state_dict(self) -> dict:
        """This rank's state (a host step in flight is finished first): `state.py`."""
        self.flush()
        return save_slices(self.buckets, self.host, self.world, self.rank,
                           num_steps=self._num_steps,  # where the delayed update's warm-up stands
                           **self.scaler.state_dict())  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """A whole state (one process's), or `{"shards": [...]}`: every rank's `state_dict()`
        of a sharded run, in rank order, saved with any number of ranks."""
        first = load_slices(self.buckets, self.host, self.rank, state)
        self._num_steps = int(first["num_steps"])
        self.scaler.load_state_dict(first)

    def state_parts(self) -> dict[str, dict]:
        """One process: the whole state; W ranks: every rank writes its own slices."""
        name = PART if self.world == 1 else f"{PART}.shard{self.rank}"
        return {name: self.state_dict()}

    def load_state_parts(self, parts) -> None:
        names = parts.names()
        if PART in names:
            self.load_state_dict(parts.load(PART))
            return
        shards = sorted((n for n in names if n.startswith(f"{PART}.shard")),
                        key=lambda n: int(n.rsplit("shard", 1)[1]))  # fmt: skip
        if not shards:
            raise ValueError(
                f"checkpoint: no offload optimizer state ({PART}.pt or {PART}.shard<rank>.pt; "
                f"found {names or 'none'}); resume with the recipe it was trained with"
            )
        self.load_state_dict({"shards": [parts.load(n, mmap=True) for n in shards]})

    def close(self) -> None:
        self.early.close()
        self.mover.close()
        for h in self._handles:
            h.remove()
        self._handles.clear()
