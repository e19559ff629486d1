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


def provenance(peers: tuple[str, ...] = ()) -> dict:
    """What a results file must carry: commit, command, machine, versions."""
    import importlib.metadata as md
    import os
    import platform

    import torch

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout.strip()
    if os.environ.get("SLIPSTREAM_COMMIT") or not commit:
        # A copy of the tree whose .git is missing or stale (a lent GPU machine): the caller
        # names the commit it sent.
        commit, dirty = os.environ.get("SLIPSTREAM_COMMIT", "unknown"), ""
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = ""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f", {torch.cuda.device_count()} x {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return {
        "commit": commit + (" (uncommitted changes)" if dirty else ""),
        "command": " ".join(["python", "-m", _module(sys.argv[0]), *sys.argv[1:]]),
        "machine": f"{os.cpu_count()} cores, {mem_gib:.0f} GiB, {platform.machine()}, "
        f"{platform.processor() or platform.platform()}{gpu}",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            **({"cuda": torch.version.cuda} if torch.cuda.is_available() else {}),
            **{p: version(p) for p in peers},
        },
    }


def _module(argv0: str) -> str:
    """`benchmarks/x.py` as run by `python -m benchmarks.x`."""
    path = Path(argv0).resolve()
    try:
        return ".".join(path.relative_to(ROOT).with_suffix("").parts)
    except ValueError:
        return argv0
