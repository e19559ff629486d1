"""The data plane's resume contract, as one helper applied to every format and pool kind.

`check_resume` runs a reference without stopping, then the same run stopped after `split`
steps and resumed from `state_dict()` in new loaders (optionally under a changed spec), and
checks what a user relies on: identical batches when nothing changed, and in every case no
document lost or repeated and the same per-source order.
"""

from __future__ import annotations

import numpy as np

from slipstream.data import MixtureLoader, MixtureSpec, build_source_loaders
from tests.conftest import WORLD_SIZE

KEYS = ("input_ids", "labels", "position_ids", "doc_ids", "source_ids", "cu_seqlens")


def run_steps(
    spec: MixtureSpec, num_steps: int, state: dict | None = None, world_size: int = WORLD_SIZE
):
    """Every rank's batches for `num_steps` steps, and the loaders' state afterwards."""
    loaders = [MixtureLoader(spec, r, world_size) for r in range(world_size)]
    try:
        if state is not None:
            for ldr in loaders:
                ldr.load_state_dict(state)
        steps = [[next(ldr) for ldr in loaders] for _ in range(num_steps)]
        states = [ldr.state_dict() for ldr in loaders]
        assert all(s == states[0] for s in states), "ranks disagree on the data state"
        return steps, states[0]
    finally:
        for ldr in loaders:
            ldr.close()


def arrays(step) -> list[np.ndarray]:
    return [mb[k].numpy() for rank in step for mb in rank.micro_batches for k in KEYS]


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for i, (sa, sb) in enumerate(zip(a, b, strict=True)):
        for x, y in zip(arrays(sa), arrays(sb), strict=True):
            assert np.array_equal(x, y), f"step {i} differs"


def merged_stream(steps) -> list[tuple[int, int]]:
    """Documents in stream order; a document carried across a step boundary counts once."""
    out: list[tuple[int, int]] = []
    for s in steps:
        stream = list(s[0].stream)
        if out and stream and stream[0] == out[-1]:
            stream = stream[1:]
        out.extend(stream)
    return out


def per_source(stream, names) -> dict[str, list[int]]:
    return {n: [d for s, d in stream if names[s] == n] for n in names}


def check_resume(
    spec: MixtureSpec,
    split: int,
    total: int,
    after: MixtureSpec | None = None,
    after_world_size: int = WORLD_SIZE,
):
    """Resume after `split` of `total` steps, optionally under another spec or world size."""
    ref, _ = run_steps(spec, total)
    first, state = run_steps(spec, split)
    second, _ = run_steps(after or spec, total - split, state, after_world_size)
    assert_same_batches(first, ref[:split])
    if after is None and after_world_size == WORLD_SIZE:
        assert_same_batches(second, ref[split:])
    # Every source's documents come in the same order as without stopping: nothing skipped,
    # nothing repeated, whatever changed in between.
    ref_names = [s.name for s in spec.sources]
    new_names = [s.name for s in (after or spec).sources]
    got = per_source(merged_stream(first), ref_names)
    for n, docs in per_source(merged_stream(second), new_names).items():
        got.setdefault(n, []).extend(docs[1:] if got.get(n) and docs[:1] == got[n][-1:] else docs)
    want = per_source(merged_stream(ref), ref_names)
    for n in ref_names:
        k = min(len(got[n]), len(want[n]))
        assert got[n][:k] == want[n][:k], f"source {n}: order differs after resume"
    assert_tokens_conserved(spec, first + second)
    return ref, first, second


def assert_tokens_conserved(spec: MixtureSpec, steps) -> None:
    """Every token of every document in the stream is delivered once: the tokens handed out
    add up to the documents' lengths, all but the last of which must be complete."""
    loaders = build_source_loaders(spec)
    stream = merged_stream(steps)
    lens = [len(loaders[s].get_many([d])[0]) for s, d in stream]
    delivered = sum(st[0].stats.num_tokens for st in steps)
    nonpad = sum(
        int((mb["doc_ids"] >= 0).sum()) for st in steps for r in st for mb in r.micro_batches
    )
    assert nonpad == delivered, "ranks' batches do not add up to the planned tokens"
    assert sum(lens[:-1]) < delivered <= sum(lens), "tokens lost or repeated"
