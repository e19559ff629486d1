"""Attention-cost balance across data-parallel ranks, two ways.

1. Planner level, on the demo corpus's real document lengths: the real Planner packs each step
   (best fit), then rows go to ranks in packing order (`none`: contiguous blocks, the worst
   case, since best fit puts the heaviest rows first), in a random order (`random`: what a
   user gets without balancing), by greedy LPT, or by Karmarkar-Karp. Prints max/mean rank cost
   (1.00 = perfect) and the gain balancing implies over random order. Cost per row = tokens +
   b * sum(doc_len^2) with b of GPT-2 small (DEFAULT_ATTENTION_COST). Document lengths come
   from tokenizing every demo document once (BPE when data/demo/tokenizer.json exists, else
   bytes).

2. Real step time (`--step-time`): `slipstream train` under torchrun with 2 ranks (gloo, one
   thread each) at a long seq_len on the demo corpus (bytes: long documents), balance
   `none`, `random` and `kk`; the measured mean step time beside the one the cost model
   predicts (step time proportional to the costliest rank's cost, fitted on the `random` run).

    python -m benchmarks.balance [--steps 4] [--step-time] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import provenance
from slipstream.data import MixtureSpec, Planner, build_source_loaders
from slipstream.data.balance import assign_rows, imbalance

ROOT = Path(__file__).resolve().parents[1]
DEMO_SPEC = ROOT / "recipes" / "data" / "demo.toml"
TOKENIZER = ROOT / "data" / "demo" / "tokenizer.json"
METHODS = ("none", "random", "greedy", "kk")
STEP_TIME_METHODS = ("none", "random", "kk")


def doc_lengths(spec: MixtureSpec) -> list[np.ndarray]:
    out = []
    for ldr in build_source_loaders(spec):
        lens = []
        for start in range(0, ldr.num_docs, 512):
            ids = range(start, min(start + 512, ldr.num_docs))
            lens.extend(len(t) for t in ldr.get_many(list(ids)))
        out.append(np.array(lens))
    return out


def run(spec: MixtureSpec, lengths: list[np.ndarray], steps: int, ranks: int) -> dict[str, float]:
    planner = Planner(spec, lengths, dp_world_size=ranks)  # it needs token counts only
    result = {m: [] for m in METHODS}
    for step in range(steps):
        plan = planner.plan_step()
        for m in METHODS:
            parts = assign_rows(plan.row_costs, ranks, 1, spec.rows_per_rank, m, seed=step)
            result[m].append(imbalance(plan.row_costs, parts.reshape(ranks, -1)))
    return {m: statistics.mean(v) for m, v in result.items()}


def step_time_recipe(tmp: Path, seq_len: int, rows_per_rank: int, steps: int) -> Path:
    """A small GPT at a long seq_len, so that attention is a large share of the work."""
    recipe = tmp / "balance.toml"
    recipe.write_text(
        f"""[model]
n_layer = 2
n_head = 2
d_model = 128
max_seq_len = {seq_len}

[data]
spec = "{DEMO_SPEC}"
tokenizer = "byte"
seq_len = {seq_len}
micro_batch_size = 1
num_micro_batches = {rows_per_rank}

[train]
steps = {steps}
eval_every = 0
checkpoint_every = 0
sample_tokens = 0
progress = false
log_every = 0
"""
    )
    return recipe


def run_step_time(
    method: str, seq_len: int, rows_per_rank: int, steps: int, tmp: Path
) -> list[dict]:
    recipe = step_time_recipe(tmp, seq_len, rows_per_rank, steps)
    out_dir = tmp / f"run-{method}"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "slipstream",
        "train",
        str(recipe),
        "--set",
        f"data.balance.method='{method}'",
        "--set",
        "train.num_threads=1",
        "--set",
        f"train.out_dir='{out_dir}'",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]


def step_time(seq_len: int, rows_per_rank: int, steps: int, warmup: int) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rows = {
            m: run_step_time(m, seq_len, rows_per_rank, steps, Path(tmp))[warmup:]
            for m in STEP_TIME_METHODS
        }
    # Fit step time = alpha * max rank cost + beta over every step of every run (least
    # squares): how much of the step-to-step variation the cost model explains (R^2).
    x = np.array([r["balance/max_rank_cost"] for rs in rows.values() for r in rs])
    y = np.array([r["time/step_s"] for rs in rows.values() for r in rs])
    alpha, beta = np.polyfit(x, y, 1)
    r2 = 1 - np.sum((y - (alpha * x + beta)) ** 2) / np.sum((y - y.mean()) ** 2)
    out = {}
    print(
        f"\nstep time, 2 ranks under torchrun, seq_len {seq_len}, {rows_per_rank} rows per "
        f"rank, {steps - warmup} steps"
    )
    print(f"{'balance':<9}{'max/mean':>9}{'step s':>9}{'predicted':>11}{'per step':>10}")
    for m, rs in rows.items():
        measured = [r["time/step_s"] for r in rs]
        predicted = [alpha * r["balance/max_rank_cost"] + beta for r in rs]
        imb = statistics.mean(r["balance/max_over_mean"] for r in rs)
        out[m] = {
            "max_over_mean": imb,
            "step_s": statistics.mean(measured),
            "predicted_step_s": statistics.mean(predicted),
            "runs_step_s": measured,
        }
        print(
            f"{m:<9}{imb:>9.3f}{out[m]['step_s']:>9.3f}{out[m]['predicted_step_s']:>11.3f}"
            f"   {' '.join(f'{t:.2f}' for t in measured)}"
        )
    gain = out["random"]["step_s"] / out["kk"]["step_s"]
    pred = out["random"]["predicted_step_s"] / out["kk"]["predicted_step_s"]
    print(f"kk over random order: measured {gain:.2f}x, predicted {pred:.2f}x")
    print(f"step time ~ max rank cost: R^2 = {r2:.2f} over {len(x)} steps")
    return {
        "seq_len": seq_len,
        "rows_per_rank": rows_per_rank,
        "fit": [alpha, beta],
        "r2": r2,
        "methods": out,
        "gain": gain,
        "pred": pred,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--step-time", action="store_true", help="also measure real step time")
    ap.add_argument("--step-time-seq-len", type=int, default=4096)
    ap.add_argument("--step-time-rows", type=int, default=4, help="rows per rank")
    ap.add_argument("--step-time-steps", type=int, default=14)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    tok = f"tokenizer='{TOKENIZER}'" if TOKENIZER.is_file() else "tokenizer='byte'"
    base = MixtureSpec.from_toml(DEMO_SPEC, [tok])
    t0 = time.perf_counter()
    lengths = doc_lengths(base)
    all_lens = np.concatenate(lengths)
    print(
        f"{len(all_lens):,} documents ({tok}); tokens per document: median "
        f"{np.median(all_lens):,.0f}, p90 {np.percentile(all_lens, 90):,.0f}, max "
        f"{all_lens.max():,} ({time.perf_counter() - t0:.0f} s to tokenize)"
    )
    header = (
        f"{'seq_len':>8}{'ranks':>7}{'rows/rank':>10}"
        + "".join(f"{m:>10}" for m in METHODS)
        + f"{'kk/random':>11}{'kk/none':>9}"
    )
    print(header)
    rows, worst = [], 0.0
    for seq_len in (4096, 8192, 16384, 32768):
        for ranks in (8, 64):
            for rows_per_rank in (1, 4, 16):
                spec = MixtureSpec.from_toml(
                    DEMO_SPEC,
                    [
                        tok,
                        f"seq_len={seq_len}",
                        f"micro_batch_size={rows_per_rank}",
                        "num_micro_batches=1",
                    ],
                )
                r = run(spec, lengths, args.steps, ranks)
                if rows_per_rank >= 4:
                    worst = max(worst, min(r["greedy"], r["kk"]))
                rows.append(
                    {"seq_len": seq_len, "ranks": ranks, "rows_per_rank": rows_per_rank, **r}
                )
                print(
                    f"{seq_len:>8}{ranks:>7}{rows_per_rank:>10}"
                    + "".join(f"{r[m]:>10.3f}" for m in METHODS)
                    + f"{r['random'] / r['kk']:>10.2f}x{r['none'] / r['kk']:>8.2f}x",
                    flush=True,
                )
    print(f"worst balanced max/mean with >= 4 rows per rank: {worst:.3f} (target <= 1.05)")
    measured = None
    if args.step_time:
        measured = step_time(
            args.step_time_seq_len, args.step_time_rows, args.step_time_steps, warmup=2
        )
    if args.json:
        out = {**provenance(("tokenizers",)), "planner": rows, "step_time": measured}
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
