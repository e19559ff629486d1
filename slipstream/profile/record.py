"""RankRecord: what every rank of every run keeps for the doctor, at a few floats per step.

Each rank holds its last `max_steps` steps (seconds per phase, tokens, the step's balance) in
memory and writes `out_dir/profile/rank-R.json` at each checkpoint and at the end, with what
the trainer adds: memory peaks, the loaders' seconds per source, the topology. Written to a
temporary name and renamed: a crash leaves the last whole record. The record times itself
(`overhead_s`): what recording costs the run is part of the record.

Traces: `Tracer` runs `torch.profiler` over a few steps and writes a Chrome trace (open it in
Perfetto) holding the step timer's phases as ranges; off unless `train.trace_steps` asks.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections import deque
from pathlib import Path

import torch

VERSION = 1
FOLDER = "profile"


def record_path(out: Path, rank: int) -> Path:
    return Path(out) / FOLDER / f"rank-{rank:03d}.json"


def trace_path(out: Path, rank: int) -> Path:
    return Path(out) / FOLDER / f"trace-rank-{rank:03d}.json"


class RankRecord:
    """Per-step rows of one rank. `add` after each step; `write(extra)` now and then."""

    def __init__(self, out: Path, rank: int, max_steps: int = 4096) -> None:
        self.path = record_path(out, rank)
        self.rank = rank
        self.rows: deque[dict] = deque(maxlen=max_steps)
        self.overhead_s = 0.0
        self.steps_seen = 0

    def add(self, step: int, phases: dict[str, float], tokens: float, imbalance: float,
            max_rank_cost: float, rank_cost: float, queue_depth: int = 0) -> None:  # fmt: skip
        t0 = time.perf_counter()
        row = {f"{k}_s": v for k, v in phases.items()}  # `step` (its seconds) too: step_s
        row.update(step=step, tokens=tokens, imbalance=imbalance, max_rank_cost=max_rank_cost,
                   rank_cost=rank_cost, queue_depth=queue_depth)  # fmt: skip
        self.rows.append(row)
        self.steps_seen += 1
        self.overhead_s += time.perf_counter() - t0

    def body(self, extra: dict) -> dict:
        """The record as written: `extra` (what the trainer adds) and the steps as columns."""
        keys = list(self.rows[0]) if self.rows else []
        return {
            "version": VERSION,
            "rank": self.rank,
            **extra,
            "columns": keys,  # the steps as columns: a short file however many steps
            "steps": {k: [r[k] for r in self.rows] for k in keys},
            "steps_seen": self.steps_seen,
            "overhead_s": self.overhead_s,
        }

    def write(self, extra: dict) -> None:
        t0 = time.perf_counter()
        body = self.body(extra)
        body["overhead_s"] += time.perf_counter() - t0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(body) + "\n")
        os.replace(tmp, self.path)
        self.overhead_s += time.perf_counter() - t0


def memory_peaks(device: torch.device) -> dict[str, float]:
    """Peak bytes so far: the device's allocated (CUDA) and this process's resident set, and
    the capacities they are held against."""
    out = {
        "host_peak_bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "host_capacity_bytes": float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
    }
    if device.type == "cuda":
        out["device_peak_bytes"] = float(torch.cuda.max_memory_allocated(device))
        out["device_capacity_bytes"] = float(torch.cuda.get_device_properties(device).total_memory)
    return out


class Tracer:
    """torch.profiler over steps [first, first + num_steps) of this process, exported as a
    Chrome trace with the step timer's phases as ranges (`annotate`)."""

    def __init__(self, path: Path, first: int, num_steps: int, device: torch.device) -> None:
        self.path, self.first, self.last = path, first, first + num_steps
        self.device = device
        self.prof: torch.profiler.profile | None = None

    @property
    def active(self) -> bool:
        return self.prof is not None

    def before_step(self, step: int) -> None:
        if step == self.first and self.prof is None and self.last > self.first:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()

    def after_step(self, step: int) -> None:
        """`step`: the one just taken (0-based, as `before_step`'s)."""
        if self.prof is not None and step + 1 >= self.last:
            self.close()

    def close(self) -> None:
        if self.prof is None:
            return
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.path))
