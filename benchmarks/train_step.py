"""Training throughput: `slipstream train`'s Trainer against a plain nanoGPT-style PyTorch loop
(a DataLoader with a weighted sampler, tokenizing in its workers, packing in collate_fn) on the
same model, data, optimizer and schedule, each in a fresh process, several times.

Two scenarios:
  compute-bound  the demo GPT on the demo mixture: Slipstream's overhead (target <= 3%)
  data-bound     a small GPT, and the code source runs a MinHash screen per document (a slow
                 source, benchmarks/transforms.py): who feeds the model faster (target:
                 Slipstream >= 1.5x)

    python -m benchmarks.train_step [--repeats 3] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import run_isolated

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "demo.toml"
WARMUP = 5
# The plain loop two ways: twice the documents a step needs (rarely a short batch; half the
# tokenized text dropped) and just enough on average (short batches padded).
PLAIN_MARGINS = {"plain": 2.0, "plain-tight": 1.0}
PIPELINES = ("slipstream", *PLAIN_MARGINS)
SCENARIOS = {
    "compute-bound": [],
    "data-bound": [
        "model.n_layer=2",
        "model.d_model=64",
        "model.n_head=2",
        "data.sources.0.transform='benchmarks.transforms:minhash_screen'",
        "data.backend.pool='process'",
    ],
}


def config(scenario: str, steps: int, workers: int):
    from slipstream.config import RunConfig

    return RunConfig.load(
        RECIPE,
        [
            f"train.steps={steps}",
            "train.eval_every=0",
            "train.checkpoint_every=0",
            "train.sample_tokens=0",
            "train.progress=false",
            "train.log_every=0",
            f"train.out_dir='{ROOT / 'runs' / 'bench-train-step'}'",
            "data.holdout_fraction=0.0",
            f"data.backend.num_workers={workers}",
            *SCENARIOS[scenario],
        ],
    )


def run_slipstream(cfg) -> tuple[float, float]:
    from rich.console import Console

    from slipstream.train import Trainer

    history = Trainer(cfg, console=Console(quiet=True)).fit()[WARMUP:]
    tokens = sum(r["tokens"] for r in history)
    wait = sum(r["time/data_wait_s"] for r in history)
    elapsed = sum(r["time/step_s"] for r in history)
    return tokens / elapsed, wait / elapsed


def plain_loop(cfg, margin: float, split_holdout: bool = False):
    """nanoGPT-style: a DataLoader feeds [micro_batch, seq_len] rows; forward, backward, clip,
    AdamW, all in one loop. Packing in collate_fn must either take more documents than a step
    needs (`margin` > 1: the tokens beyond the rows are dropped, wasting preprocessing) or
    risk short batches (padded rows waste compute). Yields (model, seconds waiting for data,
    seconds of the step, tokens) after each step. With `split_holdout`, documents held out
    for evaluation (data.holdout_fraction) are never drawn."""
    from dataclasses import replace

    from torch.utils.data import DataLoader, WeightedRandomSampler

    from benchmarks.peers import MixtureDocs, docs_per_batch, pack_rows
    from slipstream.data import build_tokenizer
    from slipstream.models import GPT
    from slipstream.train.optim import build_optimizer, lr_factor

    spec = cfg.data
    vocab = build_tokenizer(spec.tokenizer, spec.base_dir).vocab_size
    torch.manual_seed(cfg.train.seed)
    model = GPT(replace(cfg.model, vocab_size=vocab))
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    ds = MixtureDocs(spec, split="train" if split_holdout else None)
    g = torch.Generator().manual_seed(0)
    sampler = WeightedRandomSampler(ds.sample_weights(spec.weights_at(0)), 10**7, generator=g)
    loader = DataLoader(
        ds,
        batch_size=docs_per_batch(spec, margin=margin),
        sampler=sampler,
        num_workers=spec.backend.num_workers,
        prefetch_factor=4,
        persistent_workers=True,
        collate_fn=pack_rows(spec.seq_len, spec.micro_batch_size),
    )
    it = iter(loader)
    for step in range(cfg.train.steps):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = cfg.optim.lr * lr_factor(step, cfg.train.steps, cfg.optim)
        logits = model(batch["input_ids"])
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        yield model, t1 - t0, time.perf_counter() - t0, batch["num_tokens"]


def run_plain(cfg, margin: float) -> tuple[float, float]:
    tokens = wait = elapsed = 0.0
    for step, (_, wait_s, step_s, num_tokens) in enumerate(plain_loop(cfg, margin)):
        if step >= WARMUP:
            tokens += num_tokens
            wait += wait_s
            elapsed += step_s
    return tokens / elapsed, wait / elapsed


def run_one(pipeline: str, scenario: str, steps: int, workers: int) -> dict:
    args = [
        "--one",
        pipeline,
        "--scenario",
        scenario,
        "--steps",
        str(steps),
        "--workers",
        str(workers),
    ]
    return run_isolated("benchmarks.train_step", args, timeout_s=900)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", choices=PIPELINES)
    ap.add_argument("--scenario", choices=tuple(SCENARIOS), default="compute-bound")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.one:
        cfg = config(args.scenario, args.steps, args.workers)
        if args.one == "slipstream":
            tps, wait = run_slipstream(cfg)
        else:
            tps, wait = run_plain(cfg, margin=PLAIN_MARGINS[args.one])
        print(json.dumps({"tokens_per_s": tps, "data_wait": wait}))
        return
    results: dict = {}
    for scenario in SCENARIOS:
        runs: dict[str, list[dict]] = {p: [] for p in PIPELINES}
        for r in range(args.repeats):
            for p in runs:
                runs[p].append(run_one(p, scenario, args.steps, args.workers))
                print(
                    f"{scenario} repeat {r + 1}/{args.repeats} {p:>10}: "
                    f"{runs[p][-1]['tokens_per_s']:,.0f} tokens/s",
                    file=sys.stderr,
                )
        results[scenario] = {
            p: {k: statistics.median(x[k] for x in v) for k in v[0]} for p, v in runs.items()
        }
    print(
        f"\n{args.steps} steps ({WARMUP} warm-up), {args.workers} data workers, "
        f"median of {args.repeats}"
    )
    print(f"{'scenario':<16}{'pipeline':<12}{'tokens/s':>12}{'data wait':>11}")
    for scenario, res in results.items():
        for p, m in res.items():
            print(f"{scenario:<16}{p:<12}{m['tokens_per_s']:>12,.0f}{m['data_wait']:>10.0%}")

    def best_plain(res: dict) -> float:
        return max(res[p]["tokens_per_s"] for p in PLAIN_MARGINS)

    cb, db = results["compute-bound"], results["data-bound"]
    overhead = 1 - cb["slipstream"]["tokens_per_s"] / best_plain(cb)
    print(
        f"compute-bound: Slipstream overhead vs the best plain loop {overhead:+.1%} "
        "(target <= 3%; negative = faster)"
    )
    print(
        f"data-bound: Slipstream / best plain loop tokens/s: "
        f"{db['slipstream']['tokens_per_s'] / best_plain(db):.2f}x"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
