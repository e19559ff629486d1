"""StepTimer: wall time of each phase of a training step.

On CUDA, kernels run asynchronously: the timer synchronizes the device at each phase boundary
so a phase's time is its own (this costs a little overlap; the breakdown is worth it).

Meters: each pillar reports the seconds it exposed inside other phases (tensor-parallel waits
inside forward and backward, gradient copies inside backward, the all-reduce after backward's
last bucket) as a `Meter`, a phase name and a function giving its running total of seconds.
The timer reads every meter as a phase starts and ends and moves what each one grew by out of
that phase into the meter's own: the loop corrects nothing by hand.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext

import torch

# grad_offload: gradients leaving the model for the host during backward (the offload engine).
PHASES = ("data_wait", "h2d", "forward", "backward", "grad_offload", "comm", "optimizer")

Meter = tuple[str, Callable[[], float]]
"""(the phase its seconds belong to, its running total of exposed seconds)."""


class StepTimer:
    def __init__(
        self, device: torch.device, warmup_steps: int = 1, meters: Iterable[Meter] = ()
    ) -> None:
        self.meters = list(meters)
        for phase, _ in self.meters:
            if phase not in PHASES:
                raise ValueError(f"meter: phase {phase!r} is not one of {PHASES}")
        self.sync = device.type == "cuda"
        self.annotate = False  # phases as torch.profiler ranges (on while a trace records)
        self.warmup_steps = warmup_steps
        self.current: dict[str, float] = defaultdict(float)
        self.totals: dict[str, float] = defaultdict(float)
        self.num_steps = 0
        self._t0 = 0.0

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()  # a sync point, so the phase's kernels are counted in it
        return time.perf_counter()

    def start_step(self) -> None:
        self.current = defaultdict(float)
        self._t0 = self._now()

    @contextmanager
    def phase(self, name: str):
        t0 = self._now()
        before = [read() for _, read in self.meters]
        ranged = torch.profiler.record_function(name) if self.annotate else nullcontext()
        try:
            with ranged:  # a range in the trace, while one is being recorded
                yield
        finally:
            self.current[name] += self._now() - t0
            for (dst, read), was in zip(self.meters, before, strict=True):
                if dst != name:
                    self.move(name, dst, read() - was)

    def move(self, src: str, dst: str, seconds: float) -> None:
        seconds = min(max(seconds, 0.0), self.current[src])
        self.current[src] -= seconds
        self.current[dst] += seconds

    def end_step(self) -> dict[str, float]:
        """This step's seconds per phase, plus `step` and `other` (everything untimed)."""
        step_s = self._now() - self._t0
        out = {p: self.current.get(p, 0.0) for p in PHASES}
        out["other"] = max(0.0, step_s - sum(out.values()))
        out["step"] = step_s
        self.num_steps += 1
        if self.num_steps > self.warmup_steps:  # the first steps carry start-up costs
            for k, v in out.items():
                self.totals[k] += v
        return out

    def shares(self) -> dict[str, float]:
        """Each phase's share of step time over the measured steps."""
        total = self.totals.get("step", 0.0)
        if total <= 0:
            return {}
        return {k: v / total for k, v in self.totals.items() if k != "step"}
