"""Packing: a step's document pieces into rows of `seq_len` tokens, best fit, with no token
dropped. A document longer than a row, or one that fits no row's free space near the end of a
step, is cut; the planner carries a document cut at the step boundary into the next step. The
loop itself is in `plankernels` (C, with a Python twin)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slipstream.data import plankernels

DocKey = tuple[int, int]  # (source index, document index within the source)
DOC_BITS = 40  # a document as one int64: source << DOC_BITS | doc (sorts like (source, doc))


def doc_keys(source: np.ndarray, doc: np.ndarray) -> np.ndarray:
    """Documents as int64 keys (`DOC_BITS`), for set and sort operations on arrays."""
    return (source.astype(np.int64) << DOC_BITS) | doc


def unpack_keys(keys: np.ndarray) -> list[DocKey]:
    return list(zip((keys >> DOC_BITS).tolist(), (keys & ((1 << DOC_BITS) - 1)).tolist()))


@dataclass(slots=True, frozen=True)
class Piece:
    """Tokens [start, start + length) of document `doc` of source `source`."""

    source: int
    doc: int
    start: int
    length: int


def pack_pieces(
    source: np.ndarray,
    doc: np.ndarray,
    start: np.ndarray,
    length: np.ndarray,
    num_rows: int,
    seq_len: int,
    native: bool | None = None,
) -> tuple[np.ndarray, ...]:
    """Best-fit decreasing of pieces (int64 arrays) into `num_rows` rows of `seq_len`: pieces
    longer than a row are cut into row-sized chunks; a chunk that fits no row's free space is
    split across rows (this only happens near the end, as the step's token count equals the
    rows' capacity). Returns (row, source, doc, start, length) of the parts, sorted by row and
    in the order each row was filled."""
    n = -(-length // seq_len)  # row-sized chunks per piece (none for an empty one)
    piece = np.repeat(np.arange(len(length)), n)
    chunk_off = (np.arange(len(piece)) - np.repeat(np.cumsum(n) - n, n)) * seq_len
    chunk_len = np.minimum(seq_len, length[piece] - chunk_off)
    order = np.argsort(-chunk_len, kind="stable")  # longest first; ties in stream order
    chunk, off, part_len, row = plankernels.pack_best_fit(
        chunk_len[order], num_rows, seq_len, native=native
    )
    by_row = np.argsort(row, kind="stable")
    c = order[chunk[by_row]]
    p = piece[c]
    return row[by_row], source[p], doc[p], start[p] + chunk_off[c] + off[by_row], part_len[by_row]


def pack_best_fit(pieces: list[Piece], num_rows: int, seq_len: int) -> list[list[Piece]]:
    """`pack_pieces` on a list of `Piece`: the rows, each a list of pieces."""
    arrays = [np.array([getattr(p, f) for p in pieces], dtype=np.int64)
              for f in ("source", "doc", "start", "length")]  # fmt: skip
    row, *parts = pack_pieces(*arrays, num_rows, seq_len)
    rows: list[list[Piece]] = [[] for _ in range(num_rows)]
    for r, *fields in zip(row.tolist(), *(x.tolist() for x in parts)):
        rows[r].append(Piece(*fields))
    return rows


def token_runs(plan, mine, lengths: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pieces `mine` of `plan` (a rank's) as runs of consecutive tokens of one document,
    each with the token after it (the label of a cut piece's last token): (document keys, run
    starts, run ends), sorted by document. Pieces that touch or overlap join one run.
    `lengths`: token counts per source and document (runs end at the document's end)."""
    packed = doc_keys(plan.piece_source[mine], plan.piece_doc[mine])
    start = plan.piece_start[mine]
    end = start + plan.piece_length[mine]
    order = np.lexsort((start, packed))
    packed, start, end = packed[order], start[order], end[order]
    # The furthest end so far within each document (a document drawn twice in a step, in
    # two epochs, has overlapping pieces): offset per document so the max restarts.
    new_doc = np.ones(len(packed), dtype=bool)
    new_doc[1:] = packed[1:] != packed[:-1]
    offset = (np.cumsum(new_doc) - 1) * (int(end.max(initial=0)) + 1)
    reach = np.maximum.accumulate(end + offset) - offset
    first = new_doc.copy()
    first[1:] |= start[1:] > reach[:-1]
    last = np.append(first[1:], True)
    packed, lo, hi = packed[first], start[first], reach[last]
    return packed, lo, np.minimum(hi + 1, doc_lengths(packed, lengths))


def doc_lengths(packed: np.ndarray, lengths: list[np.ndarray]) -> np.ndarray:
    """Token counts (int64) of documents given as `doc_keys`, from per-source counts."""
    source, doc = packed >> DOC_BITS, packed & ((1 << DOC_BITS) - 1)
    order = np.argsort(source, kind="stable")  # a slice per source present, not a mask
    present, starts = np.unique(source[order], return_index=True)
    ends = np.append(starts[1:], len(order))[: len(starts)]
    out = np.zeros(len(packed), dtype=np.int64)
    for s, a, b in zip(present.tolist(), starts.tolist(), ends.tolist(), strict=True):
        at = order[a:b]
        out[at] = lengths[s][doc[at]]
    return out
