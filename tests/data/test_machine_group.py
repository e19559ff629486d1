"""A machine's ranks on the local backend fetch each step once, together (`backends/machine_group.py`):
the steps are dealt round the ranks, each step is loaded by one of them for all, a document
cut at a step boundary is tokenized once though two ranks build its two steps, and the
batches are those of every rank loading alone."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from slipstream.data import MixtureLoader, MixtureSpec, Planner
from slipstream.data.backends import LocalBackend
from slipstream.data.backends.machine_group import GroupFetch
from slipstream.data.packing import doc_keys, doc_lengths, unpack_keys
from slipstream.data.sources.loader import SourceLoader, build_source_loaders
from tests.conftest import corpus_spec
from tests.data.contract import assert_same_batches, run_steps

RANKS = 4


def _spec(tmp_path, **backend) -> MixtureSpec:
    raw = corpus_spec(tmp_path, "parquet", seq_len=256, micro_batch_size=2)
    raw["backend"] = {"kind": "local", "pool": "thread", "prefetch_steps": 2, **backend}
    return MixtureSpec.from_dict(raw, base_dir=str(tmp_path))


@pytest.fixture
def tokenized(monkeypatch):
    """Every document a source loader tokenizes in this process, counted."""
    counts: Counter = Counter()
    lock, get_many = threading.Lock(), SourceLoader.get_many

    def counting(self, ids):
        with lock:
            counts.update((self.name, int(d)) for d in ids)
        return get_many(self, ids)

    monkeypatch.setattr(SourceLoader, "get_many", counting)
    return counts


def test_doc_lengths_reads_each_keys_count():
    rng = np.random.default_rng(0)
    lengths = [rng.integers(1, 100, 50) for _ in range(7)]
    source, doc = rng.integers(0, 7, 1000), rng.integers(0, 50, 1000)
    got = doc_lengths(doc_keys(source, doc), lengths)
    assert got.tolist() == [int(lengths[s][d]) for s, d in zip(source, doc, strict=True)]
    assert len(doc_lengths(doc_keys(source[:0], doc[:0]), lengths)) == 0


def test_a_plan_names_the_documents_it_holds_only_part_of(tmp_path):
    """`plan.partial`: the document carried in from the step before and the one carried into
    the next; every document a step holds only part of is among them."""
    spec = _spec(tmp_path)
    lengths = [ldr.lengths() for ldr in build_source_loaders(spec)]
    planner = Planner(spec, lengths, dp_world_size=RANKS)
    plans = [planner.plan_step() for _ in range(8)]
    for before, plan in zip(plans, plans[1:]):
        covered: dict = {}
        for s, d, a, n in zip(plan.piece_source.tolist(), plan.piece_doc.tolist(),
                              plan.piece_start.tolist(), plan.piece_length.tolist()):  # fmt: skip
            covered.setdefault((s, d), set()).update(range(a, a + n))
        cut = {k for k, c in covered.items() if c != set(range(lengths[k[0]][k[1]]))}
        partial = set(unpack_keys(plan.partial))
        assert cut <= partial and len(partial) <= 2
        first = (int(plan.stream_source[0]), int(plan.stream_doc[0]))
        carried_in = first in set(unpack_keys(before.partial))
        assert carried_in == (
            plan.piece_start[(plan.piece_source == first[0]) & (plan.piece_doc == first[1])].min()
            > 0
        )
        if carried_in:
            assert first in partial
    assert sum(len(p.partial) for p in plans) > 0  # the long documents are cut


def test_steps_are_dealt_round_the_group_and_made_once_for_all(tmp_path, monkeypatch, tokenized):
    """4 ranks, each with its own backend (its own loader threads), take 8 steps: rank r makes
    steps r and r + 4 for all four; each rank gets exactly the tokens of its rows; every
    document is tokenized once per step that holds it whole, and a document cut at a step
    boundary once in all (the two makers share it through the store)."""
    monkeypatch.setenv("SLIPSTREAM_SHARED_DOCS", str(tmp_path / "store"))
    spec = _spec(tmp_path)
    backends = [LocalBackend(spec) for _ in range(RANKS)]
    lengths = backends[0].lengths()
    ranks = list(range(RANKS))
    groups = [GroupFetch(b, lengths, ranks, r, "t", deal=True)
              for r, b in enumerate(backends)]  # fmt: skip
    truth = [ldr.get_many(np.arange(ldr.num_docs)) for ldr in build_source_loaders(spec)]
    tokenized.clear()
    planner = Planner(spec, lengths, dp_world_size=RANKS)
    plans = [planner.plan_step() for _ in range(8)]
    for plan in plans:
        steps = [g.submit(plan) for g in groups]
        for r, (g, step) in enumerate(zip(groups, steps, strict=True)):
            got = g.collect(step)
            mine = plan.pieces_of(plan.rank_rows(r))
            for s, d, a, n in zip(plan.piece_source[mine].tolist(), plan.piece_doc[mine].tolist(),
                                  plan.piece_start[mine].tolist(),
                                  plan.piece_length[mine].tolist()):  # fmt: skip
                assert np.array_equal(got[(s, d)][a : a + n + 1], truth[s][d][a : a + n + 1])
    assert [sorted(g.recent_made) for g in groups] == [[r, r + RANKS] for r in ranks]
    whole, seen_partial = 0, set()
    for plan in plans:
        cut = set(plan.partial.tolist())
        held = set(doc_keys(plan.piece_source, plan.piece_doc).tolist())
        whole += len(held - cut)
        seen_partial |= cut
    assert sum(tokenized.values()) == whole + len(seen_partial)
    for g, b in zip(groups, backends, strict=True):
        g.close()
        b.close()
    assert not list((tmp_path / "store").glob("step-*"))  # every file read, every lock gone


def test_a_machine_group_gives_the_batches_of_ranks_alone(tmp_path, monkeypatch):
    """The loaders of 4 ranks, at once (each plans 4 x prefetch ahead), with the group and
    without: the same batches and state; each step was made by exactly one rank."""
    monkeypatch.setenv("SLIPSTREAM_SHARED_DOCS", str(tmp_path / "store"))
    alone = _spec(tmp_path, machine_ranks=1)
    together = _spec(tmp_path, machine_ranks=RANKS)
    ref, ref_state = run_steps(alone, 6, world_size=RANKS)
    loaders = [MixtureLoader(together, r, RANKS) for r in range(RANKS)]
    assert all(ldr._window == 2 * RANKS for ldr in loaders)
    got = [[next(ldr) for ldr in loaders] for _ in range(6)]
    assert_same_batches(ref, got)
    assert loaders[0].state_dict() == ref_state
    for ldr in loaders:
        ldr._halt()
    made = [s for ldr in loaders for s in ldr._group.recent_made]
    assert len(made) == len(set(made)) and set(range(6)) <= set(made)
    for ldr in loaders:
        ldr.close()
    assert not list((tmp_path / "store").glob("step-*"))


def test_a_rank_alone_makes_the_steps_nobody_started(tmp_path, monkeypatch):
    """Rank 1 of 2 runs without rank 0 (not started yet, or gone): it makes rank 0's steps
    too, when it needs them, and its batches are the same."""
    monkeypatch.setenv("SLIPSTREAM_SHARED_DOCS", str(tmp_path / "store"))
    ref, _ = run_steps(_spec(tmp_path, machine_ranks=1), 4, world_size=2)
    ldr = MixtureLoader(_spec(tmp_path, machine_ranks=2), 1, 2)
    got = [next(ldr) for _ in range(4)]
    assert_same_batches([[step[1]] for step in ref], [[b] for b in got])
    assert {0, 1, 2, 3} <= set(ldr._group.recent_made)
    ldr.close()


def test_process_pools_group_too(tmp_path, monkeypatch):
    """The same with loader processes: a step's documents cross back from the workers whole
    and are cut into each rank's runs."""
    monkeypatch.setenv("SLIPSTREAM_SHARED_DOCS", str(tmp_path / "store"))
    ref, _ = run_steps(_spec(tmp_path, machine_ranks=1), 3, world_size=2)
    spec = _spec(tmp_path, machine_ranks=2, pool="process")
    spec = replace(spec, backend=replace(spec.backend, num_workers=1))
    got, _ = run_steps(spec, 3, world_size=2)
    assert_same_batches(ref, got)


def test_a_loader_plans_nothing_past_its_end_step(tmp_path, monkeypatch, tokenized):
    """`end_step`: the steps before it are the endless loader's, then StopIteration, with no
    step planned or loaded past it (a machine group reads far ahead: it must stop too); a
    loader resumed before the end gives the rest."""
    monkeypatch.setenv("SLIPSTREAM_SHARED_DOCS", str(tmp_path / "store"))
    spec = _spec(tmp_path, machine_ranks=2)
    ref, _ = run_steps(_spec(tmp_path, machine_ranks=1), 3, world_size=2)
    monkeypatch.setenv("SLIPSTREAM_SHARED_DOCS", str(tmp_path / "store2"))  # tokenize anew
    tokenized.clear()
    loaders = [MixtureLoader(spec, r, 2, end_step=3) for r in range(2)]
    got = [[next(ldr) for ldr in loaders] for _ in range(3)]
    assert_same_batches(ref, got)
    for ldr in loaders:
        with pytest.raises(StopIteration):
            next(ldr)
        with pytest.raises(StopIteration):  # and again
            next(ldr)
        assert ldr.planner.step == 3
    lengths = loaders[0].planner.lengths
    planner = Planner(spec, lengths, dp_world_size=2)
    held = set()
    for _ in range(3):
        plan = planner.plan_step()
        held |= set(unpack_keys(doc_keys(plan.piece_source, plan.piece_doc)))
    names = [s.name for s in spec.sources]
    assert {(names[s], d) for s, d in held} == set(tokenized)  # no document of step 3 or later
    state = loaders[0].state_dict()
    for ldr in loaders:
        ldr.close()
    rest = MixtureLoader(spec, 0, 2, end_step=5)
    rest.load_state_dict(state)
    assert [b.step for b in rest] == [3, 4]
    rest.close()


def test_a_store_short_of_space_gets_no_files_and_each_rank_loads_its_own(tmp_path, monkeypatch):
    """With less free space than the store keeps in reserve (a container's small /dev/shm),
    a maker writes nothing for the others: each rank finds no file and loads the step
    itself, with the same batches, and the store stays empty."""
    from slipstream.data.backends import machine_group as group

    monkeypatch.setenv("SLIPSTREAM_SHARED_DOCS", str(tmp_path / "store"))
    ref, _ = run_steps(_spec(tmp_path, machine_ranks=1), 4, world_size=2)
    spec = _spec(tmp_path, machine_ranks=2)  # once: it rewrites the files (a new job's tag)
    monkeypatch.setattr(group, "MIN_FREE_BYTES", 1 << 62)
    loaders = [MixtureLoader(spec, r, 2) for r in range(2)]
    got = [[next(ldr) for ldr in loaders] for _ in range(4)]
    assert_same_batches(ref, got)
    for ldr in loaders:  # each made every step it took: its own, and the other's
        assert {0, 1, 2, 3} <= set(ldr._group.recent_made)
        ldr.close()
    assert not list((tmp_path / "store").glob("step-*.bin"))
