"""Packing: a step's document pieces into rows of `seq_len` tokens, best fit, with no token
dropped. A document longer than a row, or one that fits no row's free space near the end of a
step, is cut; the planner carries a document cut at the step boundary into the next step."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

DocKey = tuple[int, int]  # (source index, document index within the source)


@dataclass(slots=True, frozen=True)
class Piece:
    """Tokens [start, start + length) of document `doc` of source `source`."""

    source: int
    doc: int
    start: int
    length: int


def pack_best_fit(pieces: list[Piece], num_rows: int, seq_len: int) -> list[list[Piece]]:
    """Best-fit decreasing into `num_rows` rows of `seq_len`: pieces longer than a row are cut
    into row-sized chunks; a piece that fits no row's free space is split across rows (this
    only happens near the end, as the step's token count equals the rows' capacity)."""
    chunks = [
        Piece(p.source, p.doc, p.start + o, min(seq_len, p.length - o))
        for p in pieces
        for o in range(0, p.length, seq_len)
    ]
    chunks.sort(key=lambda p: -p.length)
    free = [(seq_len, r) for r in range(num_rows)]  # sorted (free tokens, row); full rows leave
    rows: list[list[Piece]] = [[] for _ in range(num_rows)]
    for p in chunks:
        while p.length > 0:
            if not free:
                raise AssertionError("pack_best_fit: more tokens than rows can hold")
            i = bisect.bisect_left(free, (p.length, -1))  # the tightest row it fits in
            if i == len(free):  # fits nowhere whole: fill the emptiest row, carry on
                i = len(free) - 1
            room, r = free.pop(i)
            take = min(room, p.length)
            rows[r].append(Piece(p.source, p.doc, p.start, take))
            if room > take:
                bisect.insort(free, (room - take, r))
            p = Piece(p.source, p.doc, p.start + take, p.length - take)
    return rows
