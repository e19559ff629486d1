"""Cost model and equal-size partitioning of rows across ranks (and micro-batches).

Every part receives exactly `part_size` rows (tensor shapes are fixed per rank); the aim is to
make the largest part's cost as small as possible, since the slowest rank sets the step time.
Knows nothing of documents' content or of ranks beyond their count.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from slipstream.data import plankernels


def row_cost(doc_lens: Sequence[int], linear_cost: float, attention_cost: float) -> float:
    """a * tokens + b * sum(len^2): attention runs per document under document masking."""
    lens = np.asarray(doc_lens, dtype=np.float64)
    return float(linear_cost * lens.sum() + attention_cost * (lens * lens).sum())


def imbalance(costs: np.ndarray, parts: list[list[int]]) -> float:
    """max / mean of the parts' total cost (1.0 is perfect balance)."""
    loads = costs[np.asarray(parts)].sum(axis=-1)
    mean = loads.mean()
    return float(loads.max() / mean) if mean > 0 else 1.0


def partition(
    costs: np.ndarray,
    num_parts: int,
    part_size: int,
    method: str,
    seed: int = 0,
    native: bool | None = None,
) -> np.ndarray:
    """Split indices 0..len(costs)-1 into `num_parts` parts of exactly `part_size` each; an
    int array [num_parts, part_size].

    `none` keeps the order (contiguous blocks); `random` deals a seeded shuffle (what a user
    gets without balancing, since packing order says nothing about cost); `greedy` and `kk`
    minimize the largest part's cost. `native` as for the planner: None runs `kk` and the
    refinement in C when it builds (plankernels), False in Python; the same result."""
    costs = np.asarray(costs, dtype=np.float64)
    if len(costs) != num_parts * part_size:
        raise ValueError(f"partition: {len(costs)} items != {num_parts} parts x {part_size}")
    return partition_many(costs[None], num_parts, part_size, method, seed, native)[0]


def partition_many(
    costs: np.ndarray,
    num_parts: int,
    part_size: int,
    method: str,
    seed: int = 0,
    native: bool | None = None,
) -> np.ndarray:
    """`partition` of each row of `costs` [batch, num_parts * part_size] at once (every rank's
    rows into its micro-batches, say): [batch, num_parts, part_size]. Each row gets what
    `partition` gives it alone."""
    batch, n = costs.shape
    if n != num_parts * part_size:
        raise ValueError(f"partition: {n} items != {num_parts} parts x {part_size}")
    if method not in METHODS:
        raise ValueError(f"balance.method: unknown {method!r}; use none, random, greedy or kk")
    if method == "none" or (num_parts == 1 and method == "kk"):  # one part: the same, no work
        order = np.broadcast_to(np.arange(n), (batch, n))
        return order.reshape(batch, num_parts, part_size).copy()
    if method == "random":
        order = np.random.default_rng(seed).permutation(n)
        return np.broadcast_to(order, (batch, n)).reshape(batch, num_parts, part_size).copy()
    lib = plankernels.library(native)
    if method == "greedy":
        parts = _greedy(costs, num_parts, part_size)
    elif lib is not None:
        parts = plankernels.kk_partition(lib, costs, num_parts, part_size)
    else:
        parts = _karmarkar_karp(costs, num_parts, part_size)
    return _refine(costs, parts, lib=lib)


METHODS = ("none", "random", "greedy", "kk")


def _greedy(costs: np.ndarray, num_parts: int, part_size: int) -> np.ndarray:
    """Longest processing time first: each item, largest first, goes to the lightest part that
    still has room (the lowest-numbered on a tie). Per row of `costs`; parts sorted."""
    out = np.empty((len(costs), num_parts, part_size), dtype=np.int64)
    for b, row in enumerate(costs):
        parts: list[list[int]] = [[] for _ in range(num_parts)]
        heap = [(0.0, p) for p in range(num_parts)]  # (load, part); full parts leave the heap
        for i in np.argsort(-row, kind="stable").tolist():
            load, p = heapq.heappop(heap)
            parts[p].append(i)
            if len(parts[p]) < part_size:
                heapq.heappush(heap, (load + row[i], p))
        out[b] = parts
    out.sort(axis=2)
    return out


def _karmarkar_karp(costs: np.ndarray, num_parts: int, part_size: int) -> np.ndarray:
    """Largest differencing method, k-way with equal sizes, for every row of `costs` at once.

    Items (largest first) are cut into chunks of `num_parts`; each chunk is a partial solution
    with one item per part, parts in falling load order. Repeatedly the two partial solutions
    with the largest spread (heaviest minus lightest part; the older first on a tie) are
    merged, pairing the heaviest part of one with the lightest of the other, which cancels
    their differences. Each part takes one item per chunk, so sizes stay equal.
    Returns [batch, num_parts, part_size], parts in falling load order, items sorted.
    The Python twin of `kk_partition` in plan.c."""
    batch, n = costs.shape
    rows = np.arange(batch)
    order = np.argsort(-costs, axis=1, kind="stable")
    # Every item's partial solution and part (slot) in it; loads[b, solution, slot].
    sol = np.broadcast_to(np.repeat(np.arange(part_size), num_parts), (batch, n)).copy()
    slot = np.broadcast_to(np.tile(np.arange(num_parts), part_size), (batch, n)).copy()
    item = order  # item at position i of the chunked order
    loads = np.take_along_axis(costs, order, axis=1).reshape(batch, part_size, num_parts)
    spread = loads[:, :, 0] - loads[:, :, -1]
    age = np.broadcast_to(np.arange(part_size), (batch, part_size)).copy()
    for t in range(part_size - 1):
        pick = np.lexsort((age, -spread), axis=1)  # largest spread first, then the oldest
        a, b = pick[:, 0], pick[:, 1]
        merged = loads[rows, a] + loads[rows, b][:, ::-1]
        perm = np.argsort(-merged, axis=1, kind="stable")
        inv = np.argsort(perm, axis=1)
        in_a, in_b = sol == a[:, None], sol == b[:, None]
        pos = np.where(in_b, num_parts - 1 - slot, slot)
        slot = np.where(in_a | in_b, np.take_along_axis(inv, pos, axis=1), slot)
        sol = np.where(in_b, a[:, None], sol)
        loads[rows, a] = np.take_along_axis(merged, perm, axis=1)
        spread[rows, a] = loads[rows, a, 0] - loads[rows, a, -1]
        spread[rows, b] = -np.inf  # merged away: never picked again
        age[rows, a] = part_size + t
    by_part = np.lexsort((item, slot), axis=1)
    return np.take_along_axis(item, by_part, axis=1).reshape(batch, num_parts, part_size)


# Refinement stops after this many candidate pairs are compared per batch row and swap (a
# bound on its time: at thousands of parts the largest-differencing result is already within
# a fraction of a percent of perfect, and each swap there gains little).
REFINE_WORK = 1 << 20
MIN_GAIN = 1e-5  # of the mean load: a swap that moves less is not worth making


def _refine(costs: np.ndarray, parts: np.ndarray, max_swaps: int = 256, lib=None) -> np.ndarray:
    """Local search on every row at once: swap one item of the heaviest part with a lighter
    item of another part while that lowers both below the current maximum (sizes are
    unchanged). The other part is the lightest that has such a swap; the pair is the one
    whose difference is closest to half the two parts' gap. A swap must move at least
    `MIN_GAIN` of the mean load, and a row stops once `num_parts` swaps in a row have not
    lowered its maximum by that much: nearly equal items would otherwise trade places for
    nothing (measured: 256 swaps, 16 ms, max/mean unchanged to 5 digits).

    The Python twin of `refine_parts` in plan.c (run instead when `lib` is given): sums run in
    index order (accumulate, not numpy's pairwise sum) and sorts are stable, so both agree."""
    batch, num_parts, k = parts.shape
    if num_parts < 2:
        return parts
    swaps = min(max_swaps, max(1, REFINE_WORK // (k * k * num_parts)))
    if lib is not None:
        return plankernels.refine_parts(lib, costs, parts, swaps, MIN_GAIN)
    parts = parts.copy()
    rows = np.arange(batch)
    loads = np.add.accumulate(costs[rows[:, None, None], parts], axis=2)[..., -1]
    min_gain = MIN_GAIN * (np.add.accumulate(loads, axis=1)[:, -1] / num_parts)  # [batch]
    lowest, stalled = loads.max(axis=1), np.zeros(batch, dtype=np.int64)
    active = np.ones(batch, dtype=bool)
    for _ in range(swaps):
        idx = np.flatnonzero(active)
        if len(idx) == 0:
            break
        lo_ = loads[idx]
        hi = np.argmax(lo_, axis=1)
        own = costs[idx[:, None], parts[idx, hi]]  # [A, k]
        other = costs[idx[:, None, None], parts[idx]]  # [A, P, k]
        gap = lo_[np.arange(len(idx)), hi][:, None] - lo_  # [A, P]
        d = own[:, :, None, None] - other[:, None, :, :]  # [A, k, P, k]
        ok = (d >= min_gain[idx, None, None, None]) & (d < gap[:, None, :, None])
        can = ok.any(axis=(1, 3)) & (gap > 0)
        can[np.arange(len(idx)), hi] = False
        order = np.argsort(lo_, axis=1, kind="stable")
        can_sorted = np.take_along_axis(can, order, axis=1)
        found = can_sorted.any(axis=1)
        active[idx[~found]] = False
        if not found.any():
            break
        f = np.flatnonzero(found)
        b, h = idx[f], hi[f]
        lo = order[f, np.argmax(can_sorted[f], axis=1)]
        dd = d[f, :, lo, :]  # [F, k, k]
        half = gap[f, lo][:, None, None] / 2
        best = np.argmin(
            np.where(ok[f, :, lo, :], np.abs(dd - half), np.inf).reshape(len(f), -1), 1
        )
        i, j = np.divmod(best, k)
        delta = dd[np.arange(len(f)), i, j]
        parts[b, h, i], parts[b, lo, j] = parts[b, lo, j], parts[b, h, i]
        loads[b, h] -= delta
        loads[b, lo] += delta
        top = loads[b].max(axis=1)
        gained = top <= lowest[b] - min_gain[b]
        lowest[b] = np.where(gained, top, lowest[b])
        stalled[b] = np.where(gained, 0, stalled[b] + 1)
        active[b[stalled[b] >= num_parts]] = False
    parts.sort(axis=2)
    return parts


def assign_rows(
    costs: np.ndarray,
    dp_world_size: int,
    num_micro: int,
    micro_batch_size: int,
    method: str,
    seed: int = 0,
    native: bool | None = None,
) -> np.ndarray:
    """Rows to ranks (equal counts, smallest max cost), then each rank's rows to micro-batches:
    [rank, micro_batch, row], rows sorted within each micro-batch. `seed` (used by `random`
    only) must be the same on every rank: the step, say."""
    costs = np.asarray(costs, dtype=np.float64)
    ranks = partition(costs, dp_world_size, num_micro * micro_batch_size, method, seed, native)
    if num_micro == 1:
        out = ranks[:, None, :].copy()
    else:
        micro = partition_many(costs[ranks], num_micro, micro_batch_size, method, seed, native)
        out = np.take_along_axis(ranks[:, None, :], micro.reshape(dp_world_size, 1, -1), axis=2)
        out = out.reshape(dp_world_size, num_micro, micro_batch_size)
    out.sort(axis=2)
    return out


def colocate_whole_rows(assignment: np.ndarray, row_doc: np.ndarray) -> np.ndarray:
    """Gather the rows that are one piece of one long document onto as few ranks as possible.
    Such rows all cost the same (a full row of one document), so handing them out again among
    the places they hold changes no rank's or micro-batch's cost; sorted by document, each
    long document's rows land next to each other, and fewer ranks have to load it.
    `row_doc[i]` is a key of the document filling row i whole, or -1."""
    flat = assignment.reshape(-1).copy()
    slots = np.flatnonzero(row_doc[flat] >= 0)
    if len(slots) < 2:
        return assignment
    rows = flat[slots]
    flat[slots] = rows[np.lexsort((rows, row_doc[rows]))]
    out = flat.reshape(assignment.shape)
    out.sort(axis=2)
    return out
