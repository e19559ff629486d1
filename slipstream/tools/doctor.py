"""`slipstream doctor RECIPE | RUN_DIR`: the run's bottleneck, the lever to pull, what pulling
it should gain, and (`--verify`) what it did gain.

With a recipe, a short profiled run first (`--steps`, into `runs/doctor/<recipe>`, with a
Chrome trace of three steps); with a run folder, what every `slipstream train` run records
(`profile/rank-R.json`). The rules and what-ifs live in `profile/`; this module computes the
other pillars' numbers they take (`Models`): the data plane's re-plan of the recorded steps
with balancing on, the memory planner for the run's model against the device's capacity.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from slipstream.profile.doctor import Models, examine
from slipstream.profile.measure import load_records, measure
from slipstream.profile.report import print_compare, print_report, write_html

GIB = 2**30
TRACE_STEPS = 3
# Dense peak FLOP/s by device name and dtype (vendor data sheets; no sparsity).
PEAKS = {
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp32": 91.6e12},
}


def short_run(recipe: Path, sets: list[str], steps: int, nproc: int, out: Path,
              console: Console) -> None:  # fmt: skip
    """`slipstream train` for `steps` steps into `out`, profiled, nothing but the steps."""
    sets = [*sets, f"train.steps={steps}", f"train.out_dir={out}", "train.checkpoint_every=0",
            "train.eval_every=0", "train.sample_tokens=0", f"train.trace_steps={TRACE_STEPS}",
            "train.progress=false", f"train.log_every={max(steps // 4, 1)}"]  # fmt: skip
    args = [str(recipe), *[x for s in sets for x in ("--set", s)], "--overwrite"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "slipstream", "train", *args]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "slipstream", "train", *args]
    console.print(f"doctor: {steps} profiled steps: {shlex.join(cmd[1:])}", markup=False,
                  soft_wrap=True)  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise ValueError(f"doctor: the profiled run failed (exit {done.returncode}): {tail[0]}")


def peak_flops(device: dict, dtype: str) -> tuple[float | None, str]:
    """The device's dense peak for the run's dtype: the data sheet's on a known GPU; on a CPU,
    measured here (a second of fp32 matmuls on the threads the run had)."""
    if device["type"] == "cuda":
        for key, peaks in PEAKS.items():
            if key in device["name"]:
                return peaks.get(dtype, peaks["fp32"]), f"{key} data sheet, {dtype}"
        return None, "unknown device"
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, device.get("threads", threads)))
    a = torch.randn(512, 512)
    best = 0.0
    end = time.perf_counter() + 1.0
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(8):
            a @ a
        best = max(best, 8 * 2 * 512**3 / (time.perf_counter() - t0))
    torch.set_num_threads(threads)
    return best, f"measured here: fp32 matmul on {device.get('threads', threads)} thread(s)"


def balanced_costs(cfg, records: list[dict], methods=("kk", "greedy")) -> dict | None:
    """The recorded steps re-planned as they are and with each balancing method: the
    costliest rank's cost, balanced over as-is (the planner is a pure function of the spec,
    the seed and the step)."""
    import dataclasses

    from slipstream.data.planner import Planner
    from slipstream.data.sources.loader import build_source_loaders

    spec = cfg.data
    dp = records[0]["topology"]["dp_size"]
    steps = records[0]["steps"].get("step", [])
    if dp < 2 or not steps:
        return None
    loaders = build_source_loaders(spec, spec.tokenizer)
    try:
        lengths = [ldr.lengths() for ldr in loaders]
    finally:
        for ldr in loaders:
            ldr.close()
    cost = records[0]["model"].get("attention_cost")

    def max_costs(method: str) -> np.ndarray:
        s = dataclasses.replace(spec, balance=dataclasses.replace(spec.balance, method=method))
        planner = Planner(s, lengths, dp_world_size=dp, attention_cost=cost)
        out = []
        for _ in range(int(max(steps))):
            plan = planner.plan_step()
            per_rank = plan.row_costs[plan.assignment.reshape(dp, -1)].sum(axis=1)
            out.append(per_rank.max())
        return np.asarray(out)

    now = max_costs(spec.balance.method)
    best = None
    for method in methods:
        if method == spec.balance.method:
            continue
        ratio = float(np.median(max_costs(method) / now))
        if best is None or ratio < best["cost_ratio"]:
            best = {"method": method, "cost_ratio": ratio}
    return best


LEVERS = {
    "plain": ["--set optim.offload=false"],
    "offload": ["--set optim.offload=true"],
    "offload+ckpt": ["--set optim.offload=true", "--set model.activation_checkpointing=true"],
    "offload+dpu": ["--set optim.offload=true", "--set optim.delayed_update=true"],
    "zero2": ["--set optim.offload=true", "--set optim.zero_stage=2"],
}


def memory_model(cfg, m: dict, device_gib: float | None) -> dict | None:
    """The memory planner for the run's model on its device: the capacity given
    (--device-gib), the GPU's, or on a CPU the host's (the device is the host)."""
    import dataclasses

    from slipstream.models import GPTConfig
    from slipstream.offload.estimate import Hardware, plan
    from slipstream.tools.memory import workload_from_config

    if not isinstance(cfg.model, GPTConfig):
        return None
    r0 = m["ranks"][0]["memory"]
    cuda = m["device"]["type"] == "cuda"
    if device_gib:
        cap, source = device_gib * GIB, f"--device-gib {device_gib:g}"
    elif cuda:
        cap, source = r0["device_capacity_bytes"], "the device's"
    else:
        cap, source = r0["host_capacity_bytes"], "the host's memory (the device is the host)"
    w = workload_from_config(cfg, m["topology"]["dp_size"])
    if m["model"].get("dtype") == "fp32" and not cuda:
        w = dataclasses.replace(w, act_bytes=4)
    ph = m["ranks"][0]["phases_s"]
    compute_s = ph["forward"] + ph["backward"]
    tokens = w.tokens * w.accum_steps
    flops = 6 * w.num_params * tokens / compute_s if compute_s > 0 else 1e12
    gbps = m["optimizer"].get("offload/host_gb_per_s")
    hw = Hardware(device_bytes=cap, host_bytes=r0["host_capacity_bytes"], device_flops=flops,
                  host_bytes_per_s=gbps * 1e9 if gbps else 20e9,
                  separate_device=cuda)  # fmt: skip
    rows, best = plan(w, hw)
    s = m["settings"]
    current = ("offload+dpu" if s["delayed_update"] else
               "offload+ckpt" if s["activation_checkpointing"] else "offload") \
        if s["offload"] else "plain"  # fmt: skip
    table = [{"strategy": e.strategy, "device_bytes": e.device_bytes, "host_bytes": e.host_bytes,
              "step_s": e.step_s, "fits": e.fits, "available": e.available,
              "lever": LEVERS[e.strategy]} for e in rows]  # fmt: skip
    cur = next(r for r in table if r["strategy"] == current)
    pick = next((r for r in table if best and r["strategy"] == best.strategy), None)
    if pick is not None and pick["strategy"] == current:
        pick = None
    return {"capacity_bytes": cap, "source": source, "rows": table, "current": cur,
            "best": pick, "num_params": w.num_params, "host_bytes_per_s": hw.host_bytes_per_s}  # fmt: skip


def compute_models(cfg, records: list[dict], m: dict, device_gib: float | None) -> Models:
    models = Models(free_cores=max(1, m["device"].get("cpus", 1) - m["device"].get("threads", 1)))
    if m["settings"]["balance"] in ("none", "random") or m["imbalance"] >= 1.10:
        models.balanced = balanced_costs(cfg, records)
    models.memory = memory_model(cfg, m, device_gib)
    s = m["settings"]
    if models.memory and s["offload"]:
        models.offload_plain_s = plain_step_seconds(cfg, m)
    cpus = m["device"].get("cpus", 1)
    if s["offload"] and 0 < s["offload_threads"] < cpus:
        from slipstream.offload.host_adam import measure_host_bandwidth

        now, every = (measure_host_bandwidth(n, numel=2**23) for n in (s["offload_threads"], cpus))
        models.host_scaling = every / now
    return models


def plain_step(cfg, m: dict, cap: int = 2**26):
    """The trainer's optimizer without offload for the run's model (`build_optimizer`: the
    global norm clipped, then torch's fused AdamW, matrices decayed) on the run's kind of
    device, with random gradients; and the factor its step's time scales by to the model's.
    A model over `cap` elements gets its first parameters up to `cap` (the embedding and the
    first blocks: the same tensor sizes), scaled by count, since the step is bandwidth-bound;
    under tensor parallelism a rank steps about 1/tp of the model."""
    import dataclasses

    import torch
    from torch import nn

    from slipstream.models import GPT
    from slipstream.tools.memory import gpt_config
    from slipstream.train.optim import build_optimizer

    dev = torch.device("cuda" if m["device"]["type"] == "cuda" else "cpu")
    with torch.device("meta"):
        shapes = [p.shape for p in GPT(gpt_config(cfg)).parameters()]
    taken, n = [], 0
    for shape in shapes:
        if taken and n + shape.numel() > cap:
            break
        taken.append(shape)
        n += shape.numel()
    scale = sum(s.numel() for s in shapes) / n / m["topology"].get("tp_size", 1)
    params = nn.ParameterList(nn.Parameter(torch.zeros(s, device=dev)) for s in taken)
    generator = torch.Generator(dev).manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, device=dev, generator=generator)
    optim = dataclasses.replace(cfg.optim, offload=False, zero_stage=0, delayed_update=False)
    return build_optimizer(params, optim, dev), scale


def plain_step_seconds(cfg, m: dict, repeats: int = 5) -> float:
    """`plain_step`'s step timed here on the run's threads (median of `repeats`, after one
    that builds the moments), scaled to the run's model. Each starts from cold caches, as in
    training, where the forward and backward passes have evicted the weights and moments."""
    import torch

    opt, scale = plain_step(cfg, m)
    cuda = m["device"]["type"] == "cuda"
    evict = torch.empty(2**25, device="cuda" if cuda else "cpu")  # 128 MiB: past any cache
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, m["device"].get("threads", threads)))
    try:
        times = []
        for _ in range(repeats + 1):
            evict.fill_(1.0)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return float(np.median(times[1:])) * scale


def diagnose_run(run_dir: Path, device_gib: float | None = None) -> dict:
    """The doctor's report of a run folder, as doctor.json holds it."""
    from slipstream.config import RunConfig

    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{run_dir}: no config.json; give a run folder (a train.out_dir) or a "
                         "recipe")  # fmt: skip
    raw = json.loads(config_path.read_text())
    records = load_records(run_dir)
    peak, peak_from = peak_flops(records[0]["device"], records[0].get("model", {}).get("dtype",
                                 "fp32"))  # fmt: skip
    m = measure(records, raw, peak_flops=peak)
    m["peak_from"] = peak_from
    cfg = RunConfig.from_dict(raw)
    models = compute_models(cfg, records, m, device_gib)
    findings = examine(m, models)
    traces = sorted(str(p) for p in (run_dir / "profile").glob("trace-rank-*.json"))
    return {"run": str(run_dir), "profile": m, "findings": [f.to_dict() for f in findings],
            "traces": traces, "verify": None}  # fmt: skip


def verify(report: dict, recipe: Path, sets: list[str], steps: int, nproc: int, out: Path,
           device_gib: float | None, console: Console) -> dict:  # fmt: skip
    """Apply the top finding's lever in a second short run; predicted against measured."""
    top = next((f for f in report["findings"] if f["gain"] and
                all(x.startswith("--set ") for x in f["lever"])), None)  # fmt: skip
    if top is None:
        return {"checked": False, "why": "no finding has a lever the doctor can apply "
                "(--set lines) with a predicted gain"}  # fmt: skip
    extra = [x.split(" ", 1)[1] for x in top["lever"]]
    after_dir = out.with_name(out.name + "-verify")
    short_run(recipe, [*sets, *extra], steps, nproc, after_dir, console)
    after = diagnose_run(after_dir, device_gib)
    (after_dir / "doctor.json").write_text(json.dumps(after, indent=2, default=float) + "\n")
    before_s, after_s = report["profile"]["step_s"], after["profile"]["step_s"]
    predicted = top["gain"]["fraction"]
    # Per token: a lever may change the tokens a step holds (more micro-batches).
    measured = 1 - report["profile"]["tokens_per_s"] / after["profile"]["tokens_per_s"]
    return {
        "checked": True, "kind": top["kind"], "lever": top["lever"], "run": str(after_dir),
        "step_s_before": before_s, "step_s_after": after_s,
        "predicted_fraction": predicted, "measured_fraction": measured,
        "error": (measured - predicted) / predicted if predicted else None,
        "predicted_step_s": top["gain"]["predicted_step_s"],
    }  # fmt: skip


def run_doctor(args: argparse.Namespace, console: Console | None = None) -> dict:
    console = console or Console()
    target = Path(args.target)
    if args.steps < 4:
        raise ValueError(f"--steps: {args.steps}; at least 4 (the first steps are left out)")
    if target.is_dir():
        if args.set or args.verify:
            raise ValueError(f"{target}: --set and --verify need a recipe (they train); a run "
                             "folder is read as it is")  # fmt: skip
        run_dir = target
    elif target.is_file():
        run_dir = Path(args.out) if args.out else Path("runs") / "doctor" / target.stem
        for folder in (run_dir, run_dir.with_name(run_dir.name + "-verify")):
            if (folder / "config.json").is_file() and not (folder / "doctor.json").is_file():
                raise ValueError(f"--out: {folder} holds a run the doctor did not make (it "
                                 "replaces its profiled runs); give another --out")  # fmt: skip
        short_run(target, args.set, args.steps, args.nproc, run_dir, console)
    else:
        raise ValueError(f"{target}: no such recipe or run folder")
    report = diagnose_run(run_dir, args.device_gib)
    if args.verify:
        report["verify"] = verify(report, target, args.set, args.steps, args.nproc, run_dir,
                                  args.device_gib, console)  # fmt: skip
    (run_dir / "doctor.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    html = write_html(report, run_dir / "doctor.html")
    print_report(console, report)
    console.print(f"report: {html}; numbers: {run_dir / 'doctor.json'}", markup=False,
                  soft_wrap=True)  # fmt: skip
    return report


def run_compare(a: str, b: str, device_gib: float | None = None,
                console: Console | None = None) -> dict:  # fmt: skip
    """Two run folders' reports (their doctor.json, or made now), phase by phase."""
    console = console or Console()
    reports = []
    for run in (a, b):
        path = Path(run) / "doctor.json"
        reports.append(json.loads(path.read_text()) if path.is_file()
                       else diagnose_run(Path(run), device_gib))  # fmt: skip
    return print_compare(console, *reports)
