"""The planner's loops in C and their Python twins: the same plans bit for bit, the stream is
smooth weighted round-robin, and packing keeps every token."""

from __future__ import annotations

import numpy as np
import pytest

from slipstream.data import MixtureSpec, Planner
from slipstream.data.plankernels import Lookahead, draw_docs, library, pack_best_fit

needs_c = pytest.mark.skipif(library() is None, reason="no C compiler")


def spec(num_sources: int, mix_by: str, packing: bool, **kw) -> MixtureSpec:
    sources = [
        {"name": f"s{i}", "format": "jsonl", "paths": [f"s{i}.jsonl"], "weight": 1.0 + i % 3}
        for i in range(num_sources)
    ]
    sources[1].pop("weight")
    sources[1]["schedule"] = [[0, 0.0], [2, 0.0], [3, 4.0]]  # closed, then the heaviest
    raw = {"sources": sources, "seq_len": 64, "micro_batch_size": 2, "num_micro_batches": 2,
           "mix_by": mix_by, "packing": packing, **kw}  # fmt: skip
    return MixtureSpec.from_dict(raw)


def lengths(num_sources: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)  # few documents: epochs wrap within a step
    return [np.maximum(1, rng.lognormal(np.log(30), 1.2, 3 + 7 * i)).astype(np.int32)
            for i in range(num_sources)]  # fmt: skip


@needs_c
@pytest.mark.parametrize("mix_by", ["documents", "tokens"])
@pytest.mark.parametrize("packing", [True, False])
def test_c_and_python_plan_the_same_steps(mix_by, packing):
    s, lens = spec(12, mix_by, packing, holdout_fraction=0.1), lengths(12)
    a = Planner(s, lens, dp_world_size=3, native=True)
    b = Planner(s, lens, dp_world_size=3, native=False)
    for _ in range(8):
        x, y = a.plan_step(), b.plan_step()
        for field in ("piece_source", "piece_doc", "piece_start", "piece_length", "row_offsets",
                      "row_costs", "assignment", "docs_drawn", "stream_source", "stream_doc"):  # fmt: skip
            assert np.array_equal(getattr(x, field), getattr(y, field)), field
        assert x.state_before == y.state_before
    assert a.state_dict() == b.state_dict()


def round_robin_sources(weights_at, steps_docs: list[int], n: int) -> list[int]:
    """Smooth weighted round-robin by documents, one draw at a time."""
    credits, out = np.zeros(n), []
    for step, count in enumerate(steps_docs):
        w = np.array(weights_at(step), dtype=np.float64)
        closed = np.where(w > 0, 0.0, -np.inf)
        for _ in range(count):
            credits += w
            s = int(np.argmax(credits + closed))
            credits[s] -= 1.0
            out.append(s)
    return out


@pytest.mark.parametrize("native", [None, False])
def test_the_stream_is_round_robin_over_each_sources_permutation(native):
    s, lens = spec(5, "documents", True), lengths(5, seed=1)
    planner = Planner(s, lens, dp_world_size=2, native=native)
    plans = [planner.plan_step() for _ in range(6)]
    stream = [k for i, p in enumerate(plans) for k in (p.stream[1:] if i and plans[i - 1].stream
              and p.stream[:1] == plans[i - 1].stream[-1:] else p.stream)]  # fmt: skip
    expected = round_robin_sources(s.weights_at, [int(p.docs_drawn.sum()) for p in plans], 5)
    assert [src for src, _ in stream] == expected
    fresh = Planner(s, lens, dp_world_size=2)
    for src in range(5):  # within a source: its seeded permutation, epoch after epoch
        docs = [d for x, d in stream if x == src]
        order = np.concatenate(
            [fresh._perm(src, e) for e in range(len(docs) // len(lens[src]) + 1)]
        )
        assert docs == order[: len(docs)].tolist()


@needs_c
@pytest.mark.parametrize("by_tokens", [False, True])
def test_draws_resume_exactly_after_the_lookahead_runs_out(by_tokens):
    rng = np.random.default_rng(2)
    n = 7
    weights = rng.random(n)
    weights[3] = 0.0
    open_ = weights > 0
    full_len = rng.integers(1, 200, (n, 400)).astype(np.int64)

    def ahead_of(take: np.ndarray, start: np.ndarray) -> Lookahead:
        parts = [full_len[s, start[s] : start[s] + take[s]] for s in range(n)]
        off = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(p) for p in parts], out=off[1:])
        cat = np.concatenate(parts)
        return Lookahead(cat, cat.copy(), off, np.zeros(n, dtype=np.int64))

    results = []
    for native, step in [(True, 400), (False, 400), (True, 5), (False, 5)]:
        credits, start, used, drawn = np.zeros(n), np.zeros(n, dtype=np.int64), 0, []
        while used < 20_000:
            ahead = ahead_of(np.where(open_, step, 0), start)
            flat, used, short = draw_docs(credits, weights, open_, ahead, by_tokens=by_tokens,
                                          packing=True, seq_len=64, budget=20_000, used=used,
                                          native=native)  # fmt: skip
            src = np.searchsorted(ahead.off, flat, side="right") - 1
            drawn += list(zip(src.tolist(), ahead.length[flat].tolist()))
            start += ahead.pos
            assert short is not None or used >= 20_000
        results.append((drawn, credits.tolist(), used))
    assert all(r == results[0] for r in results[1:])
    assert 3 not in {s for s, _ in results[0][0]}  # weight 0: never drawn


@pytest.mark.parametrize("native", [True, False])
def test_packing_fills_every_row_and_splits_only_what_does_not_fit(native):
    if native and library() is None:
        pytest.skip("no C compiler")
    rng = np.random.default_rng(3)
    seq_len, num_rows = 128, 40
    lens = rng.integers(1, seq_len // 8, 2000)  # pieces well below a row
    lens = lens[np.cumsum(lens) <= seq_len * num_rows]
    lens = np.r_[lens, seq_len * num_rows - lens.sum()]  # exactly the capacity
    lens = np.sort(lens[lens > 0])[::-1]
    chunk, off, length, row = pack_best_fit(lens, num_rows, seq_len, native=native)
    assert np.bincount(row, weights=length, minlength=num_rows).tolist() == [seq_len] * num_rows
    assert np.bincount(chunk, weights=length).tolist() == lens.tolist()  # every token, once
    split = np.bincount(chunk) > 1
    assert split.sum() <= 3  # best fit splits only near the end
    if native:
        other = pack_best_fit(lens, num_rows, seq_len, native=False)
        assert all(np.array_equal(a, b) for a, b in zip((chunk, off, length, row), other))
    with pytest.raises(AssertionError, match="more tokens"):
        pack_best_fit(np.r_[lens, 1], num_rows, seq_len, native=native)


@needs_c
def test_c_and_python_balance_rows_the_same():
    from slipstream.data.balance import _karmarkar_karp, _refine
    from slipstream.data.plankernels import kk_partition

    lib, rng = library(), np.random.default_rng(0)
    shapes = [(2, 1), (2, 40), (3, 5), (8, 4), (64, 4), (5, 9)]
    for trial in range(300):
        parts, size = shapes[trial % len(shapes)]
        batch = 1 + trial % 3
        if trial % 2:  # integer costs: many ties, where sort order decides
            costs = rng.integers(0, 4, size=(batch, parts * size)).astype(np.float64)
        else:
            costs = rng.lognormal(0.0, 1.5, size=(batch, parts * size))
        py = _karmarkar_karp(costs, parts, size)
        assert np.array_equal(kk_partition(lib, costs, parts, size), py)
        refined = _refine(costs, py)
        assert np.array_equal(_refine(costs, py, lib=lib), refined)
        assert np.array_equal(np.sort(refined.reshape(batch, -1)), np.sort(py.reshape(batch, -1)))
