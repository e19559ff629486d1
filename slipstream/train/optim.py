"""The step-optimizer seam: AdamW with decoupled weight decay on matrices only, and a linear
warm-up followed by cosine decay to `min_lr_ratio * lr`. Either torch's (fused where the device
has it, behind `DeviceAdamW`) or, with `optim.offload`, the memory engine's OffloadOptimizer
(fp32 masters and moments on the host, the model in `optim.offload_dtype`). Both implement
`StepOptimizer`, which is all the loop and the checkpoint know of them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
from torch import nn

from slipstream.profile import Meter
from slipstream.train.device_optim import DeviceAdamW


class StateParts(Protocol):
    """A checkpoint's optimizer files for this rank's tensor-parallel slice, by part name."""

    def names(self) -> list[str]: ...

    def load(self, name: str, mmap: bool = False) -> dict: ...


class StepOptimizer(Protocol):
    """What the loop calls, in this order, every step; nothing else about an optimizer
    reaches it."""

    def begin_step(self, lr: float) -> float:
        """The step's learning rate, before its forward passes; returns the factor the loss
        is multiplied by (the fp16 loss scale; 1.0 otherwise)."""
        ...

    def before_backward(self, last: bool) -> None:
        """Before each micro-batch's backward; `last`: the step's final one."""
        ...

    def finish_backward(self) -> None:
        """After the step's last backward: gradients still in flight land (copies to the
        host, partial sums over tensor-parallel ranks)."""
        ...

    def step(self, max_norm: float | None = None) -> float:
        """Clip the global gradient norm (to `optim.grad_clip` unless given) and step; returns
        the norm before clipping."""
        ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def flush(self) -> None:
        """An update still in flight reaches the model (before evaluating or saving)."""
        ...

    def meters(self) -> list[Meter]:
        """The seconds it exposes inside other phases, for the step timer."""
        ...

    def stats(self) -> dict[str, float]:
        """Its own figures for the step just taken, for the step's metrics row (namespaced,
        e.g. `offload/host_step_s`); empty when it has none."""
        ...

    def state_parts(self) -> dict[str, dict]:
        """The state this rank writes, by part name (opaque to the checkpoint: a sharded
        optimizer names one part per rank, a replicated one writes on one rank only)."""
        ...

    def load_state_parts(self, parts: StateParts) -> None: ...

    def close(self) -> None: ...


@dataclass(kw_only=True, slots=True, frozen=True)
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """The cosine ends at lr * min_lr_ratio."""
    warmup_steps: int = 10
    """Steps of linear warm-up from 0 to lr; then a cosine to lr * min_lr_ratio at train.steps."""
    weight_decay: float = 0.1
    """Applied to matrices (weights of dim >= 2); norms and biases are not decayed."""
    beta1: float = 0.9
    """AdamW's decay of the gradient's running mean."""
    beta2: float = 0.95
    """AdamW's decay of the squared gradient's running mean."""
    eps: float = 1e-8
    """Added to the root of the second moment (AdamW's denominator)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    offload: bool = False
    """Keep fp32 master weights, Adam moments and the step on the host (the memory engine);
    gradients move to the host during backward. Works with data and tensor parallelism."""
    offload_dtype: str = "bf16"
    """With offload: the dtype of the model's own (working) weights, `bf16`, `fp16` (with
    dynamic loss scaling) or `fp32`."""
    offload_threads: int = 0
    """With offload: threads of the host AdamW (0 = every CPU this process may use)."""
    delayed_update: bool = False
    """With offload: the host step of step k overlaps step k + 1's forward and backward, whose
    gradient is then taken one update behind (DPU, ZeRO-Offload)."""
    delayed_update_start: int = 40
    """Ordinary steps before the delayed update begins (the paper's warm-up)."""
    zero_stage: int = 0
    """2 = shard the host optimizer state across data-parallel ranks (ZeRO-2: gradients
    reduce-scattered, each rank steps its slice, weights all-gathered); needs offload and
    torchrun with more than one rank. 0 = every rank holds everything."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr: {self.lr} must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio: {self.min_lr_ratio} must be in [0, 1]")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("optim.warmup_steps and optim.grad_clip must be >= 0")
        if self.offload_dtype not in ("bf16", "fp16", "fp32"):
            raise ValueError(
                f"optim.offload_dtype: {self.offload_dtype!r}; use 'bf16', 'fp16' or 'fp32'"
            )
        if self.zero_stage not in (0, 2):
            raise ValueError(f"optim.zero_stage: {self.zero_stage}; use 0 or 2")
        if self.zero_stage == 2 and not self.offload:
            raise ValueError(
                "optim.zero_stage: 2 is implemented by the offload engine; set optim.offload = true"
            )
        if self.delayed_update and not self.offload:
            raise ValueError("optim.delayed_update: needs optim.offload = true")
        if self.delayed_update_start < 0:
            raise ValueError("optim.delayed_update_start: must be >= 0")
        if self.offload_threads < 0:
            raise ValueError("optim.offload_threads: must be >= 0 (0 = all CPUs)")

    def to_dict(self) -> dict:
        return asdict(self)


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    device: torch.device,
    group=None,
    device_group=None,
    *,
    tp_plan=None,
    tp_host_group=None,
    writes_state: bool = True,
) -> StepOptimizer:
    """torch's AdamW behind `DeviceAdamW`, or the OffloadOptimizer (which first casts the
    model's parameters to `cfg.offload_dtype`; with `group` (gloo), ZeRO-2 across its ranks,
    reducing gradients and gathering weights over `device_group`, the same ranks on the
    device's backend). `tp_plan`: a tensor-parallel model's `TensorParallelPlan` (its norm
    and partial-gradient sums), with `tp_host_group` the same ranks over gloo for the offload
    engine's host norm; `writes_state`: whether this rank writes the (replicated) state."""
    params = [p for p in model.parameters() if p.requires_grad]
    seen, decay, no_decay = set(), [], []
    for p in params:  # tied weights appear once
        if id(p) not in seen:
            seen.add(id(p))
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    max_norm = cfg.grad_clip or float("inf")
    if cfg.offload:
        from slipstream.offload.engine import OffloadOptimizer

        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        model.to(dtypes[cfg.offload_dtype])
        if tp_plan is not None:  # slices and replicated parameters never share a bucket
            sharded = {id(p) for p in tp_plan.sharded}
            groups = [
                {**g, "params": [p for p in g["params"] if (id(p) in sharded) == cut],
                 "tp_sharded": cut}
                for g in groups for cut in (True, False)
            ]  # fmt: skip
        return OffloadOptimizer(
            groups,
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            num_threads=cfg.offload_threads,
            group=group,
            device_group=device_group,
            delayed_update=cfg.delayed_update,
            delay_start=cfg.delayed_update_start,
            max_norm=max_norm,
            tp_group=tp_host_group,
        )
    adamw = torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=device.type in ("cpu", "cuda"),
    )
    return DeviceAdamW(adamw, params, max_norm, tp_plan=tp_plan, writes_state=writes_state)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of cfg.lr at `step` (0-based): linear warm-up, then cosine decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def check_parallel_optim(cfg: OptimConfig, d) -> None:
    """Offload and ZeRO-2 against the number of ranks: clear errors for what cannot run."""
    if cfg.offload and d.dp_size > 1 and cfg.zero_stage != 2:
        raise ValueError(
            "optim.offload: under torchrun the host state is sharded across ranks; set "
            "optim.zero_stage = 2"
        )
    if cfg.zero_stage == 2 and d.dp_size == 1:
        raise ValueError(
            "optim.zero_stage: 2 shards across data-parallel ranks, and this run has one; run "
            "under torchrun with more than one process, or set optim.zero_stage = 0"
        )
