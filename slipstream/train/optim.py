"""The optimizer: AdamW with decoupled weight decay on matrices only, and a linear warm-up
followed by cosine decay to `min_lr_ratio * lr`. Either torch's (fused where the device has it)
or, with `optim.offload`, the memory engine's OffloadOptimizer (fp32 masters and moments on the
host, the model in `optim.offload_dtype`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(kw_only=True, slots=True, frozen=True)
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """The cosine ends at lr * min_lr_ratio."""
    warmup_steps: int = 10
    weight_decay: float = 0.1
    """Applied to matrices (weights of dim >= 2); norms and biases are not decayed."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    offload: bool = False
    """Keep fp32 master weights, Adam moments and the step on the host (the memory engine);
    gradients move to the host during backward. One process for now."""
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
    model: nn.Module, cfg: OptimConfig, device: torch.device, group=None, device_group=None
):
    """torch's AdamW, or the OffloadOptimizer (which first casts the model's parameters to
    `cfg.offload_dtype`; with `group` (gloo), ZeRO-2 across its ranks, reducing gradients and
    gathering weights over `device_group`, the same ranks on the device's backend)."""
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
    if cfg.offload:
        from slipstream.offload.engine import OffloadOptimizer

        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        model.to(dtypes[cfg.offload_dtype])
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
        )
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=device.type in ("cpu", "cuda"),
    )


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of cfg.lr at `step` (0-based): linear warm-up, then cosine decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def flush(optimizer) -> None:
    """Let a delayed update in flight reach the model (before evaluating or saving)."""
    if hasattr(optimizer, "flush"):
        optimizer.flush()


def clip_and_step(optimizer, model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to `max_norm` and step; returns the norm before clipping.
    The offload engine clips on the host, where the gradients are."""
    from slipstream.offload.engine import OffloadOptimizer

    if isinstance(optimizer, OffloadOptimizer):
        return optimizer.step(max_norm)
    plan = getattr(model, "tp_plan", None)
    if plan is not None:  # split parameters' norms are summed over the tensor-parallel group
        norm = plan.clip_grad_norm(model.parameters(), max_norm)
    else:
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    optimizer.step()
    return norm


def check_parallel_optim(cfg: OptimConfig, d) -> None:
    """Offload and ZeRO-2 against the number of ranks: clear errors for what cannot run."""
    if d.tp_size > 1 and (cfg.offload or cfg.zero_stage):
        raise ValueError(
            "optim.offload / optim.zero_stage: not combined with parallel.tp > 1 yet; use "
            "tensor parallelism with the device optimizer, or offload with parallel.tp = 1"
        )
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
