"""What the trainer shows: a live progress bar (step, loss, tokens/s, data wait %, ETA and, on
CUDA, MFU), plain lines when the output is not a terminal, and the end-of-run summary."""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from slipstream.profile import PHASES, Finding

# Dense bf16 peak FLOP/s by device name, for MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class Progress:
    def __init__(
        self,
        console: Console,
        cfg,
        start: int,
        enabled: bool,
        flops_per_token: float,
        world_size: int,
    ) -> None:
        self.console, self.cfg, self.enabled = console, cfg, enabled
        self.live = enabled and cfg.progress and console.is_terminal
        peak = peak_flops() if flops_per_token else None
        self.mfu_scale = flops_per_token / (peak * world_size) if peak else 0.0
        self.bar = RichProgress(  # one line of at most 80 columns, evaluations on their own
            TextColumn("step"),
            MofNCompleteColumn(),
            BarColumn(bar_width=10),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(compact=True),
            console=console,
            disable=not self.live,
        )
        self.task = self.bar.add_task("train", total=cfg.steps, completed=start, info="")
        self.t0 = time.perf_counter()

    def __enter__(self) -> Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def update(self, row: dict) -> None:
        if not self.enabled:
            return
        wait = row["time/data_wait_s"] / max(row["time/step_s"], 1e-12)
        info = f"loss {row['loss']:.4f} {_short(row['tokens_per_s'])} tok/s wait {wait:.0%}"
        if self.mfu_scale:
            info += f" MFU {row['tokens_per_s'] * self.mfu_scale:.0%}"
        self.bar.update(self.task, completed=row["step"], info=info)
        replicas = [int(v) for k, v in row.items() if k.startswith("data/replicas/")]
        if replicas:  # the Ray backend's loader actors per source (lines only: 80 columns)
            info += f" loaders {'/'.join(map(str, replicas))}"
        evaluated = row.get("eval_loss") is not None
        if evaluated:
            line = f"eval loss {row['eval_loss']:.4f} ({row['eval_bpb']:.3f} bits/byte)"
        every = self.cfg.log_every
        due = every and (row["step"] % every == 0 or row["step"] == self.cfg.steps)
        if not self.live and (due or evaluated):
            tail = f"  {line}" if evaluated else ""
            self.console.print(
                f"step {row['step']}/{self.cfg.steps}  {info}{tail}", highlight=False
            )
        elif self.live and evaluated:  # above the bar, which stays one line
            self.console.print(f"step {row['step']}: {line}", highlight=False)


def _short(x: float) -> str:
    """123456 -> 123k, 1234567 -> 1.23M: the bar's numbers in a few columns."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            v = x / div
            return f"{v:.3g}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return f"{x:.0f}"


def print_summary(
    console: Console,
    history: list[dict],
    shares: dict[str, float],
    finding: Finding | None,
    samples: list[str],
    num_params: int,
    num_params_per_rank: int | None = None,
) -> None:
    """num_params: the whole model's; num_params_per_rank: each tensor-parallel rank's."""
    if history:
        first, last = history[0], history[-1]
        each = f" ({num_params_per_rank:,} per tensor-parallel rank)" if num_params_per_rank else ""
        console.print(
            f"\n{num_params:,} parameters{each}; loss {first['loss']:.4f} -> {last['loss']:.4f}"
            f" over {len(history)} steps"
        )
        evals = [r for r in history if "eval_bpb" in r]
        if evals:
            per_source = "  ".join(
                f"{k.split('/', 1)[1]} {v:.3f}"
                for k, v in evals[-1].items()
                if k.startswith("eval_bpb/")
            )
            console.print(
                f"held-out bits per byte {evals[0]['eval_bpb']:.3f} (step {evals[0]['step']}) -> "
                f"{evals[-1]['eval_bpb']:.3f} (step {evals[-1]['step']}); {per_source}"
            )
    for i, sample in enumerate(samples):
        console.rule(f"sample {i + 1}")
        console.print(sample, markup=False, highlight=False)
    if samples:
        console.rule()
    if shares:
        table = Table(title="step breakdown", caption="median step, after start-up")
        table.add_column("phase")
        table.add_column("share", justify="right")
        for p in (*PHASES, "other"):
            table.add_row(p, f"{shares.get(p, 0.0):.1%}")
        console.print(table)
    host = [r for r in history[1:] if r.get("offload/host_gb_per_s")]  # after the first step
    if host:
        mid = sorted(host, key=lambda r: r["offload/host_step_s"])[len(host) // 2]
        console.print(
            f"offload host step: {mid['offload/host_step_s'] * 1e3:,.1f} ms per step, "
            f"{mid['offload/host_bytes_per_param']:.0f} bytes per parameter, "
            f"{mid['offload/host_gb_per_s']:.1f} GB/s (median step)"
        )
    if finding:
        gain = f" (expected gain {finding.gain.fraction:.0%} of the step)" if finding.gain else ""
        console.print(finding.verdict, style="bold", markup=False, soft_wrap=True)
        if finding.lever:
            console.print(f"lever: {' '.join(finding.lever)}{gain}", markup=False, soft_wrap=True)
