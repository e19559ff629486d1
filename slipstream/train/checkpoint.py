"""Checkpoints: atomic, resumable, the last K kept.

A checkpoint is a folder `checkpoints/step_00000100/` holding the model, the optimizer's state
as the named parts it gives (`<part>.pt`, with `.tp<r>` for each tensor-parallel slice: the
checkpoint does not know how they are sharded), the data plane's state (a few counters), each
rank's RNG states and `meta.json` (version, step, world size, model config). It is written under a temporary name and renamed
when complete, so a crash mid-write leaves the previous checkpoint intact and no half one.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slipstream.configfile import VERSION_KEY, check_version
from slipstream.train.distributed import Dist, barrier

CHECKPOINT_VERSION = 1
PREFIX = "step_"


def _suffix(d: Dist) -> str:
    """Tensor-parallel slices are saved one file per slice."""
    return f".tp{d.tp_rank}" if d.tp_size > 1 else ""


RUN_FILES = ("config.json", "resolved.json", "metrics.jsonl", "summary.json", "checkpoints",
             "tensorboard", "wandb")  # fmt: skip
"""What a run writes into its folder (and all that --overwrite removes)."""


def claim_run_dir(run_dir: Path, resume: bool, overwrite: bool, d: Dist) -> None:
    """Make sure this run may write into `run_dir`: a folder that holds another run is
    refused unless it is continued (--resume) or replaced (--overwrite: its run files go,
    nothing else). Every rank checks; rank 0 removes."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"train.out_dir: {run_dir} is a file; name a folder for the run")
    try:  # a folder that cannot be written is one line now, not a traceback at the first save
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(
            f"train.out_dir: {run_dir} cannot be written ({e.strerror or e}); name a folder "
            "you can write (--set train.out_dir=...)"
        ) from None
    held = [n for n in RUN_FILES if (run_dir / n).exists()]
    if resume or not held:
        return
    if not overwrite:
        raise ValueError(
            f"train.out_dir: {run_dir} holds a run ({', '.join(held)}); continue it with "
            "--resume, train into another folder (--set train.out_dir=...), or replace it "
            "with --overwrite"
        )
    barrier(d)  # every rank has looked before rank 0 removes
    if d.is_main:
        for name in held:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    barrier(d)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[0] if found else None


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain numbers only, so that loading it needs no
    unpickling of arbitrary objects (`weights_only=True`)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "state": torch.tensor(mt), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class DamagedCheckpoint(ValueError):
    """A checkpoint file that cannot be read: missing, empty, truncated or corrupt."""


def _damaged(path: Path, e: BaseException) -> DamagedCheckpoint:
    reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
    return DamagedCheckpoint(f"{path}: unreadable ({reason})")


def safe_load(path: Path, device: torch.device | str = "cpu", mmap: bool = False) -> Any:
    """`torch.load` of tensors and plain containers only: a checkpoint from anyone can hold a
    pickled callable, which this refuses instead of running. A file that cannot be read at
    all is a `DamagedCheckpoint`, naming it."""
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise _damaged(path, e) from None
        raise ValueError(
            f"{path}: refused to load: it holds objects other than tensors and plain values "
            f"({str(e).splitlines()[0]}); only load checkpoints from sources you trust, and "
            "write them with this version of Slipstream"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise _damaged(path, e) from None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(path, e) from None


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints, newest first."""
    root = checkpoint_dir(run_dir)
    done = sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir()) if root.is_dir() else []
    return done[::-1]


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    d: Dist,
    keep: int,
    *,
    model: dict,
    optimizer: dict[str, dict],
    data: dict,
    meta: dict,
) -> Path | None:
    """Every rank calls this (each writes its RNG state and the optimizer parts it gives);
    rank 0 writes the rest, and under tensor parallelism each rank of the first replica
    writes its slice of the model (`model.tp1.pt`, ...)."""
    root = checkpoint_dir(run_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp_{PREFIX}{step:08d}"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a previous crash's leftovers
        tmp.mkdir(parents=True)
    barrier(d)
    torch.save(rng_state(), tmp / f"rng_rank{d.rank}.pt")
    if d.dp_rank == 0:
        torch.save(model, tmp / f"model{_suffix(d)}.pt")
    for name, part in optimizer.items():
        torch.save(part, tmp / f"{name}{_suffix(d)}.pt")
    if d.is_main:
        (tmp / "data.json").write_text(json.dumps(data))
        meta = {
            **meta,
            VERSION_KEY: CHECKPOINT_VERSION,
            "step": step,
            "world_size": d.world_size,
            "tp": d.tp_size,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    barrier(d)
    if d.is_main:
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(d)
    return final if d.is_main else None


class OptimizerParts:
    """A checkpoint's optimizer parts for one tensor-parallel slice, by name (`StateParts`)."""

    def __init__(self, folder: Path, d: Dist) -> None:
        self.folder, self.suffix, self.device = folder, _suffix(d), d.device
        tail = f"{self.suffix}.pt"
        files = [p.name for p in folder.glob(f"optimizer*{tail}")]
        self._names = sorted(n[: -len(tail)] for n in files if not self.suffix or n.endswith(tail))
        if not self.suffix:  # a tensor-parallel slice's files are not this run's parts
            self._names = [n for n in self._names if ".tp" not in n]

    def names(self) -> list[str]:
        return list(self._names)

    def load(self, name: str, mmap: bool = False) -> dict:
        """A part's state; memory-mapped on the host (a sharded optimizer reads only the spans
        it owns), else on this rank's device."""
        path = self.folder / f"{name}{self.suffix}.pt"
        return safe_load(path, "cpu" if mmap else self.device, mmap=mmap)


def load_checkpoint(path: Path, d: Dist, model_config: dict) -> dict[str, Any]:
    """The checkpoint's parts, after checking it fits this run; RNG restored in place."""
    meta = read_json(path / "meta.json")
    check_version(meta, CHECKPOINT_VERSION, f"{path}: checkpoint")
    diff = {
        k: (meta["model"].get(k), v) for k, v in model_config.items() if meta["model"].get(k) != v
    }
    if diff:
        items = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"{path}: the checkpoint's model differs from the recipe's ({items}); resume with "
            "the recipe it was trained with, or start a new run (another train.out_dir)"
        )
    if meta.get("tp", 1) != d.tp_size:
        raise ValueError(
            f"{path}: saved with parallel.tp = {meta.get('tp', 1)}, this run has "
            f"{d.tp_size}; resume with parallel.tp = {meta.get('tp', 1)} (the data-parallel "
            "size may change)"
        )
    rng = path / f"rng_rank{d.rank}.pt"
    if rng.is_file():  # absent when resuming with more ranks than were saved
        set_rng_state(safe_load(rng))
    return {
        "meta": meta,
        "model": safe_load(path / f"model{_suffix(d)}.pt", d.device),
        "optimizer": OptimizerParts(path, d),
        "data": read_json(path / "data.json"),
    }
