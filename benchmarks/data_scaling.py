"""The data work of a job as its data-parallel ranks grow, for the same global batch: total data
CPU seconds per step (all ranks' processes and loader threads) and tokens/s per rank, at 1, 2,
4 and 8 ranks, before and after the plan was shared:

  before   every rank loads and tokenizes every document of the step and keeps its rows
           (`MixtureLoader(load_all_rows=True)`: the replicated pattern)
  after    every rank plans the step from token counts and loads only its rows' documents;
           the ranks of this machine fetch each step together, the steps dealt round them
           (`--alone`: each its own)
  ray      the same on the Ray backend: one loader actor per source for the whole job, requests
           routed by document, so a document several ranks need is tokenized once (the
           actors' CPU is counted with the ranks'); the ranks of this machine fetch each
           step together (`--alone`: each its own)

The demo mixture (4 sources) with the 8k BPE tokenizer, 32 rows of 1,024 tokens per step split
over the ranks, the local backend with 2 loader threads per rank. The ranks run at once as
processes (on 2 cores, 8 ranks share them: tokens/s per rank falls for that reason alone);
the job takes --steps steps and reads nothing past them (`end_step`), and each rank counts its
CPU from its loader's start (the token-count cache is built first, and a throwaway loader
takes one step first: what a process pays once is not per-step work) to its last step. By
default that is about 3,200 rows (100 steps of 32 rows, 20 of 256 and more): at 32-row steps
a 30-step window (1.6 s of CPU) read local 1.46x where 100 steps read 1.18x.

    python -m benchmarks.data_scaling [--ranks 1,2,4,8] [--steps N] [--rows 32]
        [--modes before,after,ray] [--sequential] [--fixed-actors] [--alone] [--repeats N]
        [--json out.json]
    python -m benchmarks.data_scaling --volume [--rows 32]   # tokens sent per step, Ray
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.data_throughput import TOKENIZER, _tree_cpu_s, ensure_inputs
from benchmarks.harness import ROOT, provenance

ROWS_PER_STEP, SEQ_LEN = 32, 1024  # the default global batch: --rows changes it
MODES = ("before", "after", "ray")


def load_spec(world: int, mode: str = "after", rows: int = ROWS_PER_STEP):
    from slipstream.data import MixtureSpec

    ray = ["backend.kind='ray'", f"backend.job='scaling-{world}'", "backend.shadow=0"]
    if os.environ.get("SCALING_FIXED_ACTORS"):  # --fixed-actors: no autoscaling, no regrouping
        ray.append("backend.autoscale_every=0")
    # The ranks share this machine: they fetch each step together, unless --alone.
    group = f"backend.machine_ranks={1 if os.environ.get('SCALING_ALONE') else world}"
    return MixtureSpec.from_toml(
        ROOT / "recipes" / "data" / "demo.toml",
        [
            *(ray if mode == "ray" else []),
            group,
            f"tokenizer='{TOKENIZER}'",
            f"seq_len={SEQ_LEN}",
            f"micro_batch_size={rows // world}",
            "num_micro_batches=1",
            "backend.num_workers=2",
            "backend.prefetch_steps=4",
        ],
    )


def one_rank(
    mode: str, rank: int, world: int, steps: int, rows: int = ROWS_PER_STEP, alone: bool = False
) -> dict:
    import psutil

    from slipstream.data import MixtureLoader

    spec = load_spec(world, mode, rows)
    before = mode == "before"
    # What a process pays once (first calls into torch, the tokenizer's threads, the files'
    # first reads) is not per-step work: a throwaway loader of this rank takes one step alone
    # first. Then the job takes exactly `steps` steps and nothing is read past them
    # (`end_step`): each rank's CPU is counted from its loader's start (the token-count cache
    # already built) to its last step, so the job's count holds every step's data work once,
    # whichever rank did it, and no read-ahead that no step used.
    single = replace(spec, backend=replace(spec.backend, machine_ranks=1))
    with MixtureLoader(single, rank, world, load_all_rows=before, end_step=1) as warm:
        next(warm)
    loader = MixtureLoader(spec, rank, world, load_all_rows=before, end_step=steps)
    me = psutil.Process()
    docs0 = sum(loader.backend.num_loaded)
    # The loader actors serve every rank: their CPU is counted once, by rank 0, between
    # barriers that all ranks pass (when the ranks run at once), or by each rank in its own
    # window (when each runs alone).
    actors = _ActorCPU() if mode == "ray" and (rank == 0 or alone) else None
    _barrier("start", rank, world)
    if actors is not None:
        actors.start()
    cpu0, t0 = _tree_cpu_s(me), time.perf_counter()
    held = []  # counted after the clock stops: counting is the consumer's work, not the data's
    for _ in range(steps):
        held.extend(mb["doc_ids"] for mb in next(loader).micro_batches)
    wall, cpu = time.perf_counter() - t0, _tree_cpu_s(me) - cpu0
    _barrier("end", rank, world)
    actor_cpu, sampler_cpu = actors.stop() if actors is not None else (0.0, 0.0)
    cpu += actor_cpu - sampler_cpu
    tokens = sum(int((ids >= 0).sum()) for ids in held)
    docs = sum(loader.backend.num_loaded) - docs0
    tokenized = None
    if actors is not None:
        tokenized = sum(x["tokenized"] for x in loader.backend.actor_stats().values())
    loader.close()
    return {
        "cpu_s": cpu,
        "actor_cpu_s": actor_cpu,
        "wall_s": wall,
        "tokens": tokens,
        "docs_loaded": docs,
        "tokens_received": getattr(loader.backend, "tokens_received", None),  # ray: whole run
        "actor_docs_tokenized_total": tokenized,
        "steps": steps,
    }


def volume(worlds: list[int], rows: int, steps: int = 40) -> dict:
    """Tokens per step that reach the ranks, computed from the plans (no loading): the tokens
    their rows hold, the runs of tokens the Ray backend sends (`token_runs`), and the whole
    documents it sent before (every document a rank's rows touch, whole, to each such rank)."""
    from slipstream.data.backends import build_backend
    from slipstream.data.packing import doc_keys, token_runs, unpack_keys
    from slipstream.data.planner import Planner

    out = {}
    for world in worlds:
        spec = load_spec(world, "after", rows)
        backend = build_backend(spec)
        lengths = backend.lengths()
        backend.close()
        planner = Planner(spec, lengths, dp_world_size=world)
        held = runs = whole = 0
        for _ in range(steps):
            plan = planner.plan_step()
            for r in range(world):
                mine = plan.pieces_of(plan.rank_rows(r))
                held += int(plan.piece_length[mine].sum())
                _, lo, hi = token_runs(plan, mine, lengths)
                runs += int((hi - lo).sum())
                keys = np.unique(doc_keys(plan.piece_source[mine], plan.piece_doc[mine]))
                whole += sum(int(lengths[s][d]) for s, d in unpack_keys(keys))
        out[world] = {"rows_hold": held / steps, "runs": runs / steps, "whole_docs": whole / steps}
        print(
            f"{world:>6} ranks: per step, rows hold {held / steps:>10,.0f}  runs sent "
            f"{runs / steps:>10,.0f}  whole documents {whole / steps:>10,.0f} tokens"
        )
    return out


def _barrier(tag: str, rank: int, world: int) -> None:
    """Wait until every rank of a job running at once got here (files in SCALING_SYNC)."""
    where = os.environ.get("SCALING_SYNC")
    if not where:
        return
    Path(where, f"{tag}.{rank}").touch()
    while len(list(Path(where).glob(f"{tag}.*"))) < world:
        time.sleep(0.005)


class _ActorCPU:
    """CPU seconds of the loader actors (processes named `ray::SourceActor...`, children of
    the raylet) over a window, counting actors the directory starts or removes during it
    (autoscaling, regrouping): sampled every 50 ms, a removed actor's last sample stands."""

    def __init__(self) -> None:
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._done = threading.Event()

    def _sample(self, initial: bool = False) -> None:
        import psutil

        for p in psutil.process_iter(["name"]):
            if not (p.info["name"] or "").startswith("ray::SourceAct"):
                continue
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            self.last[p.pid] = t.user + t.system
            self.first.setdefault(p.pid, self.last[p.pid] if initial else 0.0)

    def start(self) -> None:
        self._sample(initial=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.thread_time()
        while not self._done.wait(0.05):
            self._sample()
        self.own_cpu_s = time.thread_time() - t0

    def stop(self) -> tuple[float, float]:
        """(the actors' CPU seconds, this sampler's own, which is not the data's)."""
        self._done.set()
        self._thread.join()
        self._sample()
        return sum(self.last[pid] - self.first[pid] for pid in self.last), self.own_cpu_s


def run(
    mode: str,
    world: int,
    steps: int,
    env: dict | None = None,
    rows: int = ROWS_PER_STEP,
    sequential: bool = False,
) -> list[dict]:
    # A fresh store of shared documents per run: the previous run's must not serve this one.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=shm, prefix="slipstream-bench-docs-") as store:
        return _run(
            mode, world, steps, {**(env or {}), "SLIPSTREAM_SHARED_DOCS": store}, rows, sequential
        )


def _run(mode: str, world: int, steps: int, env: dict, rows: int, sequential: bool) -> list[dict]:
    cmd = [sys.executable, "-m", "benchmarks.data_scaling", "--one", mode, "--world", str(world)]
    cmd += ["--rows", str(rows)]

    def start(r: int) -> subprocess.Popen:
        return subprocess.Popen(
            [*cmd, "--rank", str(r), "--steps", str(steps), *(["--sequential"] * sequential)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, **env, "RANK": str(r)},
        )

    def finish(p: subprocess.Popen) -> dict:
        stdout, stderr = p.communicate(timeout=1800)
        if p.returncode:
            raise RuntimeError(stderr[-3000:])
        return json.loads(stdout.strip().splitlines()[-1])

    if sequential:  # one rank at a time: the work itself, without time-sharing the cores
        return [finish(start(r)) for r in range(world)]
    with tempfile.TemporaryDirectory(prefix="slipstream-bench-sync-") as sync:
        env["SCALING_SYNC"] = sync
        procs = [start(r) for r in range(world)]
        return [finish(p) for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", choices=MODES)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--ranks", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=0, help="0: about 3,200 rows' worth")
    ap.add_argument("--rows", type=int, default=ROWS_PER_STEP, help="rows of the global batch")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument(
        "--fixed-actors",
        action="store_true",
        help="ray: keep the starting actors (a regroup inside a window starts actors there)",
    )
    ap.add_argument(
        "--alone",
        action="store_true",
        help="every rank fetches its own rows (no machine group, backends/machine_group.py)",
    )
    ap.add_argument(
        "--sequential",
        action="store_true",
        help="run a job's ranks one after another (no time-sharing of the cores)",
    )
    ap.add_argument(
        "--volume",
        action="store_true",
        help="only the tokens per step sent to the ranks, from the plans (Ray: runs vs whole)",
    )
    ap.add_argument("--repeats", type=int, default=1, help="the median is reported")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.steps = args.steps or max(20, -(-3200 // args.rows))
    if args.one:
        one = one_rank(args.one, args.rank, args.world, args.steps, args.rows, args.sequential)
        print(json.dumps(one))
        return
    ensure_inputs()
    if args.volume:
        worlds = [int(x) for x in args.ranks.split(",")]
        out = {"rows_per_step": args.rows, "seq_len": SEQ_LEN, "steps": 40}
        out["results"] = volume(worlds, args.rows)
        if args.json:
            args.json.write_text(json.dumps({**provenance(("tokenizers",)), **out}, indent=2))
        return
    modes = args.modes.split(",")
    if args.fixed_actors:  # read by every rank's process (and by the benchmark's own backend)
        os.environ["SCALING_FIXED_ACTORS"] = "1"
    if args.alone:
        os.environ["SCALING_ALONE"] = "1"
    if unknown := set(modes) - set(MODES):
        ap.error(f"--modes: unknown {sorted(unknown)}; choose from {MODES}")
    run("after", 1, 1)  # builds the token-count cache once, outside the measurements
    env = None
    if "ray" in modes:
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        env = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    results: dict[str, dict] = {}
    head = ["repeat", "ranks", "mode", "CPU s/step", "docs/step", "tok/s/rank"]
    print("".join(f"{h:>12}" for h in head))
    # Repeats go round every (ranks, mode), so a drift of the machine spreads over all of them;
    # the median of the repeats is reported.
    for rep in range(args.repeats):
        for world in [int(x) for x in args.ranks.split(",")]:
            for mode in modes:
                ray_env = env if mode == "ray" else None
                hold = None
                if mode == "ray" and args.sequential:  # the job's actors outlive each rank
                    from slipstream.data.backends.ray import RayBackend

                    hold = RayBackend(load_spec(world, mode, args.rows))
                rs = run(mode, world, args.steps, ray_env, args.rows, args.sequential)
                if hold is not None:
                    hold.close()  # the last client: the actors go (the next repeat starts cold)
                cpu = sum(r["cpu_s"] for r in rs) / args.steps
                docs = sum(r["docs_loaded"] for r in rs) / args.steps
                per_rank = sum(r["tokens"] / r["wall_s"] for r in rs) / world
                out = results.setdefault(f"{mode}/{world}", {"repeats": [], "runs": []})
                out["repeats"].append(
                    {
                        "cpu_s_per_step": cpu,
                        "docs_per_step": docs,
                        "tokens_per_s_per_rank": per_rank,
                    }
                )
                out["runs"].append(rs)
                print(f"{rep:>12}{world:>12}{mode:>12}{cpu:>12.4f}{docs:>12.1f}{per_rank:>12,.0f}")
    for out in results.values():
        for key in ("cpu_s_per_step", "docs_per_step", "tokens_per_s_per_rank"):
            out[key] = statistics.median(r[key] for r in out["repeats"])
    ranks = [int(x) for x in args.ranks.split(",")]
    for mode in modes:
        a, b = results[f"{mode}/{ranks[0]}"], results[f"{mode}/{ranks[-1]}"]
        each = [y["cpu_s_per_step"] / x["cpu_s_per_step"]
                for x, y in zip(a["repeats"], b["repeats"], strict=True)]  # fmt: skip
        print(
            f"{mode}: job data CPU per step {ranks[0]} -> {ranks[-1]} ranks: "
            f"{b['cpu_s_per_step'] / a['cpu_s_per_step']:.2f}x (medians; each repeat: "
            + ", ".join(f"{x:.2f}x" for x in each)
            + ")"
        )
    if args.json:
        shape = {"rows_per_step": args.rows, "seq_len": SEQ_LEN, "steps": args.steps,
                 "sequential": args.sequential, "fixed_actors": args.fixed_actors,
                 "alone": args.alone, "repeats": args.repeats}  # fmt: skip
        out = {**provenance(("tokenizers", "psutil", "ray")), **shape, "results": results}
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
