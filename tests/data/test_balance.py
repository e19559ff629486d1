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
    for _ in range(10):
        costs = rng.lognormal(0, 1.5, 96)
        for build in (_greedy, _karmarkar_karp):
            raw = build(costs, 8, 12)
            refined = _refine(costs, raw)
            assert [len(p) for p in refined] == [12] * 8
            assert sorted(i for p in refined for i in p) == list(range(96))
            assert imbalance(costs, refined) <= imbalance(costs, raw) + 1e-12
