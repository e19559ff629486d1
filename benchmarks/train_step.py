"""Training throughput: `slipstream train`'s Trainer against plain PyTorch loops on the same
model, optimizer, schedule and clipping, each run in a fresh process, several times.

Two scenarios:
  overhead     the demo GPT on the demo mixture. Slipstream's whole loop (its live data plane,
               metrics file and progress included) against the same model stepping through
               pre-built batches, the data side made free: what Slipstream costs over the
               bare loop (target <= 3%). nanoGPT's own pattern (random windows from a
               pre-tokenized memory-mapped token file) is timed beside it.
  data-bound   a tiny GPT (1 layer, 16 wide: the data side dominates), and the code source
               runs a MinHash screen per document
               (benchmarks/transforms.py): who feeds the model faster (target >= 1.5x).
               Baseline: a DataLoader over an IterableDataset whose workers screen, tokenize
               (batched) and carry a token buffer, so it reads each token once, as Slipstream
               does, with the same number of workers.

Tokens/s are wall clock over the steps after the warm-up, whole loop included.

    python -m benchmarks.train_step [--repeats 3] [--steps 40] [--data-bound-steps 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import provenance, run_isolated

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "demo.toml"
WARMUP = 5
SCENARIOS = {
    "overhead": ("slipstream", "free-batches", "nanogpt-memmap"),
    "data-bound": ("slipstream", "token-buffer"),
}
SETTINGS = {
    "overhead": [],
    "data-bound": [
        "model.n_layer=1",
        "model.d_model=16",
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
            "train.log_every=0",
            f"train.out_dir='{ROOT / 'runs' / 'bench-train-step'}'",
            "data.holdout_fraction=0.0",
            f"data.backend.num_workers={workers}",
            *SETTINGS[scenario],
        ],
    )


def run_slipstream(cfg) -> dict:
    """`slipstream train` minus process start-up: Trainer.fit(), its metrics file and (quiet)
    progress included; wall clock from the end of the warm-up to the last step."""
    from rich.console import Console

    from slipstream.train import Trainer

    rows = Trainer(cfg, console=Console(quiet=True), overwrite=True).fit()  # each repeat anew
    done = rows[WARMUP:]
    wall = rows[-1]["time/elapsed_s"] - rows[WARMUP - 1]["time/elapsed_s"]
    wait = sum(r["time/data_wait_s"] for r in done)
    return {"tokens_per_s": sum(r["tokens"] for r in done) / wall, "data_wait": wait / wall}


def plain_steps(cfg, batches):
    """The bare loop: forward, backward, clip, AdamW with the schedule; `batches` yields dicts
    with input_ids, labels (already shifted), num_tokens. Yields (data wait s, tokens)."""
    from dataclasses import replace

    import torch.nn.functional as F

    from slipstream.data import build_tokenizer
    from slipstream.models import GPT
    from slipstream.train.optim import build_optimizer, lr_factor

    vocab = build_tokenizer(cfg.data.tokenizer, cfg.data.base_dir).vocab_size
    torch.manual_seed(cfg.train.seed)
    model = GPT(replace(cfg.model, vocab_size=vocab))
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    for step in range(cfg.train.steps):
        t0 = time.perf_counter()
        batch = next(batches)
        wait = time.perf_counter() - t0
        opt.begin_step(cfg.optim.lr * lr_factor(step, cfg.train.steps, cfg.optim))
        # Slipstream's pre-built batches carry document boundaries: the model then does the
        # same (document-masked) work as in Slipstream's own loop.
        keys = ("position_ids", "doc_ids", "cu_seqlens", "max_seqlen")
        logits = model(batch["input_ids"], *(batch.get(k) for k in keys))
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        loss.backward()
        opt.step()  # clips to optim.grad_clip first
        opt.zero_grad(set_to_none=True)
        yield wait, batch["num_tokens"], model


def timed(cfg, batches) -> dict:
    tokens = wait = 0.0
    for step, (w, n, _) in enumerate(plain_steps(cfg, batches)):
        if step == WARMUP - 1:
            t0 = time.perf_counter()
        elif step >= WARMUP:
            tokens, wait = tokens + n, wait + w
    wall = time.perf_counter() - t0
    return {"tokens_per_s": tokens / wall, "data_wait": wait / wall}


def free_batches(cfg):
    """Slipstream's own batches for every step, built before the clock starts."""
    from slipstream.data import MixtureLoader

    with MixtureLoader(cfg.data) as loader:
        built = [next(loader).micro_batches[0] for _ in range(cfg.train.steps)]
    for mb in built:
        yield {
            "input_ids": mb["input_ids"],
            "labels": mb["labels"],
            "num_tokens": mb["labels"].numel(),
        }


def memmap_batches(cfg, tmp: Path):
    from benchmarks.peers import MemmapWindows, write_token_file

    path = tmp / "train.bin"
    t0 = time.perf_counter()
    num = write_token_file(cfg.data, path, split=None)
    prep_s = time.perf_counter() - t0
    dtype = "uint16" if path.stat().st_size == 2 * num else "uint32"
    spec = cfg.data
    return MemmapWindows(path, dtype, spec.seq_len, spec.micro_batch_size), prep_s


def token_buffer_batches(cfg, split: str | None = None):
    from torch.utils.data import DataLoader

    from benchmarks.peers import TokenBufferDocs, rows_to_batch

    spec = cfg.data
    loader = DataLoader(
        TokenBufferDocs(spec, split=split),
        batch_size=spec.micro_batch_size,
        num_workers=spec.backend.num_workers,
        prefetch_factor=4,
        persistent_workers=True,
        collate_fn=rows_to_batch,
    )
    return iter(loader)


def run_one_local(pipeline: str, scenario: str, steps: int, workers: int) -> dict:
    cfg = config(scenario, steps, workers)
    if pipeline == "slipstream":
        return run_slipstream(cfg)
    if pipeline == "free-batches":
        return timed(cfg, free_batches(cfg))
    if pipeline == "nanogpt-memmap":
        with tempfile.TemporaryDirectory() as tmp:
            batches, prep_s = memmap_batches(cfg, Path(tmp))
            return {**timed(cfg, batches), "prepare_s": prep_s}
    return timed(cfg, token_buffer_batches(cfg))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", default=None)
    ap.add_argument("--scenario", choices=tuple(SCENARIOS), default="overhead")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40, help="steps of the overhead scenario")
    ap.add_argument(
        "--data-bound-steps",
        type=int,
        default=200,
        help="steps of the data-bound scenario: enough documents that heavy-tailed per-document"
        " costs average out (a 40-step run sees only a handful of code files)",
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", choices=tuple(SCENARIOS), default=None, help="run one scenario")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one_local(args.one, args.scenario, args.steps, args.workers)))
        return
    results: dict = {}
    for scenario, pipelines in SCENARIOS.items():
        if args.only and scenario != args.only:
            continue
        runs: dict[str, list[dict]] = {p: [] for p in pipelines}
        steps = args.steps if scenario == "overhead" else args.data_bound_steps
        for r in range(args.repeats):
            for p in pipelines:
                res = run_isolated(
                    "benchmarks.train_step",
                    [
                        *("--one", p, "--scenario", scenario),
                        *("--steps", str(steps), "--workers", str(args.workers)),
                    ],
                    timeout_s=1800,
                )
                runs[p].append(res)
                print(
                    f"{scenario} repeat {r + 1}/{args.repeats} {p:>14}: "
                    f"{res['tokens_per_s']:,.0f} tokens/s, data wait {res['data_wait']:.0%}",
                    file=sys.stderr,
                )
        results[scenario] = runs
    med = {
        sc: {p: {k: statistics.median(x[k] for x in v) for k in v[0]} for p, v in runs.items()}
        for sc, runs in results.items()
    }
    print(
        f"\n{args.steps} steps (overhead) and {args.data_bound_steps} (data-bound), {WARMUP} "
        f"warm-up, {args.workers} data workers, wall clock, median of {args.repeats}"
    )
    print(f"{'scenario':<12}{'pipeline':<16}{'tokens/s':>10}{'data wait':>11}  runs (tokens/s)")
    for sc, runs in results.items():
        for p, v in runs.items():
            m = med[sc][p]
            each = ", ".join(f"{x['tokens_per_s']:,.0f}" for x in v)
            print(f"{sc:<12}{p:<16}{m['tokens_per_s']:>10,.0f}{m['data_wait']:>10.0%}  {each}")
    if "overhead" in med:
        prep = med["overhead"]["nanogpt-memmap"]["prepare_s"]
        print(f"nanoGPT memmap: the corpus was tokenized once beforehand in {prep:.0f} s")
        ov = med["overhead"]
        overhead = 1 - ov["slipstream"]["tokens_per_s"] / ov["free-batches"]["tokens_per_s"]
        print(f"overhead: Slipstream's whole loop vs free batches {overhead:+.1%} (target <= 3%)")
    if "data-bound" in med:
        db = med["data-bound"]
        print(
            "data-bound: Slipstream / token-buffer DataLoader tokens/s: "
            f"{db['slipstream']['tokens_per_s'] / db['token-buffer']['tokens_per_s']:.2f}x "
            f"(baseline data wait {db['token-buffer']['data_wait']:.0%})"
        )
    if args.json:
        out = {**provenance(("tokenizers", "numpy")), "runs": results, "medians": med}
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
