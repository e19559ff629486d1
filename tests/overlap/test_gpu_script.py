"""The GPU overlap script runs end to end on the CPU at tiny shapes (the interpreter for the
kernel, gloo and the shm heap for the ranks), so it is ready for the day GPUs are there: the
numbers it prints here mean nothing, its working does."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_gpu_overlap_script_runs_in_smoke_mode(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.gpu_overlap", "--smoke", "--repeats", "2"]
    out = subprocess.run(
        [*cmd, "--json", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["kernel"]["64x64x64"]["triton_wait"]["median_ms"] > 0
    multi = report["multi"]
    for side in ("nccl", "collective", "symmetric"):  # each ran, none recorded an error
        assert multi[f"ag/{side}"]["median_ms"] > 0 and multi[f"rs/{side}"]["median_ms"] > 0
        assert f"{side}/error" not in multi
    assert "NotImplementedError" in multi["torch-fused/error"]  # CPU: torch says so itself
    assert report["commit"] and report["versions"]["triton"] != "not installed"
