"""Data-plane throughput: the same 4-source mixture (the demo corpus, BPE-tokenized, packed into
[micro_batch, seq_len] rows) through

  slipstream         MixtureLoader, local backend (thread pool)
  torch DataLoader   map-style dataset + WeightedRandomSampler, each batch's documents read
                     and tokenized together in a worker (`__getitems__`, batched encoding),
                     packing in collate_fn (what does not fill a whole row is dropped)
  torchdata nodes    MultiNodeWeightedSampler -> ParallelMapper(tokenize) -> Batcher -> pack
  StatefulDataLoader torchdata's resumable DataLoader on the same dataset and sampler

at the same worker count. Each pipeline runs in a fresh process, several times; the table
shows medians, the ratios to the DataLoader, the tokens tokenized but dropped, and memory as
peak PSS (shared pages counted once across the process and its workers; peak RSS summed over
processes is shown beside it, and counts shared pages once per process).

`--ranks 1,2,4` then runs N ranks as N processes at once, each taking its share of every step,
and reports per-rank tokens/s and the data CPU seconds per million delivered tokens, job-wide:
with the local backend every rank plans and tokenizes the whole step, which this makes visible.

    python -m benchmarks.data_throughput [--repeats 3] [--workers 2] [--seconds 8] [--ranks 1,2,4]
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

from benchmarks.harness import provenance, run_isolated
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
def iter_slipstream(spec, workers, rank=0, world=1):
    """Yields (tokens delivered, tokens tokenized) per step of this rank."""
    from slipstream.data import MixtureLoader

    loader = MixtureLoader(spec, rank, world)
    for step in loader:
        delivered = int((step.micro_batches[0]["doc_ids"] >= 0).sum())
        # A rank tokenizes the documents of its own rows (more only for documents that span
        # ranks): about what it delivers.
        yield delivered, delivered


def _torch_loader(spec, workers, cls, rank=0, world=1):
    import torch
    from torch.utils.data import WeightedRandomSampler

    ds = MixtureDocs(spec)
    g = torch.Generator().manual_seed(rank)  # each rank draws its own documents
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
        yield batch["input_ids"].numel(), batch["num_tokenized"]


def iter_dataloader(spec, workers, rank=0, world=1):
    from torch.utils.data import DataLoader

    yield from _torch_loader(spec, workers, DataLoader, rank, world)


def iter_stateful(spec, workers, rank=0, world=1):
    from torchdata.stateful_dataloader import StatefulDataLoader

    yield from _torch_loader(spec, workers, StatefulDataLoader, rank, world)


def iter_nodes(spec, workers, rank=0, world=1):
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
        yield batch["input_ids"].numel(), batch["num_tokenized"]


def _tree_cpu_s(me) -> float:
    """CPU seconds of this process, its threads and its children (live and reaped)."""
    import psutil

    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for c in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            ct = c.cpu_times()
            total += ct.user + ct.system
    return total


def measure(name: str, workers: int, seconds: float, rank: int = 0, world: int = 1) -> dict:
    """Tokens/s after a warm-up, tokens tokenized, CPU seconds, and peak PSS / RSS of this
    process and its children."""
    import psutil

    spec = load_spec(workers)
    me, peak, done = psutil.Process(), {"pss": 0, "rss": 0}, threading.Event()

    def sample():
        while not done.is_set():
            pss = rss = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    info = p.memory_full_info()
                    pss, rss = pss + info.pss, rss + info.rss
            peak["pss"], peak["rss"] = max(peak["pss"], pss), max(peak["rss"], rss)
            time.sleep(0.1)

    threading.Thread(target=sample, daemon=True).start()
    it = globals()[f"iter_{name}"](spec, workers, rank, world)
    for _ in range(5):  # warm-up: workers start, indexes load
        next(it)
    delivered = tokenized = steps = 0
    cpu0, t0 = _tree_cpu_s(me), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        d, t = next(it)
        delivered, tokenized, steps = delivered + d, tokenized + t, steps + 1
    elapsed, cpu = time.perf_counter() - t0, _tree_cpu_s(me) - cpu0
    done.set()
    return {
        "tokens_per_s": delivered / elapsed,
        "tokens": delivered,
        "tokenized": tokenized,
        "steps": steps,
        "cpu_s": cpu,
        "peak_pss_mib": peak["pss"] / 2**20,
        "peak_rss_mib": peak["rss"] / 2**20,
    }


def run_one(name: str, workers: int, seconds: float) -> dict:
    args = ["--one", name, "--workers", str(workers), "--seconds", str(seconds)]
    return run_isolated("benchmarks.data_throughput", args, timeout_s=600)


def run_ranks(name: str, world: int, workers: int, seconds: float) -> list[dict]:
    """`world` ranks as processes at once; each measures its own share."""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.data_throughput",
                *("--one", name, "--workers", str(workers), "--seconds", str(seconds)),
                *("--rank", str(r), "--world", str(world)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for r in range(world)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        if p.returncode != 0:
            raise RuntimeError(stderr[-3000:])
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def scaling(ranks: list[int], workers: int, seconds: float) -> dict:
    print(f"\n{'pipeline':<12}{'ranks':>6}{'tokens/s per rank':>19}{'data CPU s / M tokens':>23}")
    out: dict = {}
    for name in ("slipstream", "dataloader"):
        for n in ranks:
            rs = run_ranks(name, n, workers, seconds)
            per_rank = statistics.mean(r["tokens_per_s"] for r in rs)
            cpu_per_m = sum(r["cpu_s"] for r in rs) / sum(r["tokens"] for r in rs) * 1e6
            out[f"{name}/{n}"] = {
                "per_rank_tokens_per_s": per_rank,
                "cpu_s_per_m": cpu_per_m,
                "runs": rs,
            }
            print(f"{name:<12}{n:>6}{per_rank:>19,.0f}{cpu_per_m:>23.1f}")
    return out


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
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--ranks", default="", help="e.g. 1,2,4: also run that many ranks at once")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.workers, args.seconds, args.rank, args.world)))
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
    print(
        f"{'pipeline':<12}{'tokens/s':>11}{'vs DataLoader':>15}{'dropped':>9}"
        f"{'peak PSS MiB':>14}{'peak RSS MiB':>14}  runs (tokens/s)"
    )
    for p in PIPELINES:
        m = med[p]
        dropped = 1 - sum(x["tokens"] for x in runs[p]) / sum(x["tokenized"] for x in runs[p])
        each = ", ".join(f"{x['tokens_per_s']:,.0f}" for x in runs[p])
        print(
            f"{p:<12}{m['tokens_per_s']:>11,.0f}{m['tokens_per_s'] / base:>14.2f}x"
            f"{max(dropped, 0.0):>9.1%}{m['peak_pss_mib']:>14,.0f}{m['peak_rss_mib']:>14,.0f}  {each}"
        )
    print(
        f"slipstream / torch DataLoader tokens/s: {med['slipstream']['tokens_per_s'] / base:.2f}x; "
        f"peak PSS {med['slipstream']['peak_pss_mib']:,.0f} vs "
        f"{med['dataloader']['peak_pss_mib']:,.0f} MiB"
    )
    ranks = [int(r) for r in args.ranks.split(",") if r]
    scale = scaling(ranks, args.workers, args.seconds) if ranks else None
    if args.json:
        out = {**provenance(("torchdata", "tokenizers", "psutil")), "median": med, "runs": runs}
        args.json.write_text(json.dumps({**out, "ranks": scale}, indent=2))


if __name__ == "__main__":
    main()
