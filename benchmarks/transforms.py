"""Per-document preprocessing used as a source's `transform` in benchmarks: a MinHash signature
over character 5-grams, the near-duplicate screen data pipelines run per document. Pure Python,
so its cost grows with the document, like real cleanup code."""

from __future__ import annotations

import zlib

NUM_PERM = 1024
SHINGLE = 5
SEEDS = [(0x9E3779B1 * (i + 1)) & 0xFFFFFFFF for i in range(NUM_PERM)]


def minhash_screen(text: str) -> str:
    """Computes the document's MinHash signature and returns the text unchanged (a screen that
    keeps everything: its cost is the point, not its verdict)."""
    data = text.encode()
    shingles = {zlib.crc32(data[i : i + SHINGLE]) for i in range(len(data) - SHINGLE + 1)}
    signature = [min((h ^ s) for h in shingles) if shingles else 0 for s in SEEDS]
    return text if len(signature) == NUM_PERM else ""
