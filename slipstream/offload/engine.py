"""OffloadOptimizer: fp32 master weights, Adam moments and the optimizer step on the host; the
model keeps only its working copy (bf16, or fp32) and, briefly, each gradient. With a process
group of W data-parallel ranks it is ZeRO-2: each rank keeps and steps 1/W of the masters and
moments.

- Parameters are grouped into flat buckets, in the reverse of registration order (about the
  order backward produces their gradients), never mixing weight-decay groups. A bucket is
  padded to a multiple of W; rank r owns the r-th slice.
- A post-accumulate-grad hook moves each parameter's gradient toward its bucket's fp32 host
  buffer as soon as backward has produced it, and frees the model's gradient. With W > 1 the
  bucket is reduce-scattered on the device when its last gradient arrives, and only this
  rank's slice goes to the host (`streams.py`). Every micro-step of gradient accumulation is
  added, none is dropped; `zero_grad()` clears the buffers.
- `step(max_norm)`: the gradients are summed over ranks, then averaged like DDP; the global
  norm is summed across ranks (host sums in a fixed order, so the same for any thread count);
  HostAdamW steps each slice with the clipping scale fused in and, for bf16 models, writes
  the slice's bf16 weights in the same pass; with W > 1 those slices are all-gathered on the
  device; the model's weights are written from them.
- Without clipping, fp16 or the delayed update, a bucket's host step starts as soon as its
  gradient is complete in the step's last backward (`prepare_final_backward`), in a worker
  thread beside the rest of backward: the same update, bit for bit.
- `state_dict()` is this rank's slices only (one process: the whole state); the checkpoint
  writes one file per rank, and any number of ranks loads them, each reading what it needs.
- fp16 models get dynamic loss scaling: the trainer multiplies the loss by `loss_scale`; a
  step whose gradients overflow is skipped (no update, no Adam step) and the scale halved;
  after 2,000 clean steps it doubles.
- The delayed parameter update (DPU, opt-in, after `delay_start` ordinary steps): the host
  step of step k runs in a background thread during step k + 1's forward and backward, so the
  gradient of step k + 1 is taken one update behind. Checkpoints finish the step in flight,
  so a resumed run equals an uninterrupted one that checkpointed at the same steps.

On CUDA the gradients' copies run on a side stream into pinned staging buffers and are added
on the host by a worker thread, both overlapping the rest of backward (`streams.py`). Not for
use under DDP: this engine reduces the gradients itself.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist
from torch import nn

from slipstream.configfile import VERSION_KEY, check_version
from slipstream.offload.buckets import Bucket, chunk_params, make_bucket
from slipstream.offload.host_adam import HostAdamW
from slipstream.offload.hostmem import host_zeros
from slipstream.offload.streams import GradMover

STATE_VERSION = 2


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
    ) -> None:
        """`group`: the data-parallel ranks over gloo (host tensors: the broadcast of the first
        weights, the norm); `device_group`: the same ranks on the device's backend (NCCL on
        GPUs) for the gradients' reduce-scatter and the weights' all-gather, `group` if not
        given. No group: one process."""
        self.group = group
        self.device_group = device_group if device_group is not None else group
        self.delayed_update, self.delay_start = delayed_update, delay_start
        self._num_steps = 0
        # fp16 models: dynamic loss scaling. The trainer multiplies the loss by loss_scale;
        # a step whose gradients overflow is skipped and the scale halved; after
        # `growth_interval` clean steps it doubles.
        self.loss_scale, self.growth_interval, self._clean_steps = 1.0, 2000, 0
        self._pending: threading.Thread | None = None
        self._error: BaseException | None = None
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
        self.host = HostAdamW(host_groups, lr=lr, betas=betas, eps=eps, num_threads=num_threads)
        self.device = self.buckets[0].params[0].device if self.buckets else torch.device("cpu")
        self.mover = GradMover(
            self.buckets, self.device, self.device_group, group, self.world, self._bucket_ready,
            add=self.host.add_grad,
        )  # fmt: skip
        # Host steps of buckets whose gradient was complete during the last backward.
        self._armed = False
        self._early: dict[int, Future] = {}
        self._early_pool: ThreadPoolExecutor | None = None
        self.early_steps = 0  # buckets stepped during backward, over the run
        self._early_lrs: list[float] = []
        self.fp16 = any(b.params[0].dtype == torch.float16 for b in self.buckets)
        if self.fp16:
            self.loss_scale = 2.0**16
        self._handles = [
            p.register_post_accumulate_grad_hook(self._hook(b, i))
            for b in self.buckets
            for i, p in enumerate(b.params)
        ]

    def prepare_final_backward(self, lr: float, max_norm: float) -> None:
        """Called before the backward of a step's last micro-batch, with the step's learning
        rate. Without clipping (max_norm infinite), fp16 or the delayed update, each bucket's
        host step then starts as soon as its gradient is complete, while backward goes on:
        the same update, bit for bit (with clipping the scale is known only once every bucket
        is in). Not when some parameter got no gradient earlier (its bucket never completes)."""
        delayed = self.delayed_update and self._num_steps >= self.delay_start
        self._armed = (
            not math.isfinite(max_norm) and not self.fp16 and not delayed and self.mover.clean()
        )
        self._early_lrs = [lr] * len(self.host.param_groups)

    def _bucket_ready(self, k: int) -> None:
        if not self._armed:
            return
        if self._early_pool is None:
            self._early_pool = ThreadPoolExecutor(1, thread_name_prefix="slipstream-early-step")
        self._early[k] = self._early_pool.submit(self._step_bucket, k)

    def _step_bucket(self, k: int) -> None:
        b = self.buckets[k]
        out = {b.master: b.working} if b.working is not None else None
        # The scale `_launch` uses without clipping: clip = 1.0.
        self.host.step(grad_scale=1.0 / (self.world * self.loss_scale), bf16_out=out,
                       only={b.master}, lrs=self._early_lrs)  # fmt: skip

    def _join_early(self) -> set[int]:
        """The buckets stepped during backward (their host steps finished)."""
        done = set(self._early)
        for fut in self._early.values():
            fut.result()
        self._early.clear()
        self._armed = False
        self.early_steps += len(done)
        return done

    def _hook(self, bucket: Bucket, i: int):
        def move_to_host(p: nn.Parameter) -> None:
            # Runs inside backward as soon as p's gradient is complete: on its way to the
            # bucket's fp32 host buffer; the model's copy is freed.
            self.mover.move(bucket, i, p)

        return move_to_host

    @property
    def offload_s(self) -> float:
        """Host seconds spent moving gradients or waiting for them (the profiler reads it)."""
        return self.mover.exposed_s

    # -- the optimizer interface the trainer uses -------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        return self.host.param_groups  # the trainer sets the learning rate here

    def wait_grads(self) -> None:
        """Every gradient of the backward passes so far is in the host buffers (CUDA: the
        copies in flight have landed and been added). `step()` does it too."""
        self.mover.wait()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.mover.wait()  # no add in flight into the buffers cleared here
        for b in self.buckets:
            b.grad.zero_()
            for p in b.params:
                p.grad = None

    @torch.no_grad()
    def step(self, max_norm: float = float("inf")) -> float:
        """Reduce, clip to `max_norm`, step this rank's slices, gather and write back the new
        weights. Returns the global gradient norm before clipping.

        With the delayed update (after `delay_start` ordinary steps), the host step of this
        step's gradients runs in a background thread while the next forward and backward
        run, and its weights reach the model at the next `step()`: the gradient of step k is
        taken at the weights of step k - 2 (one update behind)."""
        delayed = self.delayed_update and self._num_steps >= self.delay_start
        self._num_steps += 1
        if not delayed:
            norm = self._launch(max_norm, background=False)
            self._write_back()
            return norm
        self.flush()  # the previous step's update reaches the model now
        return self._launch(max_norm, background=True)

    def flush(self) -> None:
        """Wait for a host step in flight and write its weights into the model (before a
        checkpoint, an evaluation and at the end of training)."""
        if self._pending is None:
            return
        self._pending.join()
        self._pending = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        self._write_back()

    def _launch(self, max_norm: float, background: bool) -> float:
        self.mover.wait()  # with W > 1 already summed over ranks: this rank's slices
        early = self._join_early()
        if background:  # the host step reads one buffer while backward fills the other
            for b in self.buckets:
                if b.master.grad is b.grad:
                    b.master.grad = host_zeros(b.grad.numel())
                b.master.grad, b.grad = b.grad, b.master.grad
        sq = self.host.grad_sq_norm()
        if self.world > 1:
            t = torch.tensor([sq], dtype=torch.float64)
            dist.all_reduce(t, group=self.group)
            sq = float(t) / self.world**2  # of the averaged gradient, as DDP would give
        norm = math.sqrt(sq) / self.loss_scale
        if self.fp16 and not math.isfinite(norm):  # overflow: skip this step, scale down
            self.loss_scale, self._clean_steps = max(self.loss_scale / 2, 1.0), 0
            return norm
        clip = 1.0 if not math.isfinite(max_norm) else min(1.0, max_norm / (norm + 1e-6))
        # Unscale by the scale these gradients were made with (before any growth below).
        scale = clip / (self.world * self.loss_scale)
        if self.fp16:
            self._clean_steps += 1
            if self._clean_steps == self.growth_interval:
                self.loss_scale, self._clean_steps = self.loss_scale * 2, 0
        outs = {b.master: b.working for b in self.buckets if b.working is not None}
        # The learning rates now: a background step must not see the next step's.
        lrs = [g["lr"] for g in self.host.param_groups]
        kwargs = {"grad_scale": scale, "bf16_out": outs or None, "lrs": lrs}
        if early:  # stepped during backward (no clipping, so with this very scale)
            if self._early_lrs != lrs:
                raise ValueError(
                    "offload: the learning rate changed between prepare_final_backward() and "
                    "step(); pass the step's rate to both"
                )
            kwargs["only"] = {b.master for k, b in enumerate(self.buckets) if k not in early}
        if not background:
            self.host.step(**kwargs)
            return norm
        # The kernel is called through ctypes, which releases the GIL: it runs beside the
        # next forward and backward. Collectives stay on the calling thread.
        self._pending = threading.Thread(
            target=self._run_host_step, kwargs=kwargs, name="slipstream-host-adam", daemon=True
        )
        self._pending.start()
        return norm

    def _run_host_step(self, **kwargs) -> None:
        try:
            self.host.step(**kwargs)
        except BaseException as e:  # raised on the training thread at the next flush
            self._error = e

    @torch.no_grad()
    def _write_back(self) -> None:
        for b in self.buckets:
            # bf16 models: the weights the kernel wrote in its pass (half the bytes to move).
            src = b.working if b.working is not None else b.master
            if self.world > 1:  # every slice, gathered on the device (a transient)
                # Blocking: the next host step may rewrite `src` (the delayed update).
                mine = src.to(self.device)
                src = torch.empty(b.padded, dtype=src.dtype, device=self.device)
                dist.all_gather_into_tensor(src, mine, group=self.device_group)
            for i, p in enumerate(b.params):
                p.copy_(b.view(src, i))

    # -- state: each rank's own slices; loads on any number of ranks --------------------------
    def state_dict(self) -> dict:
        """This rank's state (a host step in flight is finished first). One process: the whole
        state. With W ranks, this rank's slices only, marked `shard` (no gather: a rank never
        holds the whole optimizer state); the checkpoint writes one file per rank and
        `load_state_dict` takes all of them, on any number of ranks."""
        self.flush()
        buckets = []
        for b in self.buckets:
            st = self.host.state.get(b.master, {})
            keep = b.numel if self.world == 1 else b.master.numel()
            entry = {
                "numel": b.numel,
                "master": b.master.detach()[:keep].clone(),
                "step": float(st.get("step", 0.0)),
            }
            for key in ("exp_avg", "exp_avg_sq"):
                entry[key] = st[key].detach()[:keep].clone() if key in st else None
            buckets.append(entry)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.host.param_groups]
        out = {
            VERSION_KEY: STATE_VERSION,
            "buckets": buckets,
            "groups": groups,
            "num_steps": self._num_steps,  # where the delayed update's warm-up stands
            "loss_scale": self.loss_scale,
            "clean_steps": self._clean_steps,
        }
        if self.world > 1:
            out["shard"] = {"rank": self.rank, "world": self.world}
        return out

    def load_state_dict(self, state: dict) -> None:
        """A whole state (one process's), or `{"shards": [...]}`: every rank's `state_dict()`
        of a sharded run, in rank order, saved with any number of ranks."""
        shards = state.get("shards", [state])
        for st in shards:
            check_version(st, STATE_VERSION, "offload optimizer state")
        world = shards[0].get("shard", {}).get("world", 1)
        if [st.get("shard", {}).get("rank", 0) for st in shards] != list(range(world)):
            raise ValueError(
                f"offload optimizer state: {len(shards)} shard(s) of a {world}-rank run; "
                "every rank's file is needed (checkpoints/.../optimizer*.shard<rank>.pt)"
            )
        first = shards[0]
        numels = [e.get("numel", e["master"].numel()) for e in first["buckets"]]
        if numels != [b.numel for b in self.buckets]:
            raise ValueError(
                "offload optimizer state: its buckets do not match this model's; resume with "
                "the model and bucket size it was saved with"
            )
        for g, saved in zip(self.host.param_groups, first["groups"], strict=True):
            g.update(saved)
        self._num_steps = int(first["num_steps"])
        self.loss_scale, self._clean_steps = float(first["loss_scale"]), int(first["clean_steps"])
        with torch.no_grad():
            for k, b in enumerate(self.buckets):
                saved = [st["buckets"][k] for st in shards]
                size = b.master.numel()  # this run's slice, padded to its world size
                lo, hi = self.rank * size, min((self.rank + 1) * size, b.numel)
                full = torch.zeros(b.padded, dtype=torch.float32)  # a transient
                full[: b.numel].copy_(_span([e["master"] for e in saved], 0, b.numel))
                b.master.copy_(full[self.rank * size : (self.rank + 1) * size])
                if saved[0]["exp_avg"] is not None:
                    st = self.host.state[b.master]
                    st["step"] = torch.tensor(saved[0]["step"])
                    for key in ("exp_avg", "exp_avg_sq"):
                        mine = host_zeros(size)
                        if hi > lo:
                            mine[: hi - lo].copy_(_span([e[key] for e in saved], lo, hi))
                        st[key] = mine
                for i, p in enumerate(b.params):
                    p.copy_(b.view(full, i))

    def close(self) -> None:
        self._join_early()
        if self._early_pool is not None:
            self._early_pool.shutdown(wait=True)
        self.mover.close()
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _span(parts: list[torch.Tensor], lo: int, hi: int) -> torch.Tensor:
    """Elements [lo, hi) of the concatenation of `parts` (equal sizes but the last), reading
    only the parts that overlap it (memory-mapped shards stay on disk otherwise)."""
    out, start = [], 0
    for t in parts:
        a, b = max(lo, start), min(hi, start + t.numel())
        if a < b:
            out.append(t[a - start : b - start])
        start += t.numel()
    if start < hi:
        raise ValueError(f"offload optimizer state: {start} elements saved, {hi} needed")
    return torch.cat(out) if len(out) != 1 else out[0]
