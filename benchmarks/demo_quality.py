"""Demo quality: held-out bits per byte reached in the same wall-clock budget by Slipstream's
trainer on the demo recipe and by the plain nanoGPT-style loop of `benchmarks/train_step.py`
(same model, optimizer and schedule, same training documents; its own batching: a DataLoader
over an IterableDataset whose 2 workers draw documents by weight, tokenize them and carry a
token buffer across rows, so every token read is trained on, with no document masking). Both
models are then scored by the same evaluation on the same held-out documents. Each side runs
in a fresh process; several repeats; medians.

Slipstream runs `Trainer.train_step` (the loop `slipstream train` runs, without its metrics
file and progress bar) until the budget is spent.

    python -m benchmarks.demo_quality [--budget-s 120] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.harness import provenance, run_isolated

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "demo.toml"
SIDES = ("slipstream", "plain")


def config():
    from slipstream.config import RunConfig

    return RunConfig.load(
        RECIPE,
        [
            "train.checkpoint_every=0",
            "train.eval_every=0",
            "train.progress=false",
            "train.sample_tokens=0",
            f"train.out_dir='{ROOT / 'runs' / 'bench-demo-quality'}'",
        ],
    )


def run_slipstream(cfg, budget_s: float):
    from rich.console import Console

    from slipstream.profile import StepTimer
    from slipstream.train import Trainer

    trainer = Trainer(cfg, console=Console(quiet=True), overwrite=True)  # each repeat anew
    timer = StepTimer(trainer.d.device)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < budget_s and trainer.step < cfg.train.steps:
        trainer.train_step(timer)
        trainer.step += 1
    elapsed = time.perf_counter() - t0
    trainer.loader.close()
    return trainer, trainer.step, elapsed


def run_plain(cfg, budget_s: float):
    from benchmarks.train_step import plain_steps, token_buffer_batches

    t0 = time.perf_counter()
    steps, trained = 0, None
    for _, _, model in plain_steps(cfg, token_buffer_batches(cfg, split="train")):
        steps, trained = steps + 1, model
        if time.perf_counter() - t0 >= budget_s:
            break
    return trained, steps, time.perf_counter() - t0


def score(cfg, model) -> dict[str, float]:
    """Held-out loss and bits per byte, by the trainer's own evaluation."""
    from slipstream.data import MixtureLoader
    from slipstream.train.distributed import Dist
    from slipstream.train.evaluate import evaluate

    with MixtureLoader(cfg.data, split="eval", prefetch_steps=1) as loader:
        return evaluate(model, loader, cfg.train.eval_steps, Dist(), None)


def one(side: str, budget_s: float) -> dict:
    cfg = config()
    if side == "slipstream":
        trainer, steps, elapsed = run_slipstream(cfg, budget_s)
        model = trainer.model
    else:
        model, steps, elapsed = run_plain(cfg, budget_s)
    return {"steps": steps, "train_s": elapsed, **score(cfg, model)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", choices=SIDES)
    ap.add_argument("--budget-s", type=float, default=120.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.budget_s)))
        return
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    for r in range(args.repeats):
        for side in SIDES:
            res = run_isolated(
                "benchmarks.demo_quality",
                ["--one", side, "--budget-s", str(args.budget_s)],
                timeout_s=args.budget_s * 4 + 300,
            )
            runs[side].append(res)
            print(
                f"repeat {r + 1}/{args.repeats} {side:>10}: {res['steps']} steps, "
                f"{res['eval_bpb']:.3f} bits/byte",
                file=sys.stderr,
            )
    names = [k.split("/", 1)[1] for k in runs["slipstream"][0] if k.startswith("eval_bpb/")]
    print(
        f"\nheld-out bits per byte after {args.budget_s:.0f} s of training (median of {args.repeats})"
    )
    print(f"{'side':<12}{'steps':>7}{'bits/byte':>11}" + "".join(f"{n:>10}" for n in names))
    med = {}
    for side, rs in runs.items():
        med[side] = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
        m = med[side]
        print(
            f"{side:<12}{m['steps']:>7.0f}{m['eval_bpb']:>11.3f}"
            + "".join(f"{m.get('eval_bpb/' + n, float('nan')):>10.3f}" for n in names)
        )
        print("  runs: " + ", ".join(f"{x['eval_bpb']:.3f}" for x in rs))
    gain = med["plain"]["eval_bpb"] - med["slipstream"]["eval_bpb"]
    print(f"Slipstream - plain loop: {-gain:+.3f} bits/byte (negative = Slipstream ahead)")
    if args.json:
        out = {**provenance(("tokenizers",)), "budget_s": args.budget_s, "runs": runs}
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
