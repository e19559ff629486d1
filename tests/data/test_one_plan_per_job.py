"""One plan per job: every rank plans from token counts alone and loads only the documents of
its own rows, so the job's loading does not grow with its ranks; the token-count cache is
built once and rebuilt when a shard changes."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest

from slipstream.data import MixtureLoader, MixtureSpec, Planner
from slipstream.data.backends.base import TokenSpan, TokenSpans
from slipstream.data.packing import unpack_keys
from slipstream.data.sources.loader import build_source_loaders
from tests.conftest import CACHE, corpus_spec

RANKS = 4


def _spec(tmp_path, **kw) -> MixtureSpec:
    raw = corpus_spec(tmp_path, "jsonl", **{"seq_len": 512, "micro_batch_size": 4, **kw})
    raw["backend"] = {"kind": "inline", "prefetch_steps": 1}
    return MixtureSpec.from_dict(raw, base_dir=str(tmp_path))


def _docs_per_rank(spec: MixtureSpec, lengths, num_steps: int) -> list[list[set]]:
    """[step][rank] -> documents in that rank's rows, from a fresh planner."""
    planner = Planner(spec, lengths, dp_world_size=RANKS)
    out = []
    for _ in range(num_steps):
        plan = planner.plan_step()
        out.append(
            [
                {(p.source, p.doc) for mb in plan.assignment[r] for i in mb for p in plan.rows[i]}
                for r in range(RANKS)
            ]
        )
    return out


def _run(spec: MixtureSpec, steps: int, **kw) -> list[MixtureLoader]:
    loaders = [MixtureLoader(spec, r, RANKS, **kw) for r in range(RANKS)]
    for ldr in loaders:
        for _ in range(steps):
            next(ldr)
        ldr._halt()  # the planner may have run ahead: its count says how far
    return loaders


def test_four_ranks_load_each_document_of_a_step_about_once(tmp_path):
    spec = _spec(tmp_path)
    loaders = _run(spec, 6)
    before = _run(spec, 6, load_all_rows=True)
    lengths = loaders[0].planner.lengths
    planned = max(ldr.planner.step for ldr in loaders + before)  # read-ahead differs by run
    per_step = _docs_per_rank(spec, lengths, planned)
    for r, ldr in enumerate(loaders):  # each rank loaded exactly its rows' documents
        expected = sum(len(per_step[k][r]) for k in range(ldr.planner.step))
        assert sum(ldr.backend.num_loaded) == expected
    loaded = sum(len(per_step[k][r]) for k in range(6) for r in range(RANKS))
    distinct = sum(len(set().union(*per_step[k])) for k in range(6))
    # A document is loaded by each rank holding a piece of it. Only documents longer than a
    # row span ranks (their whole rows are gathered on as few ranks as the balance allows):
    # this corpus's documents are long for 512-byte rows (median 1,193 bytes in one source),
    # and the job loads each 1.49x; every rank loading the whole step loads each 4x.
    assert distinct <= loaded <= 1.6 * distinct
    job_before = sum(
        len(set().union(*per_step[k])) for ldr in before for k in range(ldr.planner.step)
    )
    assert sum(sum(ldr.backend.num_loaded) for ldr in before) == job_before
    assert job_before >= 2.4 * sum(sum(ldr.backend.num_loaded) for ldr in loaders)


def test_stream_is_the_same_whatever_the_ranks_load(tmp_path):
    spec = _spec(tmp_path)
    a = MixtureLoader(spec, 1, RANKS)
    b = MixtureLoader(spec, 1, RANKS, load_all_rows=True)
    for _ in range(5):
        x, y = next(a), next(b)
        assert x.stream == y.stream
        for ma, mb in zip(x.micro_batches, y.micro_batches, strict=True):
            assert all(np.array_equal(ma[k], mb[k]) for k in ma)
    a.close()
    b.close()


def test_token_counts_are_cached_and_follow_the_shard(tmp_path):
    spec = _spec(tmp_path)
    first = [ldr.lengths() for ldr in build_source_loaders(spec)]
    caches = sorted(p.name for p in (CACHE / "index").glob("*.sliplen.*.npz"))
    assert caches, "the token counts were not cached"
    assert not list(tmp_path.rglob("*.sliplen.*")), "a cache was written beside the data"
    loaders = build_source_loaders(spec)
    for ldr, lens in zip(loaders, first, strict=True):
        assert np.array_equal(ldr.lengths(), lens)
        assert lens.tolist() == [len(t) for t in ldr.get_many(np.arange(ldr.num_docs))]
    # Another tokenizer keys another cache; a changed shard is counted again.
    byte = replace(spec, tokenizer="byte")
    assert [ldr.lengths() for ldr in build_source_loaders(byte)][0].tolist() == [
        len(t) for t in build_source_loaders(byte)[0].get_many(np.arange(first[0].size))
    ]
    shard = loaders[0].shards[0].path
    with open(shard, "a") as f:
        f.write('{"text": "one more document with some words in it"}\n')
    os.utime(shard, ns=(1, 1))
    grown = build_source_loaders(spec)[0]
    assert grown.num_docs == loaders[0].num_docs + 1
    assert len(grown.lengths()) == grown.num_docs


def test_documents_several_ranks_need_are_tokenized_once_per_machine(tmp_path, monkeypatch):
    from slipstream.data.sources.shared import SharedDocs

    store = tmp_path / "shared"
    monkeypatch.setenv("SLIPSTREAM_SHARED_DOCS", str(store))
    inline = _spec(tmp_path)
    local = replace(inline, backend=replace(inline.backend, kind="local", pool="thread"))
    made_before = SharedDocs.made
    ranks = [MixtureLoader(local, r, RANKS) for r in range(RANKS)]
    refs = [MixtureLoader(inline, r, RANKS) for r in range(RANKS)]
    for ldr, ref in zip(ranks, refs, strict=True):
        for _ in range(6):  # the same batches as loading every document in each rank
            x, y = next(ldr), next(ref)
            for ma, mb in zip(x.micro_batches, y.micro_batches, strict=True):
                assert all(np.array_equal(ma[k], mb[k]) for k in ma)
        ldr._halt()
        ref.close()
    made = SharedDocs.made - made_before
    published = len(list(store.glob("*.i32")))
    # Shared documents, per rank and step, from the plan: each rank would tokenize its own.
    per_step = _docs_per_rank(local, ranks[0].planner.lengths, max(x.planner.step for x in ranks))
    shared = [
        {d for d in step[r] if any(d in step[o] for o in range(RANKS) if o != r)}
        for step in per_step
        for r in range(RANKS)
    ]
    # ... and documents cut at a step boundary, whose other part another rank may build.
    planner = Planner(local, ranks[0].planner.lengths, dp_world_size=RANKS)
    cut = set()
    for _ in per_step:
        cut |= set(unpack_keys(planner.plan_step().partial))
    assert 0 < made == published <= len(set().union(*shared) | cut)  # once each, here
    assert made < sum(len(s) for s in shared)  # where every rank tokenized its own copy
    for ldr in ranks:
        ldr.close()


def test_shared_store_makes_each_document_once_and_sweeps_old_ones(tmp_path):
    import threading

    from slipstream.data.sources.shared import SharedDocs

    store, calls = SharedDocs(tmp_path / "s"), []

    def make():
        calls.append(1)
        return np.arange(5, dtype=np.int32)

    got = []
    threads = [threading.Thread(target=lambda: got.append(store.get("k", make))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and all(np.array_equal(g, np.arange(5)) for g in got)
    old = tmp_path / "s" / "k.i32"
    os.utime(old, (1, 1))  # long ago
    assert store.sweep() >= 1 and not old.exists()
    assert np.array_equal(store.get("k", make), np.arange(5)) and len(calls) == 2  # made again


def test_token_spans_index_like_the_whole_document():
    """What a rank holds of a document it shares: runs of it, sliced with the document's own
    offsets (and clipped at its end, as numpy does); a slice outside them is an error."""
    doc = np.arange(100, dtype=np.int32)
    runs = TokenSpans([TokenSpan(10, 100, doc[10:41]), TokenSpan(60, 100, doc[60:100])])
    assert len(runs) == 100
    assert runs[10:40].tolist() == doc[10:40].tolist()
    assert runs[61:70].tolist() == doc[61:70].tolist()
    assert runs[95:120].tolist() == doc[95:100].tolist()  # the label slice past the end
    assert runs[41:41].tolist() == []
    with pytest.raises(IndexError, match=r"tokens \[40, 60\) of a document of 100: only"):
        runs[40:60]


@pytest.mark.parametrize(
    ("configured", "layout", "want"),
    [
        (0, {"world_size": 8}, 1),  # one process per node (not under torchrun): alone
        (0, {"world_size": 16, "local_world_size": 8}, 8),  # data parallel only
        (0, {"world_size": 16, "local_world_size": 8, "tp_size": 2}, 4),  # tensor parallel 2
        (0, {"world_size": 16, "local_world_size": 8, "tp_size": 16}, 1),  # a replica spans nodes
        (0, {"world_size": 12, "local_world_size": 4, "tp_size": 3}, 1),  # no whole ranks per dp
        (3, {"world_size": 8}, 3),
        (16, {"world_size": 8}, 8),
    ],
)
def test_machine_group_size(configured, layout, want):
    from slipstream.data.backends.machine_group import group_size
    from slipstream.topology import Topology

    assert group_size(configured, Topology(**layout)) == want


def test_a_document_whose_token_count_changed_under_the_job_is_a_clear_error(tmp_path):
    spec = _spec(tmp_path)
    ldr = MixtureLoader(spec, 0, 1)
    first = Planner(spec, ldr.planner.lengths).plan_step()
    s, d = int(first.piece_source[0]), int(first.piece_doc[0])
    ldr.planner.lengths[s][d] += 1  # as if its file had changed since the cache was built
    with pytest.raises(RuntimeError, match=r"token-count cache says .* the loader gave"):
        next(ldr)
    ldr.close()
