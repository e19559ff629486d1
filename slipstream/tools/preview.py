"""`slipstream data preview`: runs the data plane for a few steps and reports what it delivers:
per-source proportions against target, tokens/s, packing efficiency and the attention-cost
imbalance across a chosen number of ranks with and without balancing."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.progress import track
from rich.table import Table

from slipstream.data.loader import MixtureLoader, unbalanced_imbalance
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
    imbalance_random: float
    num_bad: list[int]


def run_preview(
    spec: MixtureSpec, num_steps: int, num_ranks: int = 1, show_progress: bool = True
) -> PreviewReport:
    n = len(spec.sources)
    docs, tokens = np.zeros(n, np.int64), np.zeros(n, np.int64)
    slots, imb, imb0, imb_random = 0, [], [], []
    with MixtureLoader(spec, dp_world_size=num_ranks) as loader:
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
        packing, random = unbalanced_imbalance(spec, b.plan, num_ranks)
        imb0.append(packing)
        imb_random.append(random)
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
        imbalance_random=float(np.mean(imb_random)),
        num_bad=list(num_bad),
    )


def print_preview(
    spec: MixtureSpec, report: PreviewReport, num_ranks: int, console: Console | None = None
) -> None:
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
        f"attention-cost imbalance (max/mean over {num_ranks} ranks): rows in random order "
        f"{report.imbalance_random:.3f}, in packing order {report.imbalance_unbalanced:.3f}, "
        f"balanced ({spec.balance.method!r}) {report.imbalance:.3f}"
    )
