"""Runs with one bottleneck put in on purpose, for the doctor's tests and its benchmark: each
writes a small corpus and a recipe into a folder and returns how to run it.

- data: one source's transform sleeps per document (I/O-like cost), with one loader worker;
- compute: a balanced fast setup (nothing else to blame);
- memory: the compute recipe planned against a device smaller than plain training needs;
- offload: the memory engine on a CPU, where the model fits without it;
- imbalance: two data-parallel ranks, balancing off, documents of very different lengths;
- communication: two ranks, a wide model and few tokens (the gradients' all-reduce is the step);
- straggler: two ranks, one of them sharing its core with other work (see `straggler_env`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

SLEEP_S = 0.01  # per document of the slow source


def sleepy(text: str) -> str:
    """A transform whose cost is waiting (a remote read, a slow disk): more workers fix it
    on any number of cores."""
    time.sleep(SLEEP_S)
    return text


WORDS = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was", "on", "be", "by", "this", "are", "from", "at", "or"]


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
        sources[1] = ("slow", sources[1][1], 0.5, "benchmarks.doctor_scenarios:sleepy")
        data["micro_batch_size"] = 8
    elif name in ("compute", "memory"):
        model.update(n_layer=4, n_head=4, d_model=256)
        data.update(seq_len=128, micro_batch_size=4)
        if name == "memory":
            run["device_gib"] = 0.035  # plain needs ~48 MiB here; offload ~35 MiB
    elif name == "offload":
        model.update(n_layer=4, n_head=4, d_model=256)
        data.update(seq_len=64, micro_batch_size=1)
        optim.update(offload=True, offload_dtype="fp32")
    elif name == "imbalance":
        model.update(d_model=64, max_seq_len=512)
        data.update(seq_len=512, micro_batch_size=2, num_micro_batches=2, packing=False)
        balance = {"method": "none", "attention_cost": 0.05}
        sources = [("skewed", _docs(rng, 400, 60, 1.6), 1.0, None)]
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
