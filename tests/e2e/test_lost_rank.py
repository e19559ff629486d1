"""A rank dies mid-run: the survivor says so in one line of its own (which rank, at which
step, where the last checkpoint is and that --resume continues) and exits non-zero, without
torchrun (as under srun: processes started with the launcher's variables by hand) and under
torchrun (whose agent then stops the survivors)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e.test_train import ROOT, write_recipe
from tests.overlap.ranks import free_port

LONG = ("--set", "train.steps=400", "--set", "train.checkpoint_every=2",
        "--set", "train.eval_every=0", "--set", "train.sample_tokens=0")  # fmt: skip
LINE = re.compile(
    r"error: rank 0: lost rank 1 at step (\d+); the last checkpoint is step (\d+) \(.+\); "
    r"--resume continues from it"
)


def _wait_for_steps(run, n: int, procs: list[subprocess.Popen]) -> None:
    """Until rank 0 has logged `n` steps (or a process ended: the test then fails on it)."""
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 240  # a guard against a hang, not a speed requirement
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError("the run did not reach its steps: " + procs[0].stderr.read()[-2000:])


def _check_line(err: str, run) -> None:
    lines = [ln for ln in err.splitlines() if "lost rank" in ln]
    assert len(lines) == 1, err[-3000:]
    m = LINE.fullmatch(lines[0].strip())
    assert m, lines[0]
    step, saved = int(m[1]), int(m[2])
    assert saved <= step and (run / "checkpoints" / f"step_{saved:08d}").is_dir()
    assert "Traceback" not in err and "Connection closed by peer" not in err, err[-3000:]


def test_without_torchrun_the_survivor_names_the_lost_rank_and_the_checkpoint(tmp_path):
    recipe = write_recipe(tmp_path)
    run = tmp_path / "run"
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        cmd = [sys.executable, "-m", "slipstream", "train", str(recipe), "--set",
               f"train.out_dir='{run}'", *LONG]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    try:
        _wait_for_steps(run, 3, procs)
        procs[1].kill()  # SIGKILL: no word from it
        _, err = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 1, err[-3000:]
    _check_line(err, run)


def test_under_torchrun_the_survivor_says_what_happened(tmp_path):
    pytest.importorskip("psutil")
    import psutil

    recipe = write_recipe(tmp_path)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "slipstream", "train", str(recipe), "--set", f"train.out_dir='{run}'", *LONG]  # fmt: skip
    agent = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    try:
        _wait_for_steps(run, 3, [agent])
        workers = {
            p.environ().get("RANK"): p
            for p in psutil.Process(agent.pid).children(recursive=True)
            if "slipstream" in " ".join(p.cmdline())
        }
        os.kill(workers["1"].pid, signal.SIGKILL)
        _, err = agent.communicate(timeout=120)
    finally:
        agent.kill()
    assert agent.returncode != 0
    _check_line_torchrun(err, run)


def _check_line_torchrun(err: str, run) -> None:
    """torchrun adds its own report of the failed worker after the survivor's line."""
    lines = [ln for ln in err.splitlines() if "lost rank" in ln]
    assert len(lines) == 1, err[-3000:]
    assert LINE.search(lines[0]), lines[0]
    assert "Connection closed by peer" not in err, err[-3000:]
