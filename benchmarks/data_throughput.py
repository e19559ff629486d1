"""Data-plane throughput: the same 4-source mixture (the demo corpus, BPE-tokenized, packed into
[micro_batch, seq_len] rows) through

  slipstream         MixtureLoader, local backend (thread pool)
  torch DataLoader   map-style dataset + WeightedRandomSampler, tokenizing in its workers,
                     packing in collate_fn
  torchdata nodes    MultiNodeWeightedSampler -> ParallelMapper(tokenize) -> Batcher -> pack
  StatefulDataLoader torchdata's resumable DataLoader on the same dataset and sampler

at the same worker count. Each pipeline runs in a fresh process (so peak RSS is its own),
several times; the table shows medians and the ratios to the DataLoader.

    python -m benchmarks.data_throughput [--repeats 3] [--workers 2] [--seconds 8]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import run_isolated
from benchmarks.peers import MixtureDocs, docs_per_batch, pack_rows

ROOT = Path(__file__).resolve().parents[1]
DEMO_SPEC = ROOT / "recipes" / "data" / "demo.toml"
TOKENIZER = ROOT / "data" / "demo" / "tokenizer.json"
SEQ_LEN, MICRO_BATCH = 1024, 8
PIPELINES = ("slipstream", "dataloader", "nodes", "stateful")


def load_spec(workers: int):
    from slipstream.data import MixtureSpec

    return MixtureSpec.from_toml(
        DEMO_SPEC,
        [
            f"tokenizer='{TOKENIZER}'",
            f"seq_len={SEQ_LEN}",
            f"micro_batch_size={MICRO_BATCH}",
            "num_micro_batches=1",
            f"backend.num_workers={workers}",
            "backend.prefetch_steps=8",
            "balance.method='none'",
        ],
    )


# -- the pipelines -----------------------------------------------------------------------------
def iter_slipstream(spec, workers):
    from slipstream.data import MixtureLoader

    loader = MixtureLoader(spec)
    for step in loader:
        yield int((step.micro_batches[0]["doc_ids"] >= 0).sum())


def _torch_loader(spec, workers, cls):
    import torch
    from torch.utils.data import WeightedRandomSampler

    ds = MixtureDocs(spec)
    g = torch.Generator().manual_seed(0)
    sampler = WeightedRandomSampler(ds.sample_weights(spec.weights_at(0)), 10**7, generator=g)
    loader = cls(
        ds,
        batch_size=docs_per_batch(spec),
        sampler=sampler,
        num_workers=workers,
        collate_fn=pack_rows(SEQ_LEN),
        prefetch_factor=4,
        persistent_workers=True,
    )
    for batch in loader:
        yield batch["input_ids"].numel()


def iter_dataloader(spec, workers):
    from torch.utils.data import DataLoader

    yield from _torch_loader(spec, workers, DataLoader)


def iter_stateful(spec, workers):
    from torchdata.stateful_dataloader import StatefulDataLoader

    yield from _torch_loader(spec, workers, StatefulDataLoader)


def iter_nodes(spec, workers):
    import torchdata.nodes as tn

    ds = MixtureDocs(spec)

    def doc_ids(s: int):
        rng = np.random.default_rng(s)
        while True:
            yield from (int(ds.starts[s]) + rng.permutation(int(ds.starts[s + 1] - ds.starts[s])))

    names = [src.name for src in spec.sources]
    nodes = {n: tn.IterableWrapper(doc_ids(i)) for i, n in enumerate(names)}
    mixed = tn.MultiNodeWeightedSampler(nodes, dict(zip(names, spec.weights_at(0))), seed=0)
    docs = tn.ParallelMapper(
        mixed, ds.__getitem__, num_workers=workers, method="process", in_order=False
    )
    batches = tn.Mapper(tn.Batcher(docs, docs_per_batch(spec)), pack_rows(SEQ_LEN))
    for batch in tn.Loader(tn.Prefetcher(batches, 4)):
        yield batch["input_ids"].numel()


def measure(name: str, workers: int, seconds: float) -> dict:
    """Tokens/s after a warm-up, and peak RSS of this process and its children."""
    import psutil

    spec = load_spec(workers)
    me, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.is_set():
            procs = [me, *me.children(recursive=True)]
            rss = 0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    rss += p.memory_info().rss
            peak[0] = max(peak[0], rss)
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    it = globals()[f"iter_{name}"](spec, workers)
    for _ in range(5):  # warm-up: workers start, indexes load
        next(it)
    tokens, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        tokens += next(it)
    elapsed = time.perf_counter() - t0
    done.set()
    return {"tokens_per_s": tokens / elapsed, "peak_rss_mib": peak[0] / 2**20}


def run_one(name: str, workers: int, seconds: float) -> dict:
    args = ["--one", name, "--workers", str(workers), "--seconds", str(seconds)]
    return run_isolated("benchmarks.data_throughput", args, timeout_s=600)


def ensure_inputs() -> None:
    if not DEMO_SPEC.is_file():
        sys.exit("run `make demo` (or `slipstream data prepare-demo`) first")
    if not TOKENIZER.is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "slipstream",
                "data",
                "train-tokenizer",
                str(DEMO_SPEC),
                "--out",
                str(TOKENIZER),
            ],
            check=True,
            cwd=ROOT,
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", choices=PIPELINES)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.workers, args.seconds)))
        return
    ensure_inputs()
    runs: dict[str, list[dict]] = {p: [] for p in PIPELINES}
    for r in range(args.repeats):  # interleaved, so drift in the machine hits all alike
        for p in PIPELINES:
            runs[p].append(run_one(p, args.workers, args.seconds))
            print(
                f"repeat {r + 1}/{args.repeats} {p:>10}: "
                f"{runs[p][-1]['tokens_per_s']:,.0f} tokens/s",
                file=sys.stderr,
            )
    med = {p: {k: statistics.median(x[k] for x in runs[p]) for k in runs[p][0]} for p in runs}
    base = med["dataloader"]["tokens_per_s"]
    print(
        f"\nmixture: 4 sources (demo corpus), BPE tokenizer, seq_len {SEQ_LEN}, micro-batch "
        f"{MICRO_BATCH}, {args.workers} workers; median of {args.repeats}"
    )
    print(f"{'pipeline':<20}{'tokens/s':>14}{'peak RSS MiB':>14}{'vs DataLoader':>15}")
    for p in PIPELINES:
        print(
            f"{p:<20}{med[p]['tokens_per_s']:>14,.0f}{med[p]['peak_rss_mib']:>14,.0f}"
            f"{med[p]['tokens_per_s'] / base:>14.2f}x"
        )
    print(
        f"slipstream / torch DataLoader tokens/s: {med['slipstream']['tokens_per_s'] / base:.2f}x"
    )
    if args.json:
        args.json.write_text(json.dumps({"median": med, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
