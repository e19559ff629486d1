"""`make bench-gpu`'s script runs its parts with a given python, each under its own limit,
leaves out the parts named in SKIP, and leaves its logs and JSON in $OUT: checked here with the
offload part at smoke size on the CPU (what it measures needs a GPU; that it runs does not):
the GPU offload script's own test, so it is ready for the day a GPU is there."""

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
    # The offload script itself (its numbers mean nothing on a CPU, its working does): between
    # steps the device keeps 12 bytes per parameter plain (fp32 weights, Adam's m and v;
    # gradients freed by zero_grad) and 2 with offload (bf16 weights only).
    runs = report["largest"]
    assert runs["plain"]["state_bytes_per_param"] == 12.0
    assert runs["offload"]["state_bytes_per_param"] == 2.0
    # Part 2: the three sides at one size, each with a step time and the planner beside it.
    assert set(report["throughput"]) == {"plain", "offload", "offload+dpu"}
    for r in report["throughput"].values():
        assert r["tokens_per_s"] > 0 and r["planner_device_gib"] > 0
