"""The proof that a refactor changed nothing: a set of short runs with a fixed seed (one
process; 2 ranks DDP; tensor parallel; offload; ZeRO-2 offload on 2 ranks)
whose per-step losses are kept in `fixtures/losses.json`. `test_fixed_runs.py` runs them again
and compares.

    python -m tests.e2e.fixed_runs          # record (only before a change that must keep them)
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from tests.e2e.test_train import losses, torchrun, write_recipe

FIXTURE = Path(__file__).parent / "fixtures" / "losses.json"

# name -> (processes, overrides). Every run is the e2e recipe (6 steps, 2 micro-batches).
RUNS: dict[str, tuple[int, tuple[str, ...]]] = {
    "one_process": (1, ()),
    "ddp_2": (2, ()),
    "tp_2": (2, ("parallel.tp=2",)),
    "offload": (1, ("optim.offload=true", "optim.offload_dtype='fp32'")),
    "zero2_offload_2": (
        2,
        ("optim.offload=true", "optim.offload_dtype='fp32'", "optim.zero_stage=2"),
    ),
}
# The Ray backend on 2 ranks gave ddp_2's bits when it was one of these runs; it is held to one
# process in test_train.py (test_two_ranks_on_the_ray_backend_match_one_process).


def machine() -> dict:
    """What decides the last bits of a float sum: torch's CPU kernels block and vectorize by
    the instruction set and pick their blocking by the processor model (an AMD EPYC and an
    Intel Xeon, both with AVX-512, differed in 2 of the 6 runs by 2e-8 of the loss), so runs
    are bit-equal only on the same processor model with the same core count."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    # The kernels torch dispatches to, not what the processor could run: ATEN_CPU_CAPABILITY
    # =avx2 on an AVX-512 machine runs an AVX2 machine's kernels (and its sums).
    isa = torch.backends.cpu.get_cpu_capability().lower()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                  if ln.startswith("model name")), platform.processor())  # fmt: skip
    return {
        "isa": isa,
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def run(name: str, tmp: Path) -> list[float]:
    """The per-step losses of run `name`, in a fresh folder under `tmp`."""
    nproc, overrides = RUNS[name]
    recipe = write_recipe(tmp)
    out = tmp / name
    args = ["--set", f"train.out_dir='{out}'"]
    for o in overrides:
        args += ["--set", o]
    if nproc == 1:
        from tests.conftest import run_cli

        proc = run_cli("train", str(recipe), *args)
    else:
        proc = torchrun(recipe, *args, nproc=nproc)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return losses(out)


def main() -> None:
    names = sys.argv[1:] or list(RUNS)
    got = {}
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            got[name] = run(name, Path(tmp))
        print(name, got[name], flush=True)
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps({"machine": machine(), "losses": got}, indent=2) + "\n")


if __name__ == "__main__":
    main()
