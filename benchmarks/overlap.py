"""Overlap efficiency of the tile-ordered all-gather + matmul and matmul + reduce-scatter on the
`shm` symmetric heap, with a simulated link, on CPU.

Two processes on 2 cores cannot show overlap by wall clock with a real transport (the copy and
the matmul fight for the same cores). So each put crosses a simulated link that sleeps
`latency + bytes / bandwidth` (costing no CPU), with the bandwidth set so one shard's transfer
takes `ratio` times one tile's matmul. Per operation and ratio, medians of --calls calls, the
four kinds of call taking turns (plain, compute, comm, overlapped, then again), so that the
machine's slow spells fall on all of them alike:

  plain       one matmul over all rows (what a non-tiled implementation computes)
  compute     the operation's matmuls alone, tiled by shard (no communication)
  comm        the operation with a 1-wide matmul: the transfers alone
  serial      compute + comm: a blocking collective, then the matmul
  ideal       max(compute, comm): perfect overlap
  overlapped  the tile-ordered operation as the library runs it
  efficiency  (serial - overlapped) / (serial - ideal); 1 = perfect, 0 = no overlap

Then, end to end (--train-steps, 0 to skip): `make demo`'s recipe for that many steps under
`torchrun --nproc_per_node 2` with parallel.tp = 2 and each implementation (shm, collective,
reference), beside tp = 1 on one process with 2 threads: median step time after 5 steps, and
the final loss (the same run up to rounding). Real gloo and shared memory here, no simulated
link: on 2 cores the two ranks' matmuls and copies share the cores, so this measures what each
implementation costs, not the overlap a GPU pair would show.

    python -m benchmarks.overlap [--world 2] [--rows 512 --inner 1024 --cols 1024]
        [--ratios 0.5,1,2] [--calls 12] [--chunks 2] [--train-steps 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.harness import provenance


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(fn, calls: int) -> list[float]:
    """Per-call seconds, every rank starting each call together."""
    return _interleaved([fn], calls)[0]


def _interleaved(fns, calls: int) -> list[list[float]]:
    """Per-call seconds of each of `fns`, taking turns call by call (A B C, A B C, ...), so
    that a slow spell of the machine falls on all of them; every rank starts each call
    together; two warm-up rounds."""
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(calls + 2):
        for times, fn in zip(out, fns):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return [t[2:] for t in out]


def _rank_main(rank: int, world: int, port: int, args: dict, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from slipstream.overlap import OverlapGroup, SimLink

    m, k, n, calls = args["rows"], args["inner"], args["cols"], args["calls"]
    torch.manual_seed(rank)
    x, w = torch.randn(m, k), torch.randn(k, n)
    x_rs, w_rs = torch.randn(world * m, k), torch.randn(k, n)
    tile_s = statistics.median(_timed(lambda: x @ w, calls))
    tile = torch.tensor([tile_s])
    dist.all_reduce(tile)  # every rank uses the same link
    tile_s = float(tile) / world
    results = {}
    for ratio in args["ratios"]:
        for op in ("ag", "rs"):
            # One shard (AG) or one partial (RS) crosses the link in `ratio` tiles' time.
            nbytes = m * (k if op == "ag" else n) * 4
            link = SimLink(latency_s=50e-6, bandwidth_bytes_per_s=nbytes / (ratio * tile_s))
            group = OverlapGroup(None, "shm", link=link, trace=True, chunks=args["chunks"])
            bare = OverlapGroup(None, "shm", link=link, chunks=args["chunks"])  # untraced
            results[f"{op}/{ratio}"] = _measure(op, group, bare, x, w, x_rs, w_rs, calls)
            group.close()
            bare.close()
    results["tile_s"] = tile_s
    if rank == 0:
        queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def _measure(op: str, group, bare, x, w, x_rs, w_rs, calls: int) -> dict:
    """plain, compute alone, communication alone (on `bare`, untraced) and the overlapped
    operation (traced), taking turns call by call."""
    from slipstream.overlap import all_gather_matmul, matmul_reduce_scatter
    from slipstream.overlap.trace import compute_busy_s, tiles_before_last_put

    world = group.world_size
    if op == "ag":
        full, w1 = torch.randn(world * x.shape[0], x.shape[1]), torch.randn(x.shape[1], 1)
        shards = full.chunk(world)

        def plain():
            return full @ w

        def compute():  # the shard-tiled matmuls the operation runs
            return [s @ w for s in shards]

        def comm():
            return all_gather_matmul(x, w1, bare)

        def run():
            return all_gather_matmul(x, w, group)
    else:
        x1, w1 = torch.randn(x_rs.shape[0], 1), torch.randn(1, w_rs.shape[1])
        shards = x_rs.chunk(world)

        def plain():
            return x_rs @ w_rs

        def compute():
            return [s @ w_rs for s in shards]

        def comm():
            return matmul_reduce_scatter(x1, w1, bare)

        def run():
            return matmul_reduce_scatter(x_rs, w_rs, group)

    t_plain, t_compute, t_comm, t_over = _interleaved([plain, compute, comm, run], calls)
    events = _all_events(group)
    calls_seen = sorted({e.call for e in group.trace.events})
    return {
        "plain_s": t_plain,
        "compute_s": t_compute,
        "comm_s": t_comm,
        "overlapped_s": t_over,
        "tiles_before_last_put": [tiles_before_last_put(events, group.rank, c) for c in calls_seen],
        "busy_s": [compute_busy_s(events, group.rank, c) for c in calls_seen],
    }


def _all_events(group) -> list:
    events = [None] * group.world_size
    dist.all_gather_object(events, group.trace.events)
    return [e for rank_events in events for e in rank_events]


def summarize(res: dict) -> dict:
    compute = statistics.median(res["compute_s"])
    comm = statistics.median(res["comm_s"])
    over = statistics.median(res["overlapped_s"])
    serial, ideal = compute + comm, max(compute, comm)
    return {
        "plain_ms": statistics.median(res["plain_s"]) * 1e3,
        "compute_ms": compute * 1e3,
        "comm_ms": comm * 1e3,
        "serial_ms": serial * 1e3,
        "ideal_ms": ideal * 1e3,
        "overlapped_ms": over * 1e3,
        "efficiency": (serial - over) / (serial - ideal),
        "min_tiles_before_last_put": min(res["tiles_before_last_put"]),
        # From the trace: time in tiles inside overlapped calls (longer than `compute` when
        # the puts' copies and wake-ups slow the matmuls), and the rest of the call.
        "busy_in_call_ms": statistics.median(res["busy_s"]) * 1e3,
        "not_computing_ms": (over - statistics.median(res["busy_s"])) * 1e3,
    }


def train_runs(steps: int) -> dict:
    """The demo recipe under each implementation; {name: {step_ms, runs_ms, final_loss}}."""
    import subprocess
    import tempfile

    from benchmarks.harness import ROOT

    base = ["recipes/demo.toml", "--set", f"train.steps={steps}", "--set", "train.eval_every=0"]
    base += ["--set", "train.checkpoint_every=0", "--set", "train.sample_tokens=0"]
    sides = {"tp1 (1 process, 2 threads)": (1, ["--set", "train.num_threads=2"])}
    for impl in ("shm", "collective", "reference"):
        sides[f"tp2 {impl}"] = (
            2,
            ["--set", "parallel.tp=2", "--set", f"parallel.overlap='{impl}'"],
        )
    out = {}
    for name, (nproc, extra) in sides.items():
        with tempfile.TemporaryDirectory() as tmp:
            run = ["--set", f"train.out_dir='{tmp}'", *extra]
            launch = [sys.executable, "-m", "slipstream", "train"]
            if nproc > 1:
                launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
                launch += [f"--nproc_per_node={nproc}", "-m", "slipstream", "train"]
            done = subprocess.run([*launch, *base, *run], capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
            rows = [json.loads(x) for x in Path(tmp, "metrics.jsonl").read_text().splitlines()]
        times = [r["time/step_s"] * 1e3 for r in rows[5:]]
        out[name] = {
            "step_ms": statistics.median(times),
            "runs_ms": times,
            "final_loss": rows[-1]["loss"],
        }
        print(f"{name:>28}: {out[name]['step_ms']:.1f} ms/step", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--rows", type=int, default=512, help="rows per rank (m)")
    ap.add_argument("--inner", type=int, default=1024, help="K")
    ap.add_argument("--cols", type=int, default=1024, help="N")
    ap.add_argument("--ratios", default="0.5,1,2", help="transfer time of a shard / a tile")
    ap.add_argument("--calls", type=int, default=12)
    ap.add_argument("--chunks", type=int, default=2, help="row chunks per shard")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cfg = {
        "rows": args.rows,
        "inner": args.inner,
        "cols": args.cols,
        "calls": args.calls,
        "chunks": args.chunks,
        "ratios": [float(r) for r in args.ratios.split(",")],
    }
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, args.world, port, cfg, queue))
        for r in range(args.world)
    ]
    for p in procs:
        p.start()
    raw = queue.get(timeout=1800)
    for p in procs:
        p.join()
    rows = {key: summarize(v) for key, v in raw.items() if key != "tile_s"}
    print(
        f"\n{args.world} ranks, shard {args.rows} x {args.inner}, w {args.inner} x {args.cols}, "
        f"one tile {raw['tile_s'] * 1e3:.1f} ms (median of {args.calls} calls each)"
    )
    head = [
        "op/ratio",
        "plain",
        "compute",
        "comm",
        "serial",
        "ideal",
        "overlapped",
        "efficiency",
        "tiles*",
    ]
    print("".join(f"{h:>12}" for h in head))
    for key, r in rows.items():
        cells = [
            r[c]
            for c in ("plain_ms", "compute_ms", "comm_ms", "serial_ms", "ideal_ms", "overlapped_ms")
        ]
        print(
            f"{key:>12}"
            + "".join(f"{c:>10.1f}ms" for c in cells)
            + f"{r['efficiency']:>12.2f}{r['min_tiles_before_last_put']:>12d}"
        )
    print("* fewest tiles any call started before its last incoming put completed (trace)")
    print("\nfrom the trace, per overlapped call: time in matmuls / the rest (waits, overhead)")
    for key, r in rows.items():
        print(
            f"{key:>12}  in matmuls {r['busy_in_call_ms']:.1f} ms (alone {r['compute_ms']:.1f})"
            f", not computing {r['not_computing_ms']:.1f} ms of {r['comm_ms']:.1f} ms comm"
        )
    ones = [r["efficiency"] for key, r in rows.items() if key.endswith("/1.0")]
    print(
        f"overlap efficiency at transfer = compute: {', '.join(f'{e:.2f}' for e in ones)} (AG, RS)"
    )
    train = train_runs(args.train_steps) if args.train_steps else {}
    if train:
        print(f"\nthe demo recipe, {args.train_steps} steps: median step time after 5 steps")
        for name, r in train.items():
            print(f"{name:>28}: {r['step_ms']:8.1f} ms   final loss {r['final_loss']:.4f}")
    if args.json:
        out = {**provenance(), "config": cfg, "world": args.world, "raw": raw, "summary": rows}
        out["train"] = train
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    sys.exit(main())
