"""Run a function on N local processes joined in a gloo group, and collect what each returns.
Processes are started with `spawn` and joined one by one, so one rank's death does not kill
the others (the fault-injection tests need to see how the survivors end)."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import traceback
from pathlib import Path

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, port: int, out: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = ("ok", fn(rank, world, *args))
    except BaseException as e:  # the test asserts on the error itself
        result = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    Path(out, f"{rank}.pkl").write_bytes(pickle.dumps(result))
    os._exit(0)  # skip gloo teardown: a dead peer would make it hang


def run_ranks(fn, world: int, tmp_path: Path, *args, timeout_s: float = 120) -> list:
    """[(status, value or error text) per rank]; a rank that died without a word gives
    ("died", exit code)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world, port, str(tmp_path), args))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
        if p.is_alive():
            p.kill()
            p.join()
    results = []
    for r, p in enumerate(procs):
        f = tmp_path / f"{r}.pkl"
        results.append(pickle.loads(f.read_bytes()) if f.is_file() else ("died", p.exitcode))
    return results


def values(results: list) -> list:
    """The ranks' return values, failing with every rank's error if any rank failed."""
    bad = [(r, res) for r, res in enumerate(results) if res[0] != "ok"]
    assert not bad, "\n".join(f"rank {r}: {res[1]}" for r, res in bad)
    return [res[1] for res in results]
