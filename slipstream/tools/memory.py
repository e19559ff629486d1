"""`slipstream memory`: the memory planner's table for a model and hardware, and the fastest
strategy that fits (see slipstream/offload/estimate.py for the model behind the numbers)."""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.overrides import TorchFunctionMode

from slipstream.offload.estimate import (
    GIB,
    MODES,
    Hardware,
    Workload,
    host_pass_bytes,
    plan,
    step_time,
)


def workload_from_args(args: argparse.Namespace) -> Workload:
    if args.recipe:
        given = [k for k in ("params", "layers", "hidden") if getattr(args, k) is not None]
        if given:
            raise ValueError(
                f"memory: {', '.join('--' + k for k in given)} with a recipe: the recipe's "
                "model is measured; give either the recipe or the sizes"
            )
        return workload_from_recipe(args)
    missing = [k for k in ("params", "layers", "hidden") if getattr(args, k) is None]
    if missing:
        raise ValueError(
            f"memory: give a recipe, or --params, --layers and --hidden (missing: "
            f"{', '.join('--' + m for m in missing)})"
        )
    for key in ("params", "layers", "hidden", "vocab", "seq_len", "micro_batch", "accum"):
        if getattr(args, key) <= 0:
            raise ValueError(f"--{key.replace('_', '-')}: {getattr(args, key)} must be > 0")
    return Workload(
        num_params=args.params,
        num_layers=args.layers,
        width=args.hidden,
        vocab_size=args.vocab,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        world_size=args.ranks,
        act_bytes=4 if args.fp32 else 2,
        accum_steps=args.accum,
    )


class _FusedAttentionSaves(torch.autograd.Function):
    """Stands in for `F.scaled_dot_product_attention` in the meta trace. The meta device runs
    SDPA's math path, which keeps the [T, T] scores (and float32 copies of q, k and v) for
    backward; the fused kernels a run takes (flash, memory-efficient and cuDNN on GPUs, the
    flash kernel on CPUs) keep q, k, v, the output and a float32 log-sum-exp per query row,
    and recompute the scores. Measured on an H200, the math path's count put a 52-layer model
    4.3 GiB over its real peak (benchmarks/results/2026-11-30-gpu-session.md)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the trace does no backward
        raise NotImplementedError


class _FusedAttentionMode(TorchFunctionMode):
    """Within it, and in this thread only, `F.scaled_dot_product_attention` saves what the
    fused kernels save (`_FusedAttentionSaves`); everything else runs as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return _FusedAttentionSaves.apply(*args[:3])
        return func(*args, **(kwargs or {}))


def saved_activation_bytes(
    model_cfg, micro_batch: int, seq_len: int, dtype, device="meta", autocast=None
) -> float:
    """Bytes autograd saves for backward in one micro-batch of this GPT, found by running its
    forward and adding the storages it saves, parameters left out. On the meta device (no
    memory, no compute) attention is counted as the fused kernels keep it (see
    `_FusedAttentionSaves`); on a real device (a GPU the plan is for) the forward runs there,
    with that device's own kernels, and the count is exact for them. `autocast` (a real
    device only): the model in `dtype` runs under autocast to this dtype, as plain mixed
    precision trains it; the low-precision copies of the weights autocast keeps for backward
    are counted, as they take memory."""
    from slipstream.models import GPT

    kind = torch.device(device).type
    meta = kind == "meta"
    if autocast is not None and meta:
        raise ValueError("saved_activation_bytes: autocast needs a real device, not meta")
    with torch.device(device):
        model = GPT(model_cfg).to(dtype)
        x = torch.randint(0, model_cfg.vocab_size, (micro_batch, seq_len))
    weights = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return t

    stand_in = _FusedAttentionMode() if meta else contextlib.nullcontext()
    mixed = torch.autocast(kind, dtype=autocast) if autocast else contextlib.nullcontext()
    with stand_in, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with mixed:
            logits = model(x)
        logits = logits.float()
        F.cross_entropy(logits.flatten(0, 1), x.flatten())
    return float(sum(saved.values()))


def trace_device(name: str) -> torch.device:
    """`--trace-device`, checked: meta, cpu, or an accelerator this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--trace-device {name!r}: not a device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--trace-device {name!r}: no CUDA device here; use meta")
    return device


def workload_from_recipe(args: argparse.Namespace) -> Workload:
    """Counts a GPT recipe's parameters without allocating them (on the meta device)."""
    from slipstream.config import RunConfig

    cfg = RunConfig.load(args.recipe, args.set)
    return workload_from_config(cfg, args.ranks, getattr(args, "trace_device", "meta"))


def gpt_config(cfg):
    """A loaded config's GPTConfig, its vocab_size resolved from the tokenizer."""
    import dataclasses

    from slipstream.data import build_tokenizer
    from slipstream.models import GPTConfig

    if not isinstance(cfg.model, GPTConfig):
        raise ValueError(
            "memory: a recipe with model.kind = 'hf'; give --params, --layers, --hidden"
        )
    m = cfg.model
    if m.vocab_size == 0:
        vocab = build_tokenizer(cfg.data.tokenizer, cfg.data.base_dir).vocab_size
        m = dataclasses.replace(m, vocab_size=vocab)
    return m


def workload_from_config(cfg, ranks: int, trace: str = "meta") -> Workload:
    """`workload_from_recipe` for a loaded config (a run's own, for the doctor)."""
    import dataclasses

    import torch

    from slipstream.models import GPT

    m = gpt_config(cfg)
    with torch.device("meta"):
        num = GPT(m).num_params()
    fp32 = cfg.train.precision == "fp32"  # auto = bf16 on a GPU
    seq, mb = cfg.data.seq_len, cfg.data.micro_batch_size
    dtype = torch.float32 if fp32 else torch.bfloat16
    device = trace_device(trace)
    saved, ckpt = (
        saved_activation_bytes(
            dataclasses.replace(m, activation_checkpointing=ckpt), mb, seq, dtype, device
        )
        for ckpt in (False, True)
    )
    return Workload(
        num_params=num,
        num_layers=m.n_layer,
        width=m.d_model,
        vocab_size=m.vocab_size,
        seq_len=cfg.data.seq_len,
        micro_batch=cfg.data.micro_batch_size,
        world_size=ranks,
        act_bytes=4 if fp32 else 2,
        saved_bytes=saved,
        saved_bytes_ckpt=ckpt,
        accum_steps=cfg.data.num_micro_batches,
    )


def run_memory(args: argparse.Namespace, console: Console | None = None) -> None:
    console = console or Console()
    for key in ("device_gib", "host_gib", "device_tflops", "link_gbps"):
        if getattr(args, key) <= 0:
            raise ValueError(f"--{key.replace('_', '-')}: {getattr(args, key)} must be > 0")
    if args.ranks < 1:
        raise ValueError(f"--ranks: {args.ranks} must be >= 1")
    w = workload_from_args(args)
    host_bw, where = host_bandwidth(args.host_gbps)
    hw = Hardware(
        device_bytes=args.device_gib * GIB,
        host_bytes=args.host_gib * GIB,
        device_flops=args.device_tflops * 1e12,
        host_bytes_per_s=host_bw,
        link_bytes_per_s=args.link_gbps * 1e9,
    )
    console.print(
        f"assumed per rank: a device of {args.device_gib:g} GiB and {args.device_tflops:g} "
        f"TFLOP/s, {args.host_gib:g} GiB of host memory, a {args.link_gbps:g} GB/s host "
        f"link, a host pass at {host_bw / 1e9:.1f} GB/s ({where}); --device-gib, "
        "--device-tflops, --host-gib, --link-gbps, --host-gbps to change"
    )
    rows, best = plan(w, hw)
    table = Table(
        title=f"{w.num_params / 1e6:,.1f}M parameters, {w.tokens:,} tokens per micro-batch, "
        f"{w.world_size} rank(s)"
    )
    for col in ("strategy", "device GiB", "host GiB", "step s (est.)", "fits", ""):
        table.add_column(col, justify="left" if col in ("strategy", "") else "right")
    for e in rows:
        table.add_row(
            e.strategy,
            f"{e.device_bytes / GIB:,.2f}",
            f"{e.host_bytes / GIB:,.2f}",
            f"{e.step_s:.3f}",
            "yes" if e.fits else "no",
            "" if e.available else "next",
        )
    console.print(table)
    if best is None:
        console.print(
            "nothing available today fits: more ranks, a shorter seq_len or a smaller micro-batch"
        )
    else:
        console.print(f"recommended: [bold]{best.strategy}[/bold]")
    times = {mode: step_time(w, hw, mode) for mode in MODES}
    t = times["plain"]
    console.print(
        f"offload step: compute {t.compute_s:.3f} s, host link {t.link_s:.3f} s, host step "
        f"{t.host_s:.3f} s ({host_pass_bytes(w):.0f} bytes per parameter); overlapped as "
        + ", ".join(f"{m} {x.step_s:.3f} s" for m, x in times.items())
        + f" (early bucket steps need no clipping); the limit {t.limit_s:.3f} s ({t.bound})"
    )


def host_bandwidth(given: str) -> tuple[float, str]:
    """--host-gbps: a number (GB/s), or "here": this machine's, by the AdamW-pattern probe."""
    if given == "here":
        from slipstream.offload.host_adam import measure_host_bandwidth

        return measure_host_bandwidth(), "measured here"
    try:
        value = float(given)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"--host-gbps: {given!r}; give GB/s (> 0) or 'here' to measure")
    return value * 1e9, "given"
