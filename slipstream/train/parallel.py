"""Parallelism applied to a built model, and the optimizer that goes with it: tensor parallel
(the model's declared layout, applied by the overlap pillar), then data parallel (DDP, or the
offload engine's own ZeRO-2, which reduces gradients itself and so gets no DDP). Returns what
the loop calls: the module to run forward on, the accumulation context, the optimizer, and
the meters of the communication each part exposes."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch.distributed as dist
from torch import nn

from slipstream.overlap import OverlapGroup
from slipstream.overlap.layout import apply_tensor_parallel
from slipstream.overlap.tp import TensorParallelPlan
from slipstream.profile import Meter
from slipstream.train.distributed import (
    Dist,
    ParallelConfig,
    host_dp_group,
    host_tp_group,
    wrap_ddp,
)
from slipstream.train.optim import OptimConfig, StepOptimizer, build_optimizer, check_parallel_optim


@dataclass(slots=True)
class Parallel:
    module: nn.Module
    """What forward runs on: the model, or DDP around it."""
    optimizer: StepOptimizer
    ddp: nn.Module | None = None
    tp_plan: TensorParallelPlan | None = None
    meters: list[Meter] = field(default_factory=list)
    """Every exposed-communication meter: tensor parallel, DDP, the optimizer's own."""

    def accumulating(self, last: bool):
        """The context of one micro-batch: DDP reduces gradients only in the step's last."""
        return nullcontext() if (self.ddp is None or last) else self.ddp.no_sync()


def shard_model(model: nn.Module, parallel: ParallelConfig, d: Dist) -> TensorParallelPlan | None:
    """Split the model over this rank's tensor-parallel group as it declares (after it is on
    its device: the symmetric workspaces live there)."""
    if d.tp_size == 1:
        return None
    impl = parallel.overlap
    if impl == "auto":
        impl = "cuda" if d.device.type == "cuda" else "shm"
    group = OverlapGroup(d.tp_group, impl, chunks=parallel.overlap_chunks)
    return apply_tensor_parallel(model, model.tensor_parallel_layout(), group)


def parallelize(model: nn.Module, parallel: ParallelConfig, cfg: OptimConfig, d: Dist) -> Parallel:
    """Tensor parallel, then the optimizer and the data-parallel wrapping."""
    check_parallel_optim(cfg, d)
    plan = shard_model(model, parallel, d)
    zero = cfg.zero_stage == 2
    group = host_dp_group(d) if zero else None  # for its collectives on host tensors
    # Gradients are reduced and weights gathered on the device: NCCL's data-parallel group.
    device_group = (d.dp_group or dist.group.WORLD) if zero else None
    tp_host = None
    if plan is not None and cfg.offload:  # gradients leave the device during backward
        plan.sum_partial_grads_in_backward()
        tp_host = host_tp_group(d)
    optimizer = build_optimizer(
        model, cfg, d.device, group, device_group, tp_plan=plan, tp_host_group=tp_host,
        writes_state=d.dp_rank == 0,
    )  # fmt: skip
    ddp, meter = (None, None) if zero else wrap_ddp(model, d)
    meters = [*optimizer.meters()]
    if plan is not None:  # waits inside forward and backward that overlap did not hide
        meters.append(("comm", lambda: plan.exposed_s))
    if ddp is not None:
        meters.append(("comm", meter.exposed_s))
    return Parallel(ddp or model, optimizer, ddp, plan, meters)
