"""`make bench-gpu`'s script runs its parts with a given python, each under its own limit,
leaves out the parts named in SKIP, and leaves its logs and JSON in $OUT: checked here with the
offload part at smoke size on the CPU (what it measures needs a GPU; that it runs does not)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_gpu_session_runs_its_parts_and_skips_the_named_ones(tmp_path):
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "GPU_PY": sys.executable,
        "SKIP": "tests overlap",
        "OFFLOAD_ARGS": "--smoke",
        "OFFLOAD_LIMIT": "240",
        "SLIPSTREAM_COMMIT": "0123abc",
    }
    out = subprocess.run(
        ["bash", "benchmarks/gpu_session.sh"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "== tests: skipped (SKIP)" in out.stdout and "== overlap: skipped (SKIP)" in out.stdout
    assert "== offload: exit 0" in out.stdout
    assert (tmp_path / "env.log").is_file()
    report = json.loads((tmp_path / "gpu-offload.json").read_text())
    assert report["commit"] == "0123abc"  # the commit the caller names, not the copy's .git
    assert report["largest"]["offload"]["layers"] >= 1
