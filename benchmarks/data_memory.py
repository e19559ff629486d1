"""Memory of the whole data side of a job: 8 sources x 8 data-parallel ranks x 2 loader workers,
summed PSS (shared pages counted once) of every process that holds data state:

  dataloader        the PyTorch pattern: every rank runs a DataLoader (2 forked workers) over a
                    dataset that holds every source's state (file list, offset index, tokenizer)
  slipstream-local  every rank a MixtureLoader with a 2-process pool (each worker opens every
                    source it is asked for: the same replication, by design of a local pool)
  slipstream-local-threads
                    the same with the default 2-thread pool (the tokenizer releases the GIL,
                    so threads load as fast; no worker processes to hold copies)
  slipstream-ray    every rank a MixtureLoader on the Ray backend: one loader actor per source
                    (and one standby) for the whole job, the ranks holding token counts only;
                    Ray's own processes (raylet, GCS, ...) are counted too

Each rank is its own process; from every figure the same number of bare rank processes (torch
and the data package imported, no loader) is subtracted, so what remains is what the data side
adds. The 8 sources are the demo corpus's 4, each listed twice under another name. Measured
after 5 steps, when every loader has opened its sources.

    python -m benchmarks.data_memory [--ranks 8] [--sources 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.data_throughput import TOKENIZER, ensure_inputs
from benchmarks.harness import ROOT, provenance

MODES = ("bare", "dataloader", "slipstream-local", "slipstream-local-threads", "slipstream-ray")


def load_spec(num_sources: int, mode: str, ranks: int):
    from slipstream.configfile import load_toml
    from slipstream.data import MixtureSpec

    raw = load_toml(ROOT / "recipes" / "data" / "demo.toml")
    base = raw["sources"]
    raw["sources"] = [
        {**base[i % len(base)], "name": f"{base[i % len(base)]['name']}{i // len(base)}"}
        for i in range(num_sources)
    ]
    raw.update(tokenizer=str(TOKENIZER), seq_len=1024, micro_batch_size=4)
    pool = "thread" if mode == "slipstream-local-threads" else "process"
    raw["backend"] = {"num_workers": 2, "prefetch_steps": 2, "pool": pool}
    if mode == "slipstream-ray":
        raw["backend"] = {"kind": "ray", "job": f"memory-{ranks}", "prefetch_steps": 2}
    return MixtureSpec.from_dict(raw, base_dir=str(ROOT / "recipes" / "data"))


def one_rank(mode: str, rank: int, ranks: int, num_sources: int) -> None:
    """Build the mode's loader, take 5 steps, say so, and hold until stdin closes."""
    import torch  # noqa: F401 - a trainer process has torch loaded: the bare baseline too

    import slipstream.data  # noqa: F401

    spec = load_spec(num_sources, mode, ranks)
    loader = None
    if mode == "dataloader":
        from torch.utils.data import DataLoader, WeightedRandomSampler

        from benchmarks.peers import MixtureDocs, docs_per_batch, pack_rows

        ds = MixtureDocs(spec)
        w = ds.sample_weights(spec.weights_at(0))
        gen = torch.Generator().manual_seed(rank)
        loader = DataLoader(
            ds,
            batch_size=docs_per_batch(spec),
            sampler=WeightedRandomSampler(w, 10**7, generator=gen),
            num_workers=2,
            collate_fn=pack_rows(1024),
            persistent_workers=True,
        )
        it = iter(loader)
        for _ in range(5):
            next(it)
    elif mode.startswith("slipstream"):
        from slipstream.data import MixtureLoader

        loader = MixtureLoader(spec, rank, ranks)
        for _ in range(5):
            next(loader)
    print("ready", flush=True)
    sys.stdin.read()


def pss_mib(procs) -> float:
    import psutil

    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_full_info().pss
    return total / 2**20


def _wait_ready(proc, mode: str) -> None:
    """Until the rank says "ready" (Ray may print its own lines first)."""
    for line in proc.stdout:
        if line.strip() == "ready":
            return
    raise RuntimeError(f"{mode}: a rank failed before it was ready (see its error above)")


def measure(mode: str, ranks: int, num_sources: int) -> dict:
    import psutil

    env = dict(os.environ)
    ray_procs = []
    if mode == "slipstream-ray":
        import ray

        env.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "benchmarks.data_memory", "--one", mode]
    procs = []
    for r in range(ranks):
        procs.append(
            subprocess.Popen(
                [*cmd, "--rank", str(r), "--ranks", str(ranks), "--sources", str(num_sources)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
                env={**env, "RANK": str(r)},
            )
        )
        if mode == "slipstream-ray" and r == 0:
            _wait_ready(procs[0], mode)  # rank 0 sets the job's actors up first
    for p in procs[1:] if mode == "slipstream-ray" else procs:
        _wait_ready(p, mode)
    time.sleep(2)
    trees = []
    for p in procs:
        me = psutil.Process(p.pid)
        trees += [me, *me.children(recursive=True)]
    ranks_mib = pss_mib(trees)
    if mode == "slipstream-ray":
        ray_procs = psutil.Process().children(recursive=True)
        ray_procs = [p for p in ray_procs if p.pid not in {t.pid for t in trees}]
    ray_mib = pss_mib(ray_procs)
    for p in procs:
        p.stdin.close()
    for p in procs:
        p.wait(timeout=120)
    if mode == "slipstream-ray":
        import ray

        ray.shutdown()
    return {
        "ranks_pss_mib": ranks_mib,
        "ray_pss_mib": ray_mib,
        "processes": len(trees) + len(ray_procs),
        "total_pss_mib": ranks_mib + ray_mib,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", choices=MODES)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--sources", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.one:
        one_rank(args.one, args.rank, args.ranks, args.sources)
        return
    ensure_inputs()
    results = {m: measure(m, args.ranks, args.sources) for m in MODES}
    bare = results["bare"]["total_pss_mib"]
    print(f"\n{args.sources} sources x {args.ranks} ranks x 2 workers: summed PSS, MiB")
    print(f"{'pipeline':<26}{'processes':>10}{'all':>10}{'data side':>11}")
    for m in MODES[1:]:
        r = results[m]
        r["data_side_mib"] = r["total_pss_mib"] - bare
        print(
            f"{m:<26}{r['processes']:>10}{r['total_pss_mib']:>10,.0f}{r['data_side_mib']:>11,.0f}"
        )
    base = results["dataloader"]["data_side_mib"]
    for m in MODES[2:]:
        print(
            f"{m}: {base / results[m]['data_side_mib']:.2f}x less data-side memory than dataloader"
        )
    if args.json:
        out = {**provenance(("ray", "psutil")), "bare_pss_mib": bare, "results": results}
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
