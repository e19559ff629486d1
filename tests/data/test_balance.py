"""Equal-size partitioning: exact sizes, and lower attention-cost imbalance on skewed rows."""

from __future__ import annotations

import numpy as np
import pytest

from slipstream.data.balance import imbalance, partition, row_cost


@pytest.mark.parametrize("method", ["none", "greedy", "kk"])
def test_every_part_gets_exactly_part_size_items(method):
    costs = np.random.default_rng(0).random(48)
    parts = partition(costs, num_parts=8, part_size=6, method=method)
    assert [len(p) for p in parts] == [6] * 8
    assert sorted(i for p in parts for i in p) == list(range(48))


@pytest.mark.parametrize("method", ["greedy", "kk"])
def test_balancing_lowers_the_imbalance_of_a_skewed_set(method):
    # Rows of a 4k-token step: one long document (quadratic cost) or many short ones.
    rng = np.random.default_rng(1)
    lens = [[4096] if rng.random() < 0.2 else [256] * 16 for _ in range(64)]
    costs = np.array([row_cost(ls, 1.0, 1.0 / (6 * 768)) for ls in lens])
    before = imbalance(costs, partition(costs, 8, 8, "none"))
    after = imbalance(costs, partition(costs, 8, 8, method))
    assert before > 1.2
    assert after < 1.05
    assert after < before


def test_row_cost_is_linear_plus_quadratic():
    assert row_cost([30, 70], 1.0, 1.0) == 100 + 900 + 4900
    assert row_cost([30, 70], 0.0, 1.0) > row_cost([50, 50], 0.0, 1.0)


def test_wrong_item_count_is_refused():
    with pytest.raises(ValueError, match="items"):
        partition(np.ones(5), 2, 2, "greedy")


def test_swap_refinement_never_raises_the_maximum_and_keeps_sizes():
    from slipstream.data.balance import _greedy, _karmarkar_karp, _refine

    rng = np.random.default_rng(3)
    costs = rng.lognormal(0, 1.5, (10, 96))  # ten problems at once
    for build in (_greedy, _karmarkar_karp):
        raw = build(costs, 8, 12)
        refined = _refine(costs, raw)
        for c, r, f in zip(costs, raw, refined):
            assert f.shape == (8, 12)
            assert sorted(f.reshape(-1).tolist()) == list(range(96))
            assert imbalance(c, f) <= imbalance(c, r) + 1e-12


def sequential_kk(costs: np.ndarray, num_parts: int, part_size: int) -> list[list[int]]:
    """Largest differencing with a heap of partial solutions, one problem at a time: what the
    batched `_karmarkar_karp` must give each row."""
    import heapq

    order = np.argsort(-costs, kind="stable")
    heap = []
    for c in range(part_size):
        chunk = order[c * num_parts : (c + 1) * num_parts]
        subsets = sorted(((float(costs[i]), [int(i)]) for i in chunk), key=lambda s: -s[0])
        heapq.heappush(heap, (-(subsets[0][0] - subsets[-1][0]), c, subsets))
    tie = part_size
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = [(a[j][0] + b[-1 - j][0], a[j][1] + b[-1 - j][1]) for j in range(num_parts)]
        merged.sort(key=lambda s: -s[0])
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), tie, merged))
        tie += 1
    return [sorted(items) for _, items in heap[0][2]]


@pytest.mark.parametrize("shape", [(4, 1), (2, 2), (8, 5), (3, 16), (16, 3)])
def test_batched_karmarkar_karp_is_the_heap_algorithm_on_each_row(shape):
    from slipstream.data.balance import _karmarkar_karp

    parts, size = shape
    rng = np.random.default_rng(parts * 100 + size)
    costs = rng.lognormal(0, 1.0, (6, parts * size))
    costs[0] = np.round(costs[0])  # ties
    got = _karmarkar_karp(costs, parts, size)
    for c, g in zip(costs, got):
        assert g.tolist() == sequential_kk(c, parts, size)


def test_partition_many_gives_each_row_what_partition_gives_it():
    from slipstream.data.balance import partition_many

    costs = np.random.default_rng(4).lognormal(0, 1.0, (5, 24))
    for method in ("none", "random", "greedy", "kk"):
        many = partition_many(costs, 4, 6, method, seed=7)
        for c, m in zip(costs, many):
            assert m.tolist() == partition(c, 4, 6, method, seed=7).tolist()
