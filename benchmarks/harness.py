"""Runs one measurement in a fresh process (so memory and warm caches are its own) and reads
the JSON line it prints last."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_isolated(module: str, args: list[str], timeout_s: float) -> dict:
    cmd = [sys.executable, "-m", module, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
