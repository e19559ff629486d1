"""What pulling a lever should gain: small models of the step, each fed with what the run
measured (and, where a pillar has a model of its own, with that pillar's numbers, which the
caller computes: the data plane's re-plan with balancing, the memory planner's step time).

Every function returns a `Gain`: the step time it predicts, against the measured one, and
how sure it is. Confidence is the model's error on what it can check already: a model that
cannot reproduce the run's own measured wait says so (`low`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class Gain:
    step_s: float  # the measured step (median)
    predicted_step_s: float
    confidence: str  # high | medium | low
    model: str  # what the prediction assumed, in a sentence

    @property
    def fraction(self) -> float:
        """Share of the step the lever should save (> 0: faster)."""
        return 1.0 - self.predicted_step_s / self.step_s if self.step_s > 0 else 0.0

    @property
    def speedup(self) -> float:
        return self.step_s / self.predicted_step_s if self.predicted_step_s > 0 else math.inf

    def to_dict(self) -> dict:
        return {**asdict(self), "fraction": self.fraction, "speedup": self.speedup}


def confidence(model_error: float) -> str:
    """From the model's relative error on the run it was fitted to."""
    return "high" if model_error <= 0.10 else "medium" if model_error <= 0.25 else "low"


def data_workers(step_s: float, wait_s: float, busy_s: float, workers: int,
                 max_workers: int | None) -> tuple[int, Gain]:  # fmt: skip
    """Loader workers to add, and what that gains. A step's data takes `busy_s` seconds of
    loader work, spread over `workers`; the consumer needs `step_s - wait_s` of its own. With
    read-ahead, the producer keeps up when busy_s / workers <= the consumer's time, so the
    exposed wait is max(0, busy_s / workers - consumer). Workers past `max_workers` (the
    cores free for CPU-bound loads) add nothing."""
    consumer = max(step_s - wait_s, 1e-9)
    modelled = max(0.0, busy_s / workers - consumer)
    error = abs(modelled - wait_s) / step_s if step_s > 0 else 1.0
    # Enough workers for the producer to run 25% ahead of the consumer.
    want = max(workers + 1, math.ceil(busy_s / (0.8 * consumer)))
    want = min(want, 8 * workers, 64)
    usable = min(want, max_workers) if max_workers else want
    wait_after = max(0.0, busy_s / usable - consumer)
    gain = Gain(
        step_s, consumer + wait_after, confidence(error),
        f"loads of {busy_s * 1e3:.1f} ms per step over {workers} -> {usable} workers against "
        f"{consumer * 1e3:.1f} ms of the consumer's own (modelled wait now "
        f"{modelled * 1e3:.1f} ms, measured {wait_s * 1e3:.1f} ms)",
    )  # fmt: skip
    return want, gain


def balance(step_s: float, compute_s: float, cost_ratio: float, max_cost: float,
            fit: dict | None) -> Gain:  # fmt: skip
    """Balancing gives the costliest rank `cost_ratio` of its cost today (the data plane's
    re-plan of the same steps), and every rank waits on the costliest. What a unit of cost
    takes in seconds comes from the run itself (`fit`: forward + backward against the rows'
    cost over every rank and step, so fixed costs that do not scale are left out); without a
    fit that explains half the variance (r2 >= 0.5: a noisy machine), all of the costliest
    rank's `compute_s` scales, with low confidence."""
    if fit and fit["s_per_cost"] > 0 and fit["r2"] >= 0.5:
        saved = fit["s_per_cost"] * max_cost * (1.0 - cost_ratio)
        sure = "high" if fit["r2"] >= 0.8 else "medium"
        how = (f"{fit['s_per_cost'] * 1e6:.2f} us per unit of cost (fitted over the run, "
               f"r2 {fit['r2']:.2f})")  # fmt: skip
    else:
        saved, sure = compute_s * (1.0 - cost_ratio), "low"
        how = f"all of its {compute_s * 1e3:.1f} ms of forward and backward scaling"
    return Gain(step_s, step_s - saved, sure,
                f"the costliest rank's attention + linear cost x{cost_ratio:.3f} "
                f"(re-planned), at {how}")  # fmt: skip


def more_tokens_per_reduce(step_s: float, comm_s: float, factor: int) -> Gain:
    """`factor` x the micro-batches per step: the all-reduce is paid once per step, so per
    token it shrinks by `factor`. The gain is per token; expressed as the step time per
    today's tokens."""
    per_today = (step_s - comm_s) + comm_s / factor
    return Gain(step_s, per_today, "medium",
                f"{comm_s * 1e3:.1f} ms of exposed communication per step spread over {factor}x "
                "the tokens (step time per today's tokens)")  # fmt: skip


def overlap(step_s: float, comm_s: float, hidden: float) -> Gain:
    """Tile-ordered overlap hides `hidden` of the exposed communication behind the matmuls."""
    return Gain(step_s, step_s - hidden * comm_s, "low",
                f"{hidden:.0%} of {comm_s * 1e3:.1f} ms of exposed communication hidden behind "
                "compute (the overlap's measured share on this kind of link)")  # fmt: skip


def straggler(step_s: float, own_s: list[float], slow: int) -> Gain:
    """Without the straggler, every rank waits for the next slowest instead (ByteDance's
    what-if: the step as if that rank were like the others)."""
    others = [t for r, t in enumerate(own_s) if r != slow]
    saved = max(0.0, own_s[slow] - max(others)) if others else 0.0
    return Gain(step_s, step_s - saved, "high" if saved > 0 else "low",
                f"rank {slow} at the next slowest rank's own time ({max(others) * 1e3:.1f} ms "
                f"instead of {own_s[slow] * 1e3:.1f} ms)")  # fmt: skip


def replace_phase(step_s: float, phase_s: float, new_s: float, why: str,
                  sure: str = "medium") -> Gain:  # fmt: skip
    """A phase of `phase_s` becomes `new_s` (a model's), the rest of the step unchanged."""
    return Gain(step_s, step_s - phase_s + new_s, sure, why)
