"""The planner at job scale, from metadata only: time and memory per step as the sources grow
to 306 and the simulated data-parallel ranks to 4,096 (OVERLORD's scale).

Every rank plans the whole step itself (the plan is a pure function of the spec, the step and
the documents' token counts), so this cost is paid on every rank, every step, in the loader's
background thread. Token counts are synthetic (lognormal, median ~600 tokens, 20k documents
per source); each rank holds 4 rows of 4,096 tokens. Median of --steps steps after one
warm-up step; memory is the peak of Python allocations while planning one more step
(tracemalloc, untimed), beside the token-count arrays themselves. The planner's two loops
run in C (`slipstream/data/kernels/plan.c`); the last line times their Python twins (what a
machine without a C compiler runs, the same plans) at the largest size.

    python -m benchmarks.planner_scale [--sources 8,64,306] [--ranks 8,512,4096] [--steps 5]
        [--method kk] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from benchmarks.harness import provenance

STEP_S = 1.0  # the target: planning under 10% of a 1-second training step


def make_spec(num_sources: int, method: str):
    from slipstream.data import MixtureSpec

    rng = np.random.default_rng(0)
    sources = [
        {"name": f"s{i}", "format": "jsonl", "paths": [f"s{i}.jsonl"], "weight": float(w)}
        for i, w in enumerate(rng.dirichlet(np.ones(num_sources)))
    ]
    raw = {
        "sources": sources,
        "seq_len": 4096,
        "micro_batch_size": 2,
        "num_micro_batches": 2,
        "balance": {"method": method},
    }
    return MixtureSpec.from_dict(raw)


def rank_work(spec, plan, ranks: int) -> float:
    """Seconds rank 0 spends on a plan besides planning it: the step's statistics, finding its
    own rows' pieces and documents, and which of them other ranks need too."""
    from slipstream.data.loader import shared_docs, step_stats
    from slipstream.data.packing import doc_keys

    t0 = time.perf_counter()
    step_stats(spec, plan, ranks)
    mine = plan.pieces_of(plan.rank_rows(0))
    docs = np.unique(doc_keys(plan.piece_source[mine], plan.piece_doc[mine]))
    [plan.row(i) for i in plan.rank_rows(0).tolist()]
    shared_docs(plan, 0, ranks, docs)
    return time.perf_counter() - t0


def measure(num_sources: int, ranks: int, steps: int, method: str, native=None) -> dict:
    from slipstream.data import Planner

    spec = make_spec(num_sources, method)
    rng = np.random.default_rng(1)
    lengths = [
        np.maximum(1, rng.lognormal(np.log(600), 1.0, 20_000)).astype(np.int32)
        for _ in range(num_sources)
    ]
    planner = Planner(spec, lengths, dp_world_size=ranks, native=native)
    planner.plan_step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        plan = planner.plan_step()
        times.append(time.perf_counter() - t0)
    rank_ms = []  # what a rank does with each plan besides planning: stats, its own rows
    for _ in range(steps):
        rank_ms.append(rank_work(spec, planner.plan_step(), ranks) * 1e3)
    tracemalloc.start()  # one more step, traced (tracing slows Python: not timed)
    planner.plan_step()
    peaks = [tracemalloc.get_traced_memory()[1]]
    tracemalloc.stop()
    return {
        "sources": num_sources,
        "ranks": ranks,
        "rows": len(plan.rows),
        "docs": int(sum(plan.docs_drawn)),
        "step_ms": [t * 1e3 for t in times],
        "median_ms": statistics.median(times) * 1e3,
        "rank_ms": statistics.median(rank_ms),
        "peak_alloc_mib": max(peaks) / 2**20,
        "lengths_mib": sum(x.nbytes for x in lengths) / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sources", default="8,64,306")
    ap.add_argument("--ranks", default="8,512,4096")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--method", default="kk")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    for n in [int(x) for x in args.sources.split(",")]:
        for r in [int(x) for x in args.ranks.split(",")]:
            res = measure(n, r, args.steps, args.method)
            rows.append(res)
            print(f"{n} sources, {r} ranks: {res['median_ms']:.1f} ms", file=sys.stderr)
    print(f"\nplanning one step from token counts (balance {args.method}), median of {args.steps}")
    head = ["sources", "ranks", "rows", "docs", "ms/step", "% of 1 s", "rank ms", "peak MiB",
            "counts MiB"]  # fmt: skip
    print("".join(f"{h:>11}" for h in head))
    for r in rows:
        cells = [r["sources"], r["ranks"], r["rows"], r["docs"]]
        print(
            "".join(f"{c:>11}" for c in cells)
            + f"{r['median_ms']:>11.1f}{r['median_ms'] / (STEP_S * 10):>10.1f}%"
            + f"{r['rank_ms']:>11.1f}{r['peak_alloc_mib']:>11.1f}{r['lengths_mib']:>11.1f}"
        )
    print("rank ms: what each rank does with a plan besides computing it (statistics, its rows)")
    last = rows[-1]
    print(
        f"largest: {last['sources']} sources x {last['ranks']} ranks: "
        f"{last['median_ms']:.0f} ms per step = {last['median_ms'] / (STEP_S * 10):.1f}% of a "
        "1-second step (target < 10%)"
    )
    twin = measure(last["sources"], last["ranks"], 2, args.method, native=False)
    print(
        f"the same with the Python twins of the C loops (no compiler): "
        f"{twin['median_ms']:.0f} ms ({twin['median_ms'] / last['median_ms']:.1f}x)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {**provenance(), "method": args.method, "runs": rows, "python_twins": twin},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
