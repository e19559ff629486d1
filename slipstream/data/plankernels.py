"""The planner's sequential loops in C (`kernels/plan.c`): drawing, best-fit packing, and
balancing's largest differencing and swap refinement, with Python twins (here and in
`balance.py`) that give the same results bit for bit. The C build is used when a compiler
is there (`native=None`); `native=False` forces the Python twin (tests compare the two). A job
whose machines differ in this respect still computes one plan: the results do not depend on
which one ran.
"""

from __future__ import annotations

import bisect
import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slipstream import native as _native

SOURCE = Path(__file__).with_name("kernels") / "plan.c"
# Portable and exact: no -march (every machine of a job builds the same arithmetic), no
# fused multiply-add, no fast-math.
FLAGS = ["-O2", "-ffp-contract=off", "-shared", "-fPIC"]


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.draw_docs.argtypes = [p, p, p, i64, p, p, p, i32, i32, i64, i64, p, p, p]
    lib.draw_docs.restype = i64
    lib.pack_best_fit.argtypes = [p, i64, i64, i64, p, p, p, p]
    lib.pack_best_fit.restype = i64
    lib.kk_partition.argtypes = [p, i64, i64, i64, p]
    lib.kk_partition.restype = i64
    lib.refine_parts.argtypes = [p, i64, i64, i64, i64, p, i64, ctypes.c_double]
    lib.refine_parts.restype = i64


def library(native: bool | None = None) -> ctypes.CDLL | None:
    """The compiled kernels, or None (no compiler, `SLIPSTREAM_NATIVE=0`, or `native=False`)."""
    if native is False:
        return None
    lib = _native.load(SOURCE, FLAGS, _declare)
    if lib is None and native:
        raise RuntimeError(f"the planner's C kernels ({SOURCE}) could not be built")
    return lib


def build(verbose: bool = False) -> Path | None:
    return _native.build(SOURCE, FLAGS, verbose)


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


@dataclass(slots=True)
class Lookahead:
    """The next documents of each source, flat: source s owns [off[s], off[s + 1]) of `length`
    and `doc`; `pos[s]` of them are used."""

    length: np.ndarray  # int64
    doc: np.ndarray  # int64
    off: np.ndarray  # int64, n + 1
    pos: np.ndarray  # int64, n


def draw_docs(
    credits: np.ndarray,
    weights: np.ndarray,
    open_: np.ndarray,
    ahead: Lookahead,
    *,
    by_tokens: bool,
    packing: bool,
    seq_len: int,
    budget: int,
    used: int,
    native: bool | None = None,
) -> tuple[np.ndarray, int, int | None]:
    """Draw until `budget` units are used (tokens when packing, else rows) or an open
    source's lookahead runs out. Updates `credits` and `ahead.pos` in place. Returns (indices
    into the lookahead of the draws made, units used, the source that ran out or None)."""
    lib = library(native)
    out = np.empty(len(ahead.doc), dtype=np.int64)  # each draw takes one lookahead entry
    if lib is not None:
        used_c, short = ctypes.c_int64(used), ctypes.c_int64(-1)
        open_u8 = np.ascontiguousarray(open_, dtype=np.uint8)
        made = lib.draw_docs(
            _ptr(credits), _ptr(weights), _ptr(open_u8), len(credits),
            _ptr(ahead.length), _ptr(ahead.off), _ptr(ahead.pos),
            int(by_tokens), int(packing), seq_len, budget,
            _ptr(out), ctypes.byref(used_c), ctypes.byref(short),
        )  # fmt: skip
        if made < 0:
            raise MemoryError("draw_docs: out of memory")
        return out[:made], used_c.value, None if short.value < 0 else short.value
    return _draw_py(credits, weights, open_, ahead, by_tokens, packing, seq_len, budget, used,
                    out)  # fmt: skip


def _draw_py(credits, weights, open_, ahead, by_tokens, packing, seq_len, budget, used, out):
    """The Python twin of `draw_docs` in plan.c: the same float64 operations in the same order."""
    closed = np.where(open_, 0.0, -np.inf)
    size = ahead.off[1:] - ahead.off[:-1]
    dry = np.flatnonzero(open_ & (ahead.pos == size))
    short = int(dry[-1]) if len(dry) else None
    made = 0
    while used < budget and short is None:
        if not by_tokens:
            credits += weights
        s = int(np.argmax(credits + closed))
        flat = int(ahead.off[s] + ahead.pos[s])
        ahead.pos[s] += 1
        if ahead.pos[s] == size[s]:
            short = s
        length = int(ahead.length[flat])
        if by_tokens:
            amount = float(length)
            credits += weights * amount
        credits[s] -= amount if by_tokens else 1.0
        out[made] = flat
        made += 1
        used += length if packing else max(1, -(-length // seq_len))
    return out[:made], used, short


def pack_best_fit(
    chunk_len: np.ndarray, num_rows: int, seq_len: int, native: bool | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Best fit of chunks (each at most `seq_len`, longest first) into `num_rows` rows; see
    plan.c. Returns the parts placed: (chunk, offset in the chunk, length, row)."""
    chunk_len = np.ascontiguousarray(chunk_len, dtype=np.int64)
    n = len(chunk_len)
    cap = n + num_rows  # each placement that splits a chunk fills a row: at most one per row
    outs = [np.empty(cap, dtype=np.int64) for _ in range(4)]
    lib = library(native)
    if lib is not None:
        made = lib.pack_best_fit(_ptr(chunk_len), n, num_rows, seq_len, *map(_ptr, outs))
        if made == -2:
            raise MemoryError("pack_best_fit: out of memory")
    else:
        made = _pack_py(chunk_len.tolist(), num_rows, seq_len, outs)
    if made < 0:
        raise AssertionError("pack_best_fit: more tokens than rows can hold")
    chunk, off, length, row = (o[:made] for o in outs)
    return chunk, off, length, row


def _pack_py(chunk_len: list[int], num_rows: int, seq_len: int, outs) -> int:
    """The Python twin of `pack_best_fit` in plan.c: a stack of rows per free-space value."""
    part_chunk, part_off, part_len, part_row = outs
    stacks: dict[int, list[int]] = {seq_len: list(range(num_rows - 1, -1, -1))} if num_rows else {}
    rooms = sorted(stacks)  # free-space values some row has
    parts = 0
    for c, left in enumerate(chunk_len):
        off = 0
        while left > 0:
            if not rooms:
                return -1
            i = bisect.bisect_left(rooms, left)
            if i == len(rooms):
                i -= 1  # fits nowhere whole: the row with the most free space
            v = rooms[i]
            stack = stacks[v]
            r = stack.pop()
            if not stack:
                del stacks[v], rooms[i]
            take = min(v, left)
            part_chunk[parts], part_off[parts], part_len[parts], part_row[parts] = c, off, take, r
            parts += 1
            room = v - take
            if room > 0:
                if room in stacks:
                    stacks[room].append(r)
                else:
                    stacks[room] = [r]
                    bisect.insort(rooms, room)
            left -= take
            off += take
    return parts


def kk_partition(lib: ctypes.CDLL, costs: np.ndarray, num_parts: int, part_size: int) -> np.ndarray:
    """`balance._karmarkar_karp` in C: [batch, num_parts, part_size]."""
    costs = np.ascontiguousarray(costs, dtype=np.float64)
    out = np.empty((len(costs), num_parts, part_size), dtype=np.int64)
    if lib.kk_partition(_ptr(costs), len(costs), num_parts, part_size, _ptr(out)) < 0:
        raise MemoryError("kk_partition: out of memory")
    return out


def refine_parts(
    lib: ctypes.CDLL, costs: np.ndarray, parts: np.ndarray, swaps: int, min_gain_frac: float
) -> np.ndarray:
    """`balance._refine` in C: a refined copy of `parts` [batch, num_parts, part_size]."""
    costs = np.ascontiguousarray(costs, dtype=np.float64)
    out = np.array(parts, dtype=np.int64, order="C")  # a copy: refined in place
    batch, num_parts, k = out.shape
    rc = lib.refine_parts(
        _ptr(costs), batch, costs.shape[1], num_parts, k, _ptr(out), swaps, min_gain_frac
    )
    if rc < 0:
        raise MemoryError("refine_parts: out of memory")
    return out
