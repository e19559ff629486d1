"""`slipstream data preview`: runs the data plane for a few steps and reports what it delivers:
per-source proportions against target, tokens/s, packing efficiency and the attention-cost
imbalance across ranks with and without balancing. Also the mixture sampler used to train a
tokenizer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.progress import track
from rich.table import Table

from slipstream.data.loader import MixtureLoader
from slipstream.data.source_loader import build_source_loaders
from slipstream.data.spec import MixtureSpec


@dataclass(slots=True)
class PreviewReport:
    names: list[str]
    target: list[float]
    docs: np.ndarray
    tokens: np.ndarray
    tokens_per_s: float
    packing_efficiency: float
    imbalance: float
    imbalance_unbalanced: float
    num_bad: list[int]


def run_preview(spec: MixtureSpec, num_steps: int, show_progress: bool = True) -> PreviewReport:
    n = len(spec.sources)
    docs, tokens = np.zeros(n, np.int64), np.zeros(n, np.int64)
    slots, imb, imb0 = 0, [], []
    with MixtureLoader(spec) as loader:
        it = iter(loader)
        first = next(it)  # start-up (index loading, pool start) is not throughput
        t0 = time.perf_counter()
        steps = [first]
        rest = range(num_steps - 1)
        for _ in track(rest, description="previewing", disable=not show_progress):
            steps.append(next(it))
        elapsed = time.perf_counter() - t0
        num_bad = loader.backend.num_bad
    for b in steps:
        s = b.stats
        docs += s.docs_by_source
        tokens += s.tokens_by_source
        slots += s.num_slots
        imb.append(s.imbalance)
        imb0.append(s.imbalance_unbalanced)
    timed = tokens.sum() - steps[0].stats.num_tokens
    return PreviewReport(
        names=[s.name for s in spec.sources],
        target=spec.weights_at(steps[-1].step),
        docs=docs,
        tokens=tokens,
        tokens_per_s=float(timed / elapsed) if num_steps > 1 and elapsed > 0 else float("nan"),
        packing_efficiency=float(tokens.sum() / slots),
        imbalance=float(np.mean(imb)),
        imbalance_unbalanced=float(np.mean(imb0)),
        num_bad=list(num_bad),
    )


def print_preview(spec: MixtureSpec, report: PreviewReport, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="sources")
    cols = (
        "source",
        "target",
        "docs",
        "realized (docs)",
        "tokens",
        "share of tokens",
        "bad records",
    )
    for col in cols:
        table.add_column(col, justify="right" if col != "source" else "left")
    total_docs = max(int(report.docs.sum()), 1)
    total_tokens = max(int(report.tokens.sum()), 1)
    for i, name in enumerate(report.names):
        table.add_row(
            name,
            f"{report.target[i]:.1%}",
            f"{int(report.docs[i]):,}",
            f"{report.docs[i] / total_docs:.1%}",
            f"{int(report.tokens[i]):,}",
            f"{report.tokens[i] / total_tokens:.1%}",
            f"{report.num_bad[i]:,}",
        )
    console.print(table)
    console.print(
        f"tokens/s: {report.tokens_per_s:,.0f}   packing efficiency: "
        f"{report.packing_efficiency:.1%} non-padding"
    )
    console.print(
        f"attention-cost imbalance (max/mean over {spec.dp_world_size} ranks): "
        f"{report.imbalance_unbalanced:.3f} unbalanced -> {report.imbalance:.3f} "
        f"with {spec.balance.method!r}"
    )


def mixture_texts(spec: MixtureSpec, max_docs: int) -> Iterator[str]:
    """Up to `max_docs` raw documents drawn across sources in proportion to the step-0 weights,
    for training a tokenizer."""
    loaders = build_source_loaders(spec)
    rng = np.random.default_rng(spec.seed)
    for ldr, w in zip(loaders, spec.weights_at(0), strict=True):
        k = min(ldr.num_docs, int(round(max_docs * w)))
        ids = np.sort(rng.choice(ldr.num_docs, size=k, replace=False))
        for start in range(0, k, 256):
            yield from ldr.read_texts(ids[start : start + 256])
        ldr.close()
