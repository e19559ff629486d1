"""Cost model and equal-size partitioning of rows across ranks (and micro-batches).

Every part receives exactly `part_size` rows (tensor shapes are fixed per rank); the aim is to
make the largest part's cost as small as possible, since the slowest rank sets the step time.
Knows nothing of documents' content or of ranks beyond their count.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np


def row_cost(doc_lens: Sequence[int], linear_cost: float, attention_cost: float) -> float:
    """a * tokens + b * sum(len^2): attention runs per document under document masking."""
    lens = np.asarray(doc_lens, dtype=np.float64)
    return float(linear_cost * lens.sum() + attention_cost * (lens * lens).sum())


def imbalance(costs: np.ndarray, parts: list[list[int]]) -> float:
    """max / mean of the parts' total cost (1.0 is perfect balance)."""
    loads = np.array([costs[p].sum() for p in parts])
    mean = loads.mean()
    return float(loads.max() / mean) if mean > 0 else 1.0


def partition(
    costs: np.ndarray, num_parts: int, part_size: int, method: str, seed: int = 0
) -> list[list[int]]:
    """Split indices 0..len(costs)-1 into `num_parts` parts of exactly `part_size` each.

    `none` keeps the order (contiguous blocks); `random` deals a seeded shuffle (what a user
    gets without balancing, since packing order says nothing about cost); `greedy` and `kk`
    minimize the largest part's cost."""
    costs = np.asarray(costs, dtype=np.float64)
    if len(costs) != num_parts * part_size:
        raise ValueError(f"partition: {len(costs)} items != {num_parts} parts x {part_size}")
    if num_parts == 1 and method in ("none", "kk"):  # what both give one part, at no cost
        return [list(range(len(costs)))]
    if method in ("none", "random"):
        order = np.arange(len(costs))
        if method == "random":
            order = np.random.default_rng(seed).permutation(len(costs))
        return [order[p * part_size : (p + 1) * part_size].tolist() for p in range(num_parts)]
    if method == "greedy":
        return _refine(costs, _greedy(costs, num_parts, part_size))
    if method == "kk":
        return _refine(costs, _karmarkar_karp(costs, num_parts, part_size))
    raise ValueError(f"balance.method: unknown {method!r}; use none, random, greedy or kk")


def _greedy(costs: np.ndarray, num_parts: int, part_size: int) -> list[list[int]]:
    """Longest processing time first: each item, largest first, goes to the lightest part that
    still has room."""
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    heap = [(0.0, p) for p in range(num_parts)]  # (load, part); full parts leave the heap
    order = np.argsort(-costs, kind="stable")
    for i in order:
        load, p = heapq.heappop(heap)
        parts[p].append(int(i))
        if len(parts[p]) < part_size:
            heapq.heappush(heap, (load + costs[i], p))
    return parts


def _karmarkar_karp(costs: np.ndarray, num_parts: int, part_size: int) -> list[list[int]]:
    """Largest differencing method, k-way with equal sizes.

    Items (largest first) are cut into chunks of `num_parts`; each chunk is a partial solution
    with one item per part. Repeatedly the two partial solutions with the largest spread are
    merged, pairing the heaviest part of one with the lightest of the other, which cancels
    their differences. Each part takes one item per chunk, so sizes stay equal.
    """
    order = np.argsort(-costs, kind="stable")
    heap: list[tuple[float, int, list[tuple[float, list[int]]]]] = []
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


def _refine(costs: np.ndarray, parts: list[list[int]], max_swaps: int = 256) -> list[list[int]]:
    """Local search: swap one item of the heaviest part with a lighter item of another part
    while that lowers both below the current maximum (sizes are unchanged). Each swap picks
    the pair whose difference is closest to half the two parts' gap."""
    if len(parts) < 2:
        return parts
    parts = [list(p) for p in parts]
    loads = np.array([costs[p].sum() for p in parts])
    for _ in range(max_swaps):
        hi = int(np.argmax(loads))
        a = costs[parts[hi]]
        for lo in np.argsort(loads):
            gap = loads[hi] - loads[lo]
            if lo == hi or gap <= 0:
                continue
            d = a[:, None] - costs[parts[lo]][None, :]
            ok = (d > 0) & (d < gap)
            if ok.any():
                i, j = np.unravel_index(
                    np.argmin(np.where(ok, np.abs(d - gap / 2), np.inf)), d.shape
                )
                parts[hi][i], parts[lo][j] = parts[lo][j], parts[hi][i]
                loads[hi] -= d[i, j]
                loads[lo] += d[i, j]
                break
        else:
            break  # no swap lowers the maximum
    return parts


def assign_rows(
    costs: np.ndarray,
    dp_world_size: int,
    num_micro: int,
    micro_batch_size: int,
    method: str,
    seed: int = 0,
) -> list[list[list[int]]]:
    """Rows to ranks (equal counts, smallest max cost), then each rank's rows to micro-batches.
    `seed` (used by `random` only) must be the same on every rank: the step, say."""
    out = []
    for rank_rows in partition(costs, dp_world_size, num_micro * micro_batch_size, method, seed):
        rank_rows = np.asarray(rank_rows)
        micro = partition(costs[rank_rows], num_micro, micro_batch_size, method, seed)
        out.append([sorted(int(rank_rows[j]) for j in m) for m in micro])
    return out


def colocate_whole_rows(
    assignment: list[list[list[int]]], row_docs: list[tuple | None]
) -> list[list[list[int]]]:
    """Gather the rows that are one piece of one long document onto as few ranks as possible.
    Such rows all cost the same (a full row of one document), so handing them out again among
    the places they hold changes no rank's or micro-batch's cost; sorted by document, each
    long document's rows land next to each other, and fewer ranks have to load it.
    `row_docs[i]` is the document filling row i whole, or None."""
    slots = [(r, m, j) for r, mbs in enumerate(assignment) for m, mb in enumerate(mbs)
             for j, i in enumerate(mb) if row_docs[i] is not None]  # fmt: skip
    if len(slots) < 2:
        return assignment
    rows = sorted((assignment[r][m][j] for r, m, j in slots), key=lambda i: (row_docs[i], i))
    out = [[list(mb) for mb in mbs] for mbs in assignment]
    for (r, m, j), i in zip(slots, rows, strict=True):
        out[r][m][j] = i
    return [[sorted(mb) for mb in mbs] for mbs in out]
