"""Attention-cost balance across data-parallel ranks, on the demo corpus's real document
lengths: the real Planner packs each step (best fit), then rows go to ranks unbalanced (in
order), by greedy LPT, or by Karmarkar-Karp. Prints max/mean rank cost (1.00 = perfect) and the
step-time gain balancing implies (the slowest rank sets the step time).

Cost per row = tokens + sum(doc_len^2) / (6 * 768), the default model (a 768-wide transformer).
Document lengths come from tokenizing every demo document once (BPE when
data/demo/tokenizer.json exists, else bytes); steps then reuse them.

    python -m benchmarks.balance [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from slipstream.data import InlineBackend, MixtureSpec, Planner, build_source_loaders
from slipstream.data.balance import assign_rows, imbalance

ROOT = Path(__file__).resolve().parents[1]
DEMO_SPEC = ROOT / "recipes" / "data" / "demo.toml"
TOKENIZER = ROOT / "data" / "demo" / "tokenizer.json"
METHODS = ("none", "greedy", "kk")


class LengthSource:
    """A source known only by its documents' token counts (all the planner needs), served
    through the inline backend: documents of zeros of the recorded lengths."""

    def __init__(self, lens: np.ndarray, tokenizer) -> None:
        self.lens, self.tokenizer = lens, tokenizer
        self.num_docs, self.num_bad = len(lens), 0

    def get_many(self, ids: list[int]) -> list[np.ndarray]:
        return [np.zeros(int(self.lens[d]), dtype=np.int32) for d in ids]

    def close(self) -> None:
        pass


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
    backend = InlineBackend([LengthSource(x, None) for x in lengths])
    planner = Planner(spec, backend.num_docs, backend.submit, dp_world_size=ranks)
    result = {m: [] for m in METHODS}
    for _ in range(steps):
        plan = planner.plan_step()
        for m in METHODS:
            parts = assign_rows(plan.row_costs, ranks, 1, spec.rows_per_rank, m)
            result[m].append(imbalance(plan.row_costs, [sum(p, []) for p in parts]))
    return {m: statistics.mean(v) for m, v in result.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
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
        + f"{'gain kk':>10}{'gain greedy':>12}"
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
                    + f"{r['none'] / r['kk']:>9.2f}x{r['none'] / r['greedy']:>11.2f}x",
                    flush=True,
                )
    print(f"worst balanced max/mean with >= 4 rows per rank: {worst:.3f} (target <= 1.05)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
