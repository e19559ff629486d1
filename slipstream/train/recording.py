"""What every run records for `slipstream doctor` (profile/record.py holds the format): each
rank's seconds per phase per step, its share of the step's attention cost, the loaders' work
per source, memory peaks; and, when `train.trace_steps` asks, a Chrome trace of a few steps."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from slipstream.profile import StepTimer
from slipstream.profile.record import RankRecord, Tracer, memory_peaks, trace_path
from slipstream.train.distributed import Dist

WARMUP_STEPS = 2  # a trace starts after these: the first steps carry start-up costs


class Recorder:
    def __init__(self, out: Path, d: Dist, backend, trace_steps: int, start: int,
                 model: dict) -> None:  # fmt: skip
        """model: the whole model's figures (num_params, flops_per_token, precision)."""
        self.d, self.backend, self.model = d, backend, model
        self.record = RankRecord(out, d.rank)
        first = start + WARMUP_STEPS
        self.tracer = Tracer(trace_path(out, d.rank), first, trace_steps, d.device)
        self.tokens_by_source = [0.0] * len(backend.names)
        self.optimizer_stats: dict[str, float] = {}

    def before_step(self, step: int, timer: StepTimer) -> None:
        self.tracer.before_step(step)
        timer.annotate = self.tracer.active

    def after_step(self, step: int, phases: dict[str, float], batch, row: dict) -> None:
        """`step`: the step just taken, 0-based; `batch` the step's data, `row` its metrics."""
        self.tracer.after_step(step)
        plan, stats = batch.plan, batch.stats
        rank_cost = float(plan.row_costs[plan.assignment[self.d.dp_rank]].sum())
        self.record.add(step + 1, phases, float(stats.num_tokens), stats.imbalance,
                        stats.max_rank_cost, rank_cost, stats.queue_depth)  # fmt: skip
        for s, n in enumerate(stats.tokens_by_source):
            self.tokens_by_source[s] += float(n)
        self.optimizer_stats = {k: v for k, v in row.items() if k.startswith("offload/")}

    def write(self) -> None:
        self.record.write(self.extra())

    def body(self) -> dict:
        """This rank's record as the doctor reads it, without writing it."""
        return self.record.body(self.extra())

    def extra(self) -> dict:
        b, t = self.backend, self.d.topology
        return {
            "topology": {"rank": t.rank, "world_size": t.world_size, "dp_rank": t.dp_rank,
                         "dp_size": t.dp_size, "tp_rank": t.tp_rank, "tp_size": t.tp_size},
            "device": {"type": self.d.device.type, "name": device_name(self.d.device),
                       "threads": torch.get_num_threads(), "cpus": len(os.sched_getaffinity(0))},
            "memory": memory_peaks(self.d.device),
            "model": self.model,
            "data": {"sources": list(b.names), "busy_s": [float(x) for x in b.busy_s],
                     "cpu_s": [float(x) for x in b.cpu_s],
                     "docs": [int(x) for x in b.num_loaded],
                     "tokens": self.tokens_by_source},
            "optimizer": self.optimizer_stats,
        }  # fmt: skip

    def close(self) -> None:
        self.tracer.close()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"
