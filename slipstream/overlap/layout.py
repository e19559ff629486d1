"""apply_tensor_parallel: split a model over a tensor-parallel group as its
`TensorParallelLayout` declares (`slipstream.models.base`; taken as a plain value, so this
pillar imports no model). The declared linears become column- and row-parallel layers
(`tp.py`), and hooks on the declared modules split the rows, gather them for the layers that
need whole rows, and gather them back before the output: the model's own forward runs
unchanged."""

from __future__ import annotations

import torch
from torch import nn

from slipstream.overlap.group import OverlapGroup
from slipstream.overlap.tp import (
    ColumnParallelLinear,
    RowParallelLinear,
    Rows,
    TensorParallelPlan,
    _GatherRowsSum,
    _pad_rows,
    _split,
    gather_rows,
    scatter_rows,
)

__all__ = ["apply_tensor_parallel", "merge_slices"]


def apply_tensor_parallel(model: nn.Module, layout, group: OverlapGroup) -> TensorParallelPlan:
    """Split `model` in place over `group` as `layout` (a `TensorParallelLayout`) declares,
    keeping this rank's slices of the weights built so far (so a split model starts from the
    same weights as the whole one). Returns the plan of which parameters are split."""
    tp = group.world_size
    for name, size in layout.divides.items():
        if size % tp:
            raise ValueError(
                f"parallel.tp: {tp} does not divide {name} {size}; choose a tensor-parallel "
                "size that divides it"
            )
    modules = dict(model.named_modules())
    rows = Rows()
    plan = TensorParallelPlan(group)
    for name, parts in layout.colwise.items():
        layer = ColumnParallelLinear.from_linear(modules[name], group, parts, rows)
        _replace(model, name, layer)
        plan.sharded.append(layer.weight)
    for name in layout.rowwise:
        layer = RowParallelLinear.from_linear(modules[name], group, rows)
        _replace(model, name, layer)
        plan.sharded.append(layer.weight)
    for name, parts in layout.colwise_local.items():
        plan.sharded += _split_local(modules[name], parts, group)
    params = dict(model.named_parameters())
    plan.partial = [params[name] for name in layout.row_local]
    plan.hooks = _hook_rows(modules, layout, group, rows)
    return plan


def _hook_rows(modules: dict, layout, group: OverlapGroup, rows: Rows) -> list:
    """The row split, the gathers for layers that need whole rows, the gather back."""
    tp = group.world_size

    def full_rows(x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> my rows
        rows.shape = (x.shape[0], x.shape[1])
        return scatter_rows(_pad_rows(x.reshape(rows.count, -1), tp), group)

    def gather(_module, args: tuple) -> tuple:  # my rows -> [B, T, D] on every rank
        full = gather_rows(args[0], group)[: rows.count].view(*rows.shape, -1)
        return (full, *args[1:])

    def gather_summed(_module, args: tuple, kwargs: dict):  # the same, summed in backward
        def whole(x):
            return _GatherRowsSum.apply(x, group)[: rows.count].view(*rows.shape, -1)

        return _map_input(args, kwargs, whole)

    def split_input(_module, args: tuple, kwargs: dict):
        return _map_input(args, kwargs, full_rows)

    if bool(layout.scatter_after) == bool(layout.scatter_before):
        raise ValueError(
            "tensor parallel layout: name exactly one of scatter_after, scatter_before"
        )
    if layout.scatter_after:
        split = modules[layout.scatter_after].register_forward_hook(
            lambda m, a, out: full_rows(out)
        )
    else:
        split = modules[layout.scatter_before].register_forward_pre_hook(
            split_input, with_kwargs=True
        )
    hooks = [split, modules[layout.gather_before].register_forward_pre_hook(gather)]
    return hooks + [
        modules[name].register_forward_pre_hook(gather_summed, with_kwargs=True)
        for name in layout.gather_inputs
    ]


def _map_input(args: tuple, kwargs: dict, fn) -> tuple[tuple, dict]:
    """A module's hidden states, positional or by name (Hugging Face passes them both ways)."""
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}


@torch.no_grad()
def _split_local(linear: nn.Linear, parts: int, group: OverlapGroup) -> list[nn.Parameter]:
    """This rank's output features of `linear`, in place (its bias too)."""
    linear.weight = nn.Parameter(_split(linear.weight.data, 0, parts, group))
    linear.out_features = linear.weight.shape[0]
    if linear.bias is None:
        return [linear.weight]
    linear.bias = nn.Parameter(_split(linear.bias.data, 0, parts, group))
    return [linear.weight, linear.bias]


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, layer)


def merge_slices(slices: list[dict[str, torch.Tensor]], layout) -> dict[str, torch.Tensor]:
    """The whole model's state dict from each tensor-parallel rank's (in rank order): the
    inverse of the split above. A column-split weight's fused blocks (q|k|v, gate|up) are
    put back block by block; a row-split one is joined along its input features; the rest
    is the same on every rank."""
    tp = len(slices)
    out_split = {f"{m}.weight": n for m, n in {**layout.colwise, **layout.colwise_local}.items()}
    out_split |= {f"{m}.bias": n for m, n in layout.colwise_local.items()}
    in_split = {f"{m}.weight" for m in layout.rowwise}
    whole = {}
    for key, first in slices[0].items():
        parts = [s[key] for s in slices]
        if key in out_split:
            blocks = [p.chunk(out_split[key], 0) for p in parts]  # [rank][block]
            whole[key] = torch.cat([blocks[r][b] for b in range(out_split[key]) for r in range(tp)])
        elif key in in_split:
            whole[key] = torch.cat(parts, 1)
        else:
            whole[key] = first
    return whole
