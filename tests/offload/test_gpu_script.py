"""The GPU offload script runs end to end (on the CPU at tiny sizes), so it is ready for the
day a GPU is there: the numbers it prints here mean nothing, its working does."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_gpu_offload_script_runs_in_smoke_mode(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.gpu_offload",
            "--smoke",
            "--json",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "plain" in out.stdout and "offload" in out.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    runs = report["largest"]
    # Between steps the device keeps 12 bytes per parameter plain (fp32 weights, Adam's m and
    # v; gradients are freed by zero_grad) and 2 with offload (bf16 weights only).
    assert runs["plain"]["state_bytes_per_param"] == 12.0
    assert runs["offload"]["state_bytes_per_param"] == 2.0
    # Part 2: the three sides at one size, each with a step time and the planner beside it.
    assert set(report["throughput"]) == {"plain", "offload", "offload+dpu"}
    for r in report["throughput"].values():
        assert r["tokens_per_s"] > 0 and r["planner_device_gib"] > 0
