"""The doctor's rules: from the numbers of a run (measure.py), the findings (`examine`).

A finding has a verdict, the numbers behind it, a lever written as a line to paste (a
`--set key=value` for `slipstream train`, or a command), and the gain a what-if model
expects from it (whatif.py). Thresholds follow TraceML's: a phase is a warning at 10% of the
step and critical at 20%; a cause is blamed only when it explains at least 80% of a wait.

What needs another pillar's model comes in as numbers (`Models`), computed by the caller
(`slipstream doctor`, tools/doctor.py): this module reads records and applies rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from slipstream.profile import whatif
from slipstream.profile.measure import measure
from slipstream.profile.timeline import PHASES

WARN, CRITICAL = 0.10, 0.20  # of the step
BLAME = 0.80  # a cause must explain this much of a wait to be named
STRAGGLER = 0.80  # relative score (best rank's own time / this rank's) below this
IMBALANCE = 1.10  # max / mean rank cost above this
MEMORY = 0.90  # of capacity


@dataclass
class Models:
    """Other pillars' numbers for the what-ifs (the caller computes them; None = not known)."""

    balanced: dict | None = None
    """{"method", "cost_ratio"}: the data plane's re-plan of the recorded steps balanced."""
    memory: dict | None = None
    """{"capacity_bytes", "source", "rows": [{strategy, device_bytes, host_bytes, step_s,
    fits}], "current", "best"}: the memory planner for this run's model and capacity."""
    offload_plain_s: float | None = None
    """The trainer's optimizer step without offload (clipping, then torch's AdamW over the
    model's parameters on the device), measured for the run's model."""
    host_scaling: float | None = None
    """The host's AdamW-pattern bandwidth on every core over that on the run's offload
    threads (the host AdamW probe, measured here)."""
    free_cores: int | None = None
    """Cores a CPU-bound loader may add (beside training's threads)."""


@dataclass
class Finding:
    kind: str  # data | memory | communication | imbalance | straggler | offload | compute
    severity: str  # critical | warning | info
    verdict: str
    why: dict
    lever: list[str] = field(default_factory=list)  # lines to paste: --set k=v, or commands
    gain: whatif.Gain | None = None
    note: str = ""

    def to_dict(self) -> dict:
        return {"kind": self.kind, "severity": self.severity, "verdict": self.verdict,
                "why": self.why, "lever": self.lever,
                "gain": self.gain.to_dict() if self.gain else None, "note": self.note}  # fmt: skip


def severity(share: float) -> str | None:
    return "critical" if share >= CRITICAL else "warning" if share >= WARN else None


def examine(m: dict, models: Models | None = None) -> list[Finding]:
    """Every finding, the largest expected gain first; compute-bound when nothing else is."""
    models = models or Models()
    found = [f for rule in RULES if (f := rule(m, models)) is not None]
    found.sort(key=lambda f: (f.severity != "critical", -(f.gain.fraction if f.gain else 0)))
    if not any(f.severity in ("critical", "warning") for f in found):
        found.append(_compute(m, models))
    return found


def _data(m: dict, models: Models) -> Finding | None:
    r0, s = m["ranks"][0], m["settings"]
    share = r0["shares"]["data_wait"]
    level = severity(share)
    if level is None:
        return None
    wait, step = r0["phases_s"]["data_wait"], m["step_s"]
    busy = m["data_busy_s_per_step"]
    srcs = sorted(m["sources"], key=lambda x: -x["share"])
    top = srcs[0]
    blamed = top["share"] >= BLAME
    where = (
        f"source {top['name']!r} takes {top['share']:.0%} of the loaders' time "
        f"({top['ms_per_doc']:.2f} ms per document)" if blamed
        else "spread over sources: " + ", ".join(f"{x['name']} {x['share']:.0%}" for x in srcs)
    )  # fmt: skip
    cpu_bound = (top["cpu_fraction"] or 0.0) > 0.5
    why = {"data_wait_s": wait, "step_s": step, "share": share, "loader_s_per_step": busy,
           "workers": s["num_workers"], "backend": s["backend"], "sources": srcs}  # fmt: skip
    verdict = f"data-bound: {share:.0%} of each step waiting for data; {where}"
    if s["backend"] == "ray":
        lever = [f"--set data.backend.replicas={2 * max(1, s.get('replicas', 1))}",
                 "--set data.backend.cpu_budget=0"]  # fmt: skip
        return Finding("data", level, verdict, why, lever,
                       note="ray: the autoscaler sizes replicas by cost; give it CPUs")  # fmt: skip
    max_workers = models.free_cores if cpu_bound else None
    want, gain = whatif.data_workers(step, wait, busy, s["num_workers"], max_workers)
    lever = [f"--set data.backend.num_workers={want}"]
    if s["backend"] == "inline":
        lever.insert(0, "--set data.backend.kind=local")
    note = ""
    if cpu_bound and s["pool"] == "thread" and any(s["transforms"]):
        lever.append("--set data.backend.pool=process")
        note = "a Python transform holds the GIL in threads: processes run it in parallel"
    elif gain.predicted_step_s > 0.98 * step:
        lever = [f"--set data.backend.prefetch_steps={2 * s['prefetch_steps']}"]
        note = ("the loaders keep up on average (the wait is bursts, or cores are short): "
                "deeper read-ahead rides out bursts; no model predicts its gain")  # fmt: skip
        gain = None
    return Finding("data", level, verdict, why, lever, gain, note)


def _straggler(m: dict, models: Models) -> Finding | None:
    ranks = m["ranks"]
    if len(ranks) < 2:
        return None
    slow = min(ranks, key=lambda r: r["relative_score"])
    if slow["relative_score"] >= STRAGGLER:
        return None
    others = [r for r in ranks if r is not slow]
    cost_ratio = slow["rank_cost"] / max(np.mean([r["rank_cost"] for r in others]), 1e-12)
    if cost_ratio > 1.0 / STRAGGLER:
        return None  # its rows cost that much more: imbalance, not the rank
    excess = {p: slow["phases_s"][p] - float(np.median([r["phases_s"][p] for r in others]))
              for p in (*PHASES, "other") if p != "comm"}  # fmt: skip
    total = sum(v for v in excess.values() if v > 0)
    phase = max(excess, key=excess.get)
    blamed = total > 0 and excess[phase] / total >= BLAME
    gain = whatif.straggler(m["step_s"], [r["own_s"] for r in ranks], ranks.index(slow))
    share = gain.fraction
    verdict = (f"straggler: rank {slow['rank']} takes {1 / slow['relative_score']:.2f}x the "
               f"fastest rank's own time" + (f", in {phase}" if blamed else
               f" (spread: {', '.join(f'{p} {v / total:.0%}' for p, v in excess.items() if v > 0)})"))  # fmt: skip
    why = {"rank": slow["rank"], "relative_score": slow["relative_score"],
           "individual_score": slow["individual_score"], "excess_s": excess,
           "scores": {r["rank"]: [r["relative_score"], r["individual_score"]] for r in ranks}}  # fmt: skip
    lever = [f"check rank {slow['rank']}'s host: other work on its cores, its device's clocks "
             "or thermals (nvidia-smi -q -d PERFORMANCE); restart the job without that host"]  # fmt: skip
    return Finding("straggler", severity(share) or "warning", verdict, why, lever, gain,
                   "a slow rank holds every other rank at each step's all-reduce")  # fmt: skip


def _imbalance(m: dict, models: Models) -> Finding | None:
    if m["topology"]["dp_size"] < 2 or m["imbalance"] < IMBALANCE:
        return None
    slowest = max(m["ranks"], key=lambda r: r["own_s"])
    compute = slowest["phases_s"]["forward"] + slowest["phases_s"]["backward"]
    # The share of the step the other ranks wait for the costliest (by the cost model): what
    # the finding's severity rests on; the gain is what balancing gets back of it.
    share = (1 - 1 / m["imbalance"]) * compute / m["step_s"]
    why = {"imbalance": m["imbalance"], "balance": m["settings"]["balance"],
           "forward_backward_s": compute, "waiting_share": share}  # fmt: skip
    b = models.balanced
    gain = whatif.balance(m["step_s"], compute, b["cost_ratio"], m["max_rank_cost"],
                          m["compute_fit"]) if b else None  # fmt: skip
    if b:
        why["balanced"] = b
    level = severity(share)
    if level is None:
        return None
    method = b["method"] if b else "kk"
    verdict = (f"imbalance: the costliest data-parallel rank carries {m['imbalance']:.2f}x the "
               f"mean rank's attention + linear cost (balance.method = "
               f"{m['settings']['balance']!r}); every rank waits for it")  # fmt: skip
    return Finding("imbalance", level, verdict, why, [f"--set data.balance.method={method}"],
                   gain)  # fmt: skip


def _communication(m: dict, models: Models) -> Finding | None:
    ranks, s = m["ranks"], m["settings"]
    if m["topology"]["world_size"] < 2:
        return None
    comm = min(r["phases_s"]["comm"] for r in ranks)  # the last to arrive waits least
    share = comm / m["step_s"]
    level = severity(share)
    if level is None:
        return None
    why = {"exposed_comm_s": comm, "share": share, "tp": s["tp"], "overlap": s["overlap"],
           "dp": m["topology"]["dp_size"]}  # fmt: skip
    verdict = f"communication-bound: {share:.0%} of each step in exposed communication"
    if s["tp"] > 1 and s["overlap"] in ("reference", "collective"):
        best = "cuda" if m["device"]["type"] == "cuda" else "shm"
        gain = whatif.overlap(m["step_s"], comm, 0.5)
        return Finding("communication", level, verdict, why, [f"--set parallel.overlap={best}"],
                       gain)  # fmt: skip
    factor = 2
    lever = [f"--set data.num_micro_batches={factor * s['num_micro_batches']}"]
    gain = whatif.more_tokens_per_reduce(m["step_s"], comm, factor)
    return Finding("communication", level, verdict, why, lever, gain,
                   "the gradients' all-reduce is paid once per step: more tokens per step "
                   "share it (a larger global batch: retune the learning rate)")  # fmt: skip


def _memory(m: dict, models: Models) -> Finding | None:
    mem = models.memory
    peaks = [r["memory"] for r in m["ranks"]]
    measured = max((p.get("device_peak_bytes", 0.0) for p in peaks), default=0.0)
    if mem is None:
        cap = max((p.get("device_capacity_bytes", 0.0) for p in peaks), default=0.0)
        if not cap or measured / cap < MEMORY:
            return None
        return Finding("memory", "warning",
                       f"memory: device peak {measured / 2**30:.1f} of {cap / 2**30:.1f} GiB",
                       {"device_peak_bytes": measured, "capacity_bytes": cap},
                       ["slipstream memory RECIPE"])  # fmt: skip
    cap, cur, best = mem["capacity_bytes"], mem["current"], mem.get("best")
    need = max(cur["device_bytes"], measured)
    if need / cap < MEMORY:
        return None
    gib = 2**30
    why = {"device_bytes": need, "capacity_bytes": cap, "capacity_from": mem["source"],
           "planner": mem["rows"]}  # fmt: skip
    level = "critical" if need > cap else "warning"
    fits = "does not fit" if need > cap else f"is at {need / cap:.0%} of"
    verdict = (f"memory: {cur['strategy']} needs {need / gib:.2f} GiB per rank and {fits} a "
               f"{cap / gib:.2f} GiB device")  # fmt: skip
    if best is None:
        return Finding("memory", level, verdict, why, ["slipstream memory RECIPE"],
                       note="no strategy fits: more ranks (ZeRO-2) or a larger device")  # fmt: skip
    gain = whatif.Gain(m["step_s"], m["step_s"] * best["step_s"] / max(cur["step_s"], 1e-12),
                       "medium", f"the memory planner: {best['strategy']} takes "
                       f"{best['device_bytes'] / gib:.2f} GiB, its step {best['step_s'] / cur['step_s']:.2f}x "
                       f"{cur['strategy']}'s")  # fmt: skip
    why["after_bytes"] = best["device_bytes"]
    return Finding("memory", level, verdict, why, best["lever"], gain,
                   f"frees {(need - best['device_bytes']) / gib:.2f} GiB per rank")  # fmt: skip


def _offload(m: dict, models: Models) -> Finding | None:
    s, r0 = m["settings"], m["ranks"][0]
    if not s["offload"]:
        return None
    host = r0["phases_s"]["optimizer"] + r0["phases_s"]["grad_offload"]
    share = host / m["step_s"]
    level = severity(share)
    if level is None:
        return None
    why = {"host_s": host, "share": share, **m["optimizer"]}
    verdict = f"offload host-bound: {share:.0%} of each step in the host step and copies"
    mem = models.memory
    plain_fits = mem is not None and any(
        row["strategy"] == "plain" and row["fits"] for row in mem["rows"])  # fmt: skip
    rejected = []
    if plain_fits and models.offload_plain_s is not None:
        why["plain_step_s"] = models.offload_plain_s
        gain = whatif.replace_phase(
            m["step_s"], host, models.offload_plain_s,
            f"the planner says the model fits without offload: the step on the device "
            f"({models.offload_plain_s * 1e3:.1f} ms, measured for this size) instead of "
            f"{host * 1e3:.1f} ms on the host")  # fmt: skip
        if gain.fraction > 0:
            return Finding("offload", level, verdict, why, ["--set optim.offload=false"], gain,
                           "offload buys memory; this model does not need it here")  # fmt: skip
        rejected.append(f"optim.offload=false gains nothing ({gain.model})")
    if m["device"]["type"] == "cuda" and not s["delayed_update"]:
        gain = whatif.replace_phase(m["step_s"], r0["phases_s"]["optimizer"], 0.0,
                                    "the host step behind the next step's compute", "low")  # fmt: skip
        return Finding("offload", level, verdict, why, ["--set optim.delayed_update=true"], gain,
                       "; ".join(rejected))  # fmt: skip
    cpus = m["device"].get("cpus", 1)
    threads = s["offload_threads"] or cpus
    scaling = models.host_scaling
    host_step = m["optimizer"].get("offload/host_step_s")
    if threads < cpus and scaling and host_step:
        gain = whatif.replace_phase(
            m["step_s"], host_step, host_step / scaling,
            f"the host step ({host_step * 1e3:.1f} ms) at the probe's bandwidth on {cpus} "
            f"threads, {scaling:.2f}x its bandwidth on {threads}")  # fmt: skip
        if gain.fraction > 0:
            return Finding("offload", level, verdict, why,
                           [f"--set optim.offload_threads={cpus}"], gain, "; ".join(rejected))  # fmt: skip
        rejected.append(f"more host threads gain nothing ({gain.model})")
    return Finding("offload", level, verdict, why, ["slipstream memory RECIPE"],
                   note="; ".join(rejected) or "the host step already uses every core")  # fmt: skip


def _compute(m: dict, models: Models) -> Finding:
    sh = m["shares"]
    share = sh["forward"] + sh["backward"]
    s = m["settings"]
    lever = []
    if m["device"]["type"] == "cuda" and s["precision"] in ("fp32",):
        lever.append("--set train.precision=bf16")
    lever.append(f"--set data.micro_batch_size={2 * s['micro_batch_size']}")
    mfu = f"; MFU {m['mfu']:.0%}" if m.get("mfu") else ""
    return Finding(
        "compute", "info",
        f"compute-bound: {share:.0%} of each step in forward and backward{mfu}",
        {"forward_backward_share": share, "mfu": m.get("mfu")}, lever, None,
        "nothing to gain from the data, memory or communication levers; larger micro-batches "
        "(if memory allows: `slipstream memory`), bf16, or a faster device",
    )  # fmt: skip


RULES = (_data, _memory, _offload, _communication, _imbalance, _straggler)


def run_finding(record: dict, config: dict) -> tuple[Finding, dict]:
    """The end of a run's line: the top finding from rank 0's own record (the others' are on
    their machines; `slipstream doctor RUN_DIR` reads every rank's), and its phase shares."""
    m = measure([record], config)
    return examine(m)[0], m["shares"]
