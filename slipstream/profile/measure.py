"""The numbers behind a diagnosis: what each rank of a run recorded (record.py), read back
and reduced per rank and phase (medians after start-up), with the straggler scores, MFU,
memory peaks, each source's cost and a fit of compute time against the balance cost model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slipstream.profile.record import FOLDER
from slipstream.profile.timeline import PHASES


def load_records(run_dir: Path) -> list[dict]:
    """Every rank's record of the run, by rank."""
    files = sorted((Path(run_dir) / FOLDER).glob("rank-*.json"))
    if not files:
        raise ValueError(
            f"{run_dir}: no {FOLDER}/rank-*.json; it is not a run folder, or its run stopped "
            "before its first checkpoint (train a few steps into it first)"
        )
    out = []
    for f in files:
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{f}: unreadable ({e}); train the run again") from None
    return sorted(out, key=lambda r: r["rank"])


def _steps(rec: dict, skip: int) -> dict[str, np.ndarray]:
    cols = {k: np.asarray(v, dtype=float) for k, v in rec["steps"].items()}
    n = len(cols.get("step_s", []))
    skip = min(skip, max(n - 1, 0))
    return {k: v[skip:] for k, v in cols.items()}


def measure(records: list[dict], config: dict, skip: int | None = None,
            peak_flops: float | None = None) -> dict:  # fmt: skip
    """The run's numbers: per rank and phase, memory, data cost per source, balance, MFU,
    straggler scores. `skip`: steps left out at the start (default: 2, or 10% of a long
    run): the first steps carry start-up costs."""
    n = len(records[0]["steps"].get("step_s", []))
    skip = skip if skip is not None else max(2, n // 10)
    cols = [_steps(r, skip) for r in records]
    if not len(cols[0].get("step_s", [])):
        raise ValueError("the run recorded no steps; train a few steps first")
    ranks = [_rank(rec, c) for rec, c in zip(records, cols, strict=True)]
    best = min(r["own_s"] for r in ranks)
    for r in ranks:  # nvidia-resiliency-ext's two scores, 1 = as fast as it gets
        r["relative_score"] = best / r["own_s"] if r["own_s"] else 1.0
        r["individual_score"] = r["best_own_s"] / r["own_s"] if r["own_s"] else 1.0
    main, c0 = records[0], cols[0]
    step_s = ranks[0]["step_s"]
    tokens_per_s = float(np.median(c0["tokens"])) / step_s if step_s else 0.0
    model, topo = main.get("model", {}), main["topology"]
    mfu = None
    if peak_flops and model.get("flops_per_token"):
        mfu = model["flops_per_token"] * tokens_per_s / (peak_flops * topo["world_size"])
    seen = max(main.get("steps_seen", 1), 1)
    dp, per_rank_params = topo["dp_size"], model.get("num_params", 0) / max(topo["tp_size"], 1)
    per_step = [r["overhead_s"] / max(r["steps_seen"], 1) for r in ranks]
    return {
        "steps_measured": len(c0["step_s"]),
        "steps_skipped": skip,
        "step_s": step_s,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "peak_flops": peak_flops,
        "shares": ranks[0]["shares"],
        "ranks": ranks,
        "device": main["device"],
        "topology": topo,
        "model": model,
        "optimizer": main.get("optimizer", {}),
        "sources": _sources(main["data"], seen),
        "data_busy_s_per_step": float(np.sum(main["data"]["busy_s"]) / seen),
        "queue_depth": float(np.median(c0["queue_depth"])) if "queue_depth" in c0 else None,
        "memory": {k: max(r["memory"].get(k, 0.0) for r in ranks) for k in ranks[0]["memory"]},
        # A ring all-reduce of fp32 gradients sends 2 (n - 1) / n of them per rank (an
        # estimate from the parameter count, not a count of bytes sent).
        "grad_allreduce_bytes": 2 * (dp - 1) / dp * 4 * per_rank_params if dp > 1 else 0.0,
        "imbalance": float(np.median(c0["imbalance"])),
        "max_rank_cost": float(np.median(c0["max_rank_cost"])),
        "compute_fit": _compute_fit(cols),
        "overhead": float(np.mean(per_step)) / step_s if step_s else 0.0,
        "settings": _settings(config),
    }


PHASE_COLUMNS = (*PHASES, "other")


def _rank(rec: dict, c: dict[str, np.ndarray]) -> dict:
    """One rank's medians, and its own time: the step less its waits for the others."""
    med = {p: float(np.median(c[f"{p}_s"])) for p in PHASE_COLUMNS}
    step = float(np.median(c["step_s"]))
    own = c["step_s"] - c["comm_s"]
    return {
        "rank": rec["rank"], "step_s": step, "phases_s": med,
        "shares": {p: med[p] / step if step else 0.0 for p in PHASE_COLUMNS},
        "own_s": float(np.median(own)), "best_own_s": float(own.min()),
        "rank_cost": float(np.median(c["rank_cost"])),
        "memory": rec["memory"], "overhead_s": rec.get("overhead_s", 0.0),
        "steps_seen": rec.get("steps_seen", 0),
    }  # fmt: skip


def _compute_fit(cols: list[dict[str, np.ndarray]]) -> dict | None:
    """Forward + backward against the rows' cost, over every rank and step: what a unit of
    the balance cost model takes in seconds here (the imbalance what-if's scale)."""
    cost = np.concatenate([c["rank_cost"] for c in cols])
    work = np.concatenate([c["forward_s"] + c["backward_s"] for c in cols])
    if len(cost) < 4 or np.ptp(cost) == 0:
        return None
    slope, icept = np.polyfit(cost, work, 1)
    resid = work - (slope * cost + icept)
    r2 = 1 - float(resid.var()) / float(work.var()) if work.var() > 0 else 0.0
    return {"s_per_cost": float(slope), "fixed_s": float(icept), "r2": r2}


def _sources(d: dict, steps: int) -> list[dict]:
    """Each source's loader cost: per step, per document, per 1k tokens, its share."""
    busy = np.asarray(d["busy_s"], float)
    out = []
    for i, name in enumerate(d["sources"]):
        docs, toks = d["docs"][i], d["tokens"][i]
        out.append({
            "name": name, "busy_s_per_step": busy[i] / steps,
            "ms_per_doc": 1e3 * busy[i] / docs if docs else None,
            "ms_per_1k_tokens": 1e6 * busy[i] / toks if toks else None,
            "share": float(busy[i] / busy.sum()) if busy.sum() > 0 else 0.0,
            "cpu_fraction": float(d["cpu_s"][i] / busy[i]) if busy[i] > 0 else None,
        })  # fmt: skip
    return out


def _settings(config: dict) -> dict:
    """The levers as the run had them."""
    d, o, p, t = config["data"], config["optim"], config["parallel"], config["train"]
    b = d.get("backend", {})
    return {
        "backend": b.get("kind", "local"), "pool": b.get("pool", "thread"),
        "num_workers": b.get("num_workers", 2), "prefetch_steps": b.get("prefetch_steps", 4),
        "balance": d.get("balance", {}).get("method", "greedy"),
        "micro_batch_size": d["micro_batch_size"], "num_micro_batches": d["num_micro_batches"],
        "seq_len": d["seq_len"], "offload": o.get("offload", False),
        "delayed_update": o.get("delayed_update", False),
        "offload_threads": o.get("offload_threads", 0), "zero_stage": o.get("zero_stage", 0),
        "grad_clip": o.get("grad_clip", 1.0), "tp": p.get("tp", 1),
        "overlap": p.get("overlap", "auto"), "precision": t.get("precision", "auto"),
        "activation_checkpointing": config["model"].get("activation_checkpointing", False),
        "transforms": [s.get("transform") for s in d["sources"]],
    }  # fmt: skip
