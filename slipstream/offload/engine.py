"""OffloadOptimizer: fp32 master weights, Adam moments and the optimizer step on the host; the
model keeps only its working copy (bf16, or fp32) and, briefly, each gradient.

- Parameters are grouped into flat buckets, in the reverse of registration order (about the
  order backward produces their gradients), never mixing weight-decay groups.
- A post-accumulate-grad hook adds each parameter's gradient into its bucket's fp32 host
  buffer as soon as backward has produced it, and frees the model's gradient. Every micro-step
  of gradient accumulation is added, none is dropped; the host buffers are cleared at
  `zero_grad()`.
- `step(max_norm)` clips by the global norm (computed on the host, the same for any thread
  count), runs HostAdamW bucket by bucket with the clipping scale and the bf16 copy-out fused
  in, and writes the new weights back into the model in its dtype.

This is the single-process engine on any device; on CUDA the copies are plain synchronous
copies for now (a side stream with pinned buffers, ZeRO-2 sharding across ranks and a delayed
update are the next steps). Not for use under DDP: DDP reduces gradients through its own hooks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from slipstream.offload.host_adam import HostAdamW

STATE_VERSION = 1


@dataclass(slots=True)
class Bucket:
    params: list[nn.Parameter]
    offsets: list[int]
    master: torch.Tensor  # fp32 host, flat; its .grad is the flat host gradient
    working: torch.Tensor | None  # bf16 host staging of the new weights (bf16 models only)

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        p = self.params[i]
        return flat[self.offsets[i] : self.offsets[i] + p.numel()].view(p.shape)


class OffloadOptimizer:
    def __init__(
        self,
        param_groups: list[dict],
        lr: float,
        betas: tuple[float, float],
        eps: float,
        num_threads: int = 0,
        bucket_numel: int = 16 * 2**20,
    ) -> None:
        self.buckets: list[Bucket] = []
        host_groups = []
        for group in param_groups:
            params = [p for p in group["params"] if p.requires_grad]
            for chunk in _chunks(list(reversed(params)), bucket_numel):
                bucket = self._make_bucket(chunk)
                self.buckets.append(bucket)
                host_groups.append(
                    {"params": [bucket.master], "weight_decay": group["weight_decay"]}
                )
        self.host = HostAdamW(host_groups, lr=lr, betas=betas, eps=eps, num_threads=num_threads)
        self._handles = [
            p.register_post_accumulate_grad_hook(self._hook(b, i))
            for b in self.buckets
            for i, p in enumerate(b.params)
        ]

    @staticmethod
    def _make_bucket(params: list[nn.Parameter]) -> Bucket:
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += p.numel()
        master = torch.empty(total, dtype=torch.float32)
        for p, o in zip(params, offsets, strict=True):
            master[o : o + p.numel()].copy_(p.detach().reshape(-1))
        master.grad = torch.zeros_like(master)
        bf16 = params[0].dtype == torch.bfloat16
        working = torch.empty(total, dtype=torch.bfloat16) if bf16 else None
        if any(p.dtype != params[0].dtype for p in params):
            raise ValueError("optim.offload: every parameter must have the same dtype")
        return Bucket(params, offsets, master, working)

    def _hook(self, bucket: Bucket, i: int):
        def move_to_host(p: nn.Parameter) -> None:
            # Runs inside backward as soon as p's gradient is complete: add it to the host
            # buffer (fp32) and free the model's copy.
            bucket.view(bucket.master.grad, i).add_(p.grad.detach().to("cpu", torch.float32))
            p.grad = None

        return move_to_host

    # -- the optimizer interface the trainer uses -------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        return self.host.param_groups  # the trainer sets the learning rate here

    def zero_grad(self, set_to_none: bool = True) -> None:
        for b in self.buckets:
            b.master.grad.zero_()
            for p in b.params:
                p.grad = None

    @torch.no_grad()
    def step(self, max_norm: float = float("inf")) -> float:
        """Clip to `max_norm`, step on the host, write the new weights back. Returns the
        gradient norm before clipping."""
        norm = math.sqrt(self.host.grad_sq_norm())
        scale = 1.0 if not math.isfinite(max_norm) else min(1.0, max_norm / (norm + 1e-6))
        outs = {b.master: b.working for b in self.buckets if b.working is not None}
        self.host.step(grad_scale=scale, bf16_out=outs or None)
        for b in self.buckets:
            src = b.working if b.working is not None else b.master
            for i, p in enumerate(b.params):
                p.copy_(b.view(src, i))
        return norm

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "host": self.host.state_dict(),
            "masters": [b.master.detach().clone() for b in self.buckets],
        }

    def load_state_dict(self, state: dict) -> None:
        from slipstream.configfile import check_version

        check_version(state, STATE_VERSION, "offload optimizer state")
        if [m.numel() for m in state["masters"]] != [b.master.numel() for b in self.buckets]:
            raise ValueError(
                "offload optimizer state: its buckets do not match this model's; resume with "
                "the model and bucket size it was saved with"
            )
        self.host.load_state_dict(state["host"])
        with torch.no_grad():
            for b, m in zip(self.buckets, state["masters"], strict=True):
                b.master.copy_(m)
                for i, p in enumerate(b.params):
                    p.copy_(b.view(b.master, i))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _chunks(params: list[nn.Parameter], bucket_numel: int) -> list[list[nn.Parameter]]:
    out: list[list[nn.Parameter]] = [[]]
    size = 0
    for p in params:
        if out[-1] and size + p.numel() > bucket_numel:
            out.append([])
            size = 0
        out[-1].append(p)
        size += p.numel()
    return [c for c in out if c]
