"""Tensor-parallel linear layers with sequence parallelism, on the overlapped operations.

Between tensor-parallel regions the activations are split by rows (tokens) across the group;
a column-parallel layer gathers them while it multiplies (all-gather + matmul) and gives full
rows of its own output columns; a row-parallel layer multiplies its slice of the inner
dimension and scatters the summed rows back (matmul + reduce-scatter). Each backward uses the
dual operation. Shapes: R rows (tokens) in all, R / tp per rank; weights as nn.Linear
[out, in]. No biases (the models here have none).

`layout.py` splits a model as its `TensorParallelLayout` declares, with these layers and
hooks on the declared modules, so the model's own code runs unchanged. Inside a split model
the layers keep the
model's shapes: a column-parallel layer returns [B, T, out / tp] and a row-parallel one takes
[B, T, in / tp] (`Rows` holds B and T between the split and the gather; R = B * T padded to a
multiple of tp).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from slipstream.overlap.ag_gemm import all_gather, all_gather_matmul
from slipstream.overlap.gemm_rs import _reduce_scatter, matmul_reduce_scatter
from slipstream.overlap.group import OverlapGroup


def _autocast_inputs(x: torch.Tensor, w: torch.Tensor):
    """Cast as autocast would (outside the Function, so the casts' backward converts the
    gradients back); the overlapped ops then run with autocast off."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
        return x.to(dtype), w.to(dtype)
    return x, w.to(x.dtype)


class _AllGatherLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_shard, weight, group: OverlapGroup):  # [R/tp, in], [out/tp, in]
        with torch.autocast(x_shard.device.type, enabled=False):
            y, gathered = all_gather_matmul(x_shard, weight.t(), group, return_gathered=True)
        ctx.save_for_backward(gathered, weight)
        ctx.group = group
        return y  # [R, out/tp]

    @staticmethod
    def backward(ctx, grad_y):
        gathered, weight = ctx.saved_tensors
        grad_x = matmul_reduce_scatter(grad_y.contiguous(), weight, ctx.group)  # [R/tp, in]
        return grad_x, grad_y.t() @ gathered, None


class _LinearReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, group: OverlapGroup):  # [R, in/tp], [out, in/tp]
        with torch.autocast(x.device.type, enabled=False):
            y = matmul_reduce_scatter(x.contiguous(), weight.t(), group)
        ctx.save_for_backward(x, weight)
        ctx.group = group
        return y  # [R/tp, out]

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_x, grad_full = all_gather_matmul(
            grad_y.contiguous(), weight, ctx.group, return_gathered=True
        )
        return grad_x, grad_full.t() @ x, None


def _split(weight: torch.Tensor, dim: int, parts: int, group: OverlapGroup) -> torch.Tensor:
    """This rank's slice along `dim`, taken from each of `parts` equal blocks (so fused
    projections such as q|k|v or gate|up keep their structure on every rank)."""
    tp = group.world_size
    blocks = weight.chunk(parts, dim)
    if any(b.shape[dim] % tp for b in blocks):
        raise ValueError(
            f"tensor parallel: a weight of shape {tuple(weight.shape)} (in {parts} part(s)) "
            f"does not split over {tp} ranks along dim {dim}; choose sizes divisible by "
            "parallel.tp"
        )
    return torch.cat([b.chunk(tp, dim)[group.rank] for b in blocks], dim).clone()


class Rows:
    """The batch shape of the rows the residual stream is split into: set where the rows are
    split (each forward), read by the layers that leave and re-enter the split."""

    __slots__ = ("shape",)

    def __init__(self) -> None:
        self.shape: tuple[int, int] | None = None

    @property
    def count(self) -> int:
        assert self.shape is not None, "the rows were not split in this forward"
        return self.shape[0] * self.shape[1]


class ColumnParallelLinear(nn.Module):
    """Output features split across ranks; input rows sharded, output rows full (with `rows`,
    shaped [B, T, out / tp] as the model's own layer would give them)."""

    def __init__(
        self, weight_shard: torch.Tensor, group: OverlapGroup, rows: Rows | None = None
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight_shard)
        self.group, self.rows = group, rows

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: OverlapGroup, parts: int = 1, rows=None):
        if linear.bias is not None:
            raise ValueError("ColumnParallelLinear: biases are not supported")
        return cls(_split(linear.weight.data, 0, parts, group), group, rows)

    def forward(self, x_shard: torch.Tensor) -> torch.Tensor:
        x, w = _autocast_inputs(x_shard.reshape(-1, x_shard.shape[-1]), self.weight)
        y = _AllGatherLinear.apply(x, w, self.group)
        if self.rows is None:
            return y
        return y[: self.rows.count].view(*self.rows.shape, -1)  # the padding rows dropped


class RowParallelLinear(nn.Module):
    """Input features split across ranks; input rows full, output rows sharded (with `rows`,
    the input shaped [B, T, in / tp] and padded here to R rows)."""

    def __init__(
        self, weight_shard: torch.Tensor, group: OverlapGroup, rows: Rows | None = None
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight_shard)
        self.group, self.rows = group, rows

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: OverlapGroup, rows=None):
        if linear.bias is not None:
            raise ValueError("RowParallelLinear: biases are not supported")
        return cls(_split(linear.weight.data, 1, 1, group), group, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = _autocast_inputs(x.reshape(-1, x.shape[-1]), self.weight)
        if self.rows is not None:
            x = _pad_rows(x, self.group.world_size)
        return _LinearReduceScatter.apply(x, w, self.group)


def _pad_rows(x: torch.Tensor, tp: int) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, -x.shape[0] % tp))


# -- moving between full rows and row shards ----------------------------------------------------
class _ScatterRows(torch.autograd.Function):
    """Full rows (the same on every rank) -> this rank's rows. Backward: every rank's row
    gradients gathered, so the full-row input gets its whole gradient on every rank."""

    @staticmethod
    def forward(ctx, x, group: OverlapGroup):
        ctx.group = group
        return x.chunk(group.world_size)[group.rank].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.group), None


class _GatherRows(torch.autograd.Function):
    """Row shards -> full rows on every rank, which then all compute the same thing (the
    output layer and the loss). Backward: each rank keeps its rows of the (identical) full
    gradient; summing them would count the loss tp times."""

    @staticmethod
    def forward(ctx, x, group: OverlapGroup):
        ctx.group = group
        return all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(ctx.group.world_size)[ctx.group.rank].contiguous(), None


class _GatherRowsSum(torch.autograd.Function):
    """Row shards -> full rows, for a module whose split layers each use their own columns of
    the result (heads, hidden units). Backward: the ranks' partial gradients summed, each
    rank keeping its rows (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group: OverlapGroup):
        ctx.group = group
        return all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad.contiguous(), ctx.group), None


def scatter_rows(x: torch.Tensor, group: OverlapGroup) -> torch.Tensor:
    return _ScatterRows.apply(x, group)


def gather_rows(x: torch.Tensor, group: OverlapGroup) -> torch.Tensor:
    return _GatherRows.apply(x, group)


# -- gradients of a tensor-parallel model -------------------------------------------------------
@dataclass(slots=True)
class TensorParallelPlan:
    """Which parameters are split (`sharded`: each rank holds a different slice) and which are
    replicated but see only this rank's rows (`partial`: their gradients are summed over the
    group). All others are replicated with identical gradients on every rank."""

    group: OverlapGroup
    sharded: list[nn.Parameter] = field(default_factory=list)
    partial: list[nn.Parameter] = field(default_factory=list)
    hooks: list = field(default_factory=list)
    """The row split and gather on the model's modules (`apply_tensor_parallel`)."""
    partial_in_backward: bool = False
    """The partial gradients are summed during backward (`sum_partial_grads_in_backward`)."""

    @property
    def exposed_s(self) -> float:
        """Seconds the caller waited for this group's communication, over the run."""
        return self.group.exposed_s

    def sum_partial_grads_in_backward(self) -> None:
        """For an optimizer that takes each gradient away as backward makes it (offload):
        the `partial` parameters' gradients are summed over the group as they are made, each
        micro-batch's on its own (summing the accumulated ones would count earlier
        micro-batches again). Every rank runs the same backward, so the sums pair up."""

        def summed(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            dist.all_reduce(grad, group=self.group.group)
            return grad

        self.hooks += [p.register_hook(summed) for p in self.partial]
        self.partial_in_backward = True

    def reduce_partial_grads(self) -> None:
        """After the last backward of a step (once: summing accumulated grads per micro-batch
        would count earlier micro-batches again)."""
        if self.partial_in_backward:
            return
        grads = [p.grad for p in self.partial if p.grad is not None]
        if grads:
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat, group=self.group.group)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def clip_grad_norm(self, params, max_norm: float) -> float:
        """The global gradient norm (split parameters' squares summed over the group, the
        rest counted once), then clipping by it, as on one process."""
        sharded_ids = {id(p) for p in self.sharded}
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return 0.0
        sq = torch.zeros(2, dtype=torch.float64, device=with_grad[0].grad.device)
        for p in with_grad:  # [0]: split parameters, [1]: the rest; no host sync per tensor
            sq[0 if id(p) in sharded_ids else 1] += p.grad.double().pow(2).sum()
        split = sq[:1].clone()
        dist.all_reduce(split, group=self.group.group)
        norm = float((split[0] + sq[1]).sqrt())  # the step's one host sync
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_([p.grad for p in with_grad], coef)
        return norm
