"""A loader dies mid-run: what is lost, what is repeated, how long the trainer stalls.

  slipstream-ray     the Ray backend with one hot-standby actor per source; the actor serving
                     the busiest source is killed (`ray.kill`) after --kill-at steps
  slipstream-local   the local backend with a process pool; one worker process gets SIGKILL
  dataloader         torch DataLoader (2 workers, the peers' mixture dataset); one worker gets
                     SIGKILL, as users run it

For Slipstream the delivered stream is compared with an uninterrupted run's, document by
document: lost = documents of the reference never delivered, repeated = delivered more often
than in the reference. The stall is the longest wait for a step after the kill, beside the
median wait before it. The demo mixture, 8k BPE, 16 rows of 1,024 tokens per step.

    python -m benchmarks.data_failover [--steps 40] [--kill-at 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import time
from collections import Counter
from pathlib import Path

from benchmarks.data_throughput import TOKENIZER, ensure_inputs
from benchmarks.harness import ROOT, provenance


def load_spec(kind: str):
    from slipstream.data import MixtureSpec

    extra = {
        "slipstream-ray": ["backend.kind='ray'", "backend.shadow=1", "backend.autoscale_every=0"],
        "slipstream-local": ["backend.pool='process'"],
        "reference": [],
    }[kind]
    return MixtureSpec.from_toml(
        ROOT / "recipes" / "data" / "demo.toml",
        [
            f"tokenizer='{TOKENIZER}'",
            "seq_len=1024",
            "micro_batch_size=16",
            "backend.num_workers=2",
            "backend.prefetch_steps=2",
            *extra,
        ],
    )


def slipstream_run(kind: str, steps: int, kill_at: int) -> dict:
    import ray

    from slipstream.data import MixtureLoader

    ref_loader = MixtureLoader(load_spec("reference"))
    reference = [d for _ in range(steps) for d in next(ref_loader).stream]
    ref_loader.close()
    loader = MixtureLoader(load_spec(kind))
    delivered, waits, killed = [], [], None
    for step in range(steps):
        if step == kill_at:
            killed = _kill(kind, loader)
        t0 = time.perf_counter()
        batch = next(loader)
        waits.append(time.perf_counter() - t0)
        delivered.extend(batch.stream)
    reissued = getattr(loader.backend, "num_reissued", None)
    loader.close()
    if kind == "slipstream-ray":
        ray.shutdown()
    want, got = Counter(reference), Counter(delivered)
    return {
        "killed": killed,
        "lost": sum((want - got).values()),
        "repeated": sum((got - want).values()),
        "same_stream": delivered == reference,
        "stall_s": max(waits[kill_at:]),
        "median_wait_before_s": statistics.median(waits[:kill_at]),
        "waits_s": waits,
        "reissued_docs": reissued,
        "steps_delivered": steps,
    }


def _kill(kind: str, loader) -> str:
    if kind == "slipstream-ray":
        import ray

        backend = loader.backend
        name = backend._layout[0]["serving"][0]
        ray.kill(backend._actor(name))
        return f"actor {name}"
    pid = loader.backend.worker_pids()[0]
    os.kill(pid, signal.SIGKILL)
    return f"worker process {pid}"


def dataloader_run(steps: int, kill_at: int) -> dict:
    import torch
    from torch.utils.data import DataLoader, WeightedRandomSampler

    from benchmarks.peers import MixtureDocs, docs_per_batch, pack_rows

    spec = load_spec("reference")
    ds = MixtureDocs(spec)
    sampler = WeightedRandomSampler(
        ds.sample_weights(spec.weights_at(0)), 10**7, generator=torch.Generator().manual_seed(0)
    )
    loader = DataLoader(
        ds,
        batch_size=docs_per_batch(spec),
        sampler=sampler,
        num_workers=2,
        collate_fn=pack_rows(1024),
        prefetch_factor=2,
        persistent_workers=True,
    )
    it = iter(loader)
    waits, error, done = [], None, 0
    for step in range(steps):
        if step == kill_at:
            os.kill(it._workers[0].pid, signal.SIGKILL)
        t0 = time.perf_counter()
        try:
            next(it)
        except Exception as e:  # noqa: BLE001 - what the user sees is the result
            error = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            waits.append(time.perf_counter() - t0)
            break
        waits.append(time.perf_counter() - t0)
        done += 1
    return {
        "killed": "worker process",
        "steps_delivered": done,
        "run_ended": error is not None,
        "error": error,
        "stall_s": max(waits[kill_at:]) if len(waits) > kill_at else None,
        "waits_s": waits,
        "note": "no resumable position: documents in flight are lost, and a restart without "
        "a checkpoint of the sampler repeats from the start",
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--kill-at", type=int, default=15)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    ensure_inputs()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    results = {
        "slipstream-ray": slipstream_run("slipstream-ray", args.steps, args.kill_at),
        "slipstream-local": slipstream_run("slipstream-local", args.steps, args.kill_at),
        "dataloader": dataloader_run(args.steps, args.kill_at),
    }
    print(f"\na loader killed before step {args.kill_at} of {args.steps}")
    print(
        f"{'pipeline':<18}{'steps':>7}{'lost':>7}{'repeated':>10}{'stall s':>10}{'before s':>10}"
        f"{'re-issued':>11}"
    )
    for name, r in results.items():
        lost = r.get("lost", "-")
        rep = r.get("repeated", "-")
        stall = f"{r['stall_s']:.2f}" if r.get("stall_s") is not None else "-"
        before = f"{r['median_wait_before_s']:.3f}" if "median_wait_before_s" in r else "-"
        again = r.get("reissued_docs")
        print(
            f"{name:<18}{r['steps_delivered']:>7}{lost!s:>7}{rep!s:>10}{stall:>10}{before:>10}"
            f"{'-' if again is None else again!s:>11}"
        )
        if r.get("error"):
            print(f"{'':<18}run ended: {r['error']}")
    if args.json:
        args.json.write_text(json.dumps({**provenance(("ray",)), "results": results}, indent=2))


if __name__ == "__main__":
    main()
