"""Runs with one bottleneck put in on purpose, for the doctor's tests and its benchmark: each
writes a small corpus and a recipe into a folder and returns how to run it.

- data: one source's transform sleeps per document (I/O-like cost), with one loader worker;
- compute: a balanced fast setup (nothing else to blame);
- memory: the compute recipe planned against a device smaller than plain training needs;
- offload: the memory engine on a CPU, its host step on one of the cores;
- imbalance: two data-parallel ranks, balancing off, documents of very different lengths;
- communication: two ranks, a wide model and few tokens (the gradients' all-reduce is the step);
- straggler: two ranks on the same rows' cost, one of them doing its forward's matrix products
  SLOW_FACTOR times (`run_straggler`): slower than its rows say, as a throttled device or a
  host with other work is.
"""

from __future__ import annotations

import json
import keyword
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SLEEP_S = 0.02  # per document of the slow source ($DOCTOR_SCENARIO_SLEEP_S overrides it)


def sleepy(text: str) -> str:
    """A transform whose cost is waiting (a remote read, a slow disk): more workers fix it
    on any number of cores."""
    time.sleep(float(os.environ.get("DOCTOR_SCENARIO_SLEEP_S", SLEEP_S)))
    return text


WORDS = keyword.kwlist  # the documents' words: Python's keywords


def _docs(rng: np.random.Generator, n: int, mean_words: float, sigma: float) -> list[str]:
    lens = np.maximum(1, rng.lognormal(np.log(mean_words), sigma, size=n).astype(int))
    return [" ".join(rng.choice(WORDS, k)) for k in lens]


def _source(root: Path, name: str, docs: list[str]) -> str:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "part-0.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return f"{name}/*.jsonl"


def _toml(value) -> str:
    return json.dumps(value)


def write(root: Path, name: str) -> tuple[Path, dict]:
    """The scenario's recipe under `root`, and {"nproc", "device_gib"} to run it with."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    model = {"n_layer": 2, "n_head": 2, "d_model": 64, "max_seq_len": 256}
    data = {"seq_len": 64, "micro_batch_size": 2, "num_micro_batches": 1, "seed": 1}
    backend = {"kind": "local", "num_workers": 2, "prefetch_steps": 2}
    balance = {"method": "greedy"}
    optim = {"lr": 1e-3, "warmup_steps": 2}
    parallel = {}
    run = {"nproc": 1, "device_gib": None}
    sources = [
        ("a", _docs(rng, 400, 30, 0.6), 0.5, None),
        ("b", _docs(rng, 400, 30, 0.6), 0.5, None),
    ]
    if name == "data":
        backend["num_workers"] = 1
        # Few documents: counting their tokens the first time runs the transform on each.
        sources[1] = ("slow", sources[1][1][:80], 0.5, "benchmarks.doctor_scenarios:sleepy")
        data["micro_batch_size"] = 16
    elif name in ("compute", "memory"):
        model.update(n_layer=4, n_head=4, d_model=256)
        data.update(seq_len=128, micro_batch_size=4)
        if name == "memory":
            run["device_gib"] = 0.045  # plain needs ~68 MiB here, offload + checkpointing ~42
    elif name == "offload":
        model.update(n_layer=4, n_head=4, d_model=256)
        data.update(seq_len=64, micro_batch_size=1)
        optim.update(offload=True, offload_dtype="fp32", offload_threads=1)
    elif name == "imbalance":  # rows of 2,048: attention runs per document (sum of len^2)
        model.update(d_model=64, max_seq_len=2048)
        data.update(seq_len=2048, micro_batch_size=2, num_micro_batches=1)
        balance = {"method": "none"}
        # Rows of one long document (attention ~ 2,048^2) beside rows of many short ones.
        sources = [("long", _docs(rng, 200, 700, 0.2), 0.1, None),
                   ("short", _docs(rng, 3000, 20, 0.5), 0.9, None)]  # fmt: skip
        run["nproc"] = 2
    elif name == "communication":
        model.update(n_layer=4, n_head=4, d_model=384)
        data.update(seq_len=16, micro_batch_size=1)
        run["nproc"] = 2
    elif name == "straggler":
        model.update(n_layer=2, n_head=2, d_model=128)
        data.update(seq_len=64, micro_batch_size=4)
        run["nproc"] = 2
    else:
        raise ValueError(f"scenario: {name!r}; use one of {', '.join(SCENARIOS)}")
    lines = ["[model]", *[f"{k} = {_toml(v)}" for k, v in model.items()], "", "[data]",
             *[f"{k} = {_toml(v)}" for k, v in data.items()], "[data.backend]",
             *[f"{k} = {_toml(v)}" for k, v in backend.items()], "[data.balance]",
             *[f"{k} = {_toml(v)}" for k, v in balance.items()]]  # fmt: skip
    for src, docs, weight, transform in sources:
        lines += ["[[data.sources]]", f'name = "{src}"', f'paths = ["{_source(root, src, docs)}"]',
                  f"weight = {weight}"]  # fmt: skip
        if transform:
            lines.append(f'transform = "{transform}"')
    lines += ["", "[optim]", *[f"{k} = {_toml(v)}" for k, v in optim.items()], "", "[train]",
              "num_threads = 1", 'device = "cpu"', "", "[parallel]",
              *[f"{k} = {_toml(v)}" for k, v in parallel.items()]]  # fmt: skip
    path = root / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path, run


SCENARIOS = ("data", "compute", "memory", "offload", "imbalance", "communication", "straggler")


SLOW_FACTOR = 16  # the straggler's forward does each matrix product this many times
SLOW_RANK = "DOCTOR_SCENARIO_SLOW_RANK"  # "RANK:FACTOR", read by `train` below


def run_straggler(recipe: Path, out: Path, steps: int, factor: int = SLOW_FACTOR) -> None:
    """Two ranks under torchrun, rank 1 doing each forward matrix product `factor` times:
    about (factor + 2) / 3 times rank 0's own time for the same rows, however the machine's
    other work spreads over its cores (a slowdown by work, not by the scheduler's shares)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node=2", "-m", "benchmarks.doctor_scenarios", "train", str(recipe),
           "--set", f"train.steps={steps}", "--set", f"train.out_dir={out}",
           "--set", "train.checkpoint_every=0", "--set", "train.eval_every=0",
           "--set", "train.sample_tokens=0", "--set", "train.progress=false",
           "--overwrite"]  # fmt: skip
    env = {**os.environ, SLOW_RANK: f"1:{factor}"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"straggler run failed: {done.stderr[-2000:]}")


def _repeat_linears(factor: int) -> None:
    """Every nn.Linear's forward in this process computes its product `factor - 1` more
    times (thrown away): the same rows, more work."""
    import torch
    from torch import nn

    def again(module, args, out):
        if isinstance(module, nn.Linear):
            with torch.no_grad():
                for _ in range(factor - 1):
                    nn.functional.linear(args[0], module.weight, module.bias)

    nn.modules.module.register_module_forward_hook(again)


def _train(argv: list[str]) -> int:
    """`slipstream train`, slowed on the rank $DOCTOR_SCENARIO_SLOW_RANK names (torchrun's
    RANK)."""
    from slipstream.cli import main

    rank, _, factor = os.environ.get(SLOW_RANK, "-1:1").partition(":")
    if rank == os.environ.get("RANK", "0"):
        _repeat_linears(int(factor))
    return main(["train", *argv])


USAGE = """usage: python -m benchmarks.doctor_scenarios write NAME DIR   (a scenario's recipe)
       python -m benchmarks.doctor_scenarios train RECIPE [ARGS]  (one rank; see _train)"""

if __name__ == "__main__":
    if sys.argv[1:2] == ["train"]:
        raise SystemExit(_train(sys.argv[2:]))
    if sys.argv[1:2] == ["write"] and len(sys.argv) == 4:
        recipe, how = write(Path(sys.argv[3]), sys.argv[2])
        extra = (f" --nproc {how['nproc']}" if how["nproc"] > 1 else "") + (
            f" --device-gib {how['device_gib']}" if how["device_gib"] else "")  # fmt: skip
        print(f"wrote {recipe}; diagnose it with: slipstream doctor {recipe}{extra}")
        raise SystemExit(0)
    raise SystemExit(USAGE)
