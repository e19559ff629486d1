"""An existing Ray cluster: one started with `ray start --head` in its own process (a free
local port, stopped at the end); a run with `backend.ray_address` attaches to it, trains on
the same batches as the local backend and leaves no actor behind. An address nobody answers
fails in bounded time with one line naming it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("ray")

from tests.conftest import run_cli  # noqa: E402
from tests.e2e.test_train import losses, reference_losses, write_recipe  # noqa: E402
from tests.overlap.ranks import free_port  # noqa: E402

__all__ = ["reference_losses"]
RAY = Path(sys.executable).with_name("ray")


@pytest.fixture
def cluster(tmp_path):
    """The address of a Ray head started for this test alone."""
    port = free_port()
    log = open(tmp_path / "head.log", "w")  # noqa: SIM115 - closed below
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats"],  # fmt: skip
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        _on_cluster(address, "pass")  # waits until the head answers (ray.init retries)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # --block: the head takes its processes down
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:  # its graceful stop takes ~30 s: the group goes now
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        log.close()
        # `ray start` leaves the machine's record of "the current cluster", which a plain
        # ray.init() elsewhere would try to join after the head is gone.
        record = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if record.is_file() and record.read_text().strip().endswith(f":{port}"):
            record.unlink()


def _on_cluster(address: str, code: str) -> str:
    """Run `code` in a driver process attached to the cluster; its stdout."""
    script = f"import ray\nray.init(address={address!r}, log_to_driver=False)\n{code}\n"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.skipif(not RAY.exists() and not shutil.which("ray"), reason="no ray command")
def test_a_run_attaches_to_an_existing_cluster_and_leaves_nothing_behind(
    tmp_path, cluster, reference_losses
):
    recipe = write_recipe(tmp_path)
    run = tmp_path / "run"
    out = run_cli(
        "train", str(recipe), "--set", f"train.out_dir='{run}'",
        "--set", "data.backend.kind='ray'", "--set", f"data.backend.ray_address='{cluster}'",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    # The batches are the local backend's, so the losses are (the one-process reference).
    assert losses(run) == pytest.approx(reference_losses, rel=1e-6)
    left = _on_cluster(cluster, "print(ray.util.list_named_actors(all_namespaces=True))")
    assert left.strip() == "[]", left  # the job's directory and loader actors are gone


def test_an_address_nobody_answers_fails_in_one_line_naming_it(tmp_path):
    address = f"127.0.0.1:{free_port()}"  # bound and released: nothing listens there
    recipe = write_recipe(tmp_path)
    out = run_cli(
        "train", str(recipe), "--set", "data.backend.kind='ray'",
        "--set", f"data.backend.ray_address='{address}'",
        "--set", "data.backend.connect_timeout_s=1", timeout_s=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and address in lines[0] and "nothing answers" in lines[0], lines
    assert "after 1 s" in lines[0]  # the recipe's bound, not the default
