"""Rules that name a step's bottleneck from its phase shares, and the lever to pull."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class Diagnosis:
    bottleneck: str  # data | copy | communication | optimizer | compute
    share: float  # fraction of step time the bottleneck takes
    message: str
    lever: str


# (phase, threshold, bottleneck, lever): the first whose share reaches its threshold wins.
RULES = (
    (
        "data_wait",
        0.10,
        "data",
        "more loader workers (data.backend.num_workers), pool = 'process' for Python-heavy "
        "sources, or deeper data.backend.prefetch_steps",
    ),
    (
        "comm",
        0.15,
        "communication",
        "more rows per rank per step (data.micro_batch_size, or gradient accumulation with "
        "data.num_micro_batches), so each all-reduce carries more tokens; or fewer ranks",
    ),
    ("h2d", 0.10, "copy", "pinned host memory and non-blocking copies"),
    (
        "grad_offload",
        0.15,
        "copy",
        "larger micro-batches (data.micro_batch_size: gradients leave once per backward), or "
        "no offload where `slipstream memory` says the model fits without it",
    ),
    (
        "optimizer",
        0.25,
        "optimizer",
        "with optim.offload, optim.delayed_update = true (the host step overlaps the next "
        "step's compute); else fewer optimizer steps per token (more rows per step)",
    ),
)


def diagnose(shares: dict[str, float]) -> Diagnosis:
    for phase, threshold, name, lever in RULES:
        share = shares.get(phase, 0.0)
        if share >= threshold:
            what = {
                "data": "waiting for data",
                "communication": "in exposed communication",
                "copy": "copying between host and device",
                "optimizer": "in the optimizer step",
            }[name]
            return Diagnosis(name, share, f"{name}-bound: {share:.0%} of each step {what}", lever)
    compute = shares.get("forward", 0.0) + shares.get("backward", 0.0)
    return Diagnosis(
        "compute",
        compute,
        f"compute-bound: {compute:.0%} of each step in forward and backward",
        "bf16 autocast, larger micro-batches, or a bigger device",
    )
