"""The resume contract against every source format and both pool kinds."""

from __future__ import annotations

from dataclasses import replace

import pytest

from slipstream.data import MixtureSpec
from tests.conftest import corpus_spec
from tests.data.contract import assert_same_batches, check_resume, merged_stream, run_steps

POOLS = ["thread", "process"]
# A process pool reads each format in its workers (the readers cross a pickle): every format
# takes both pools in the mid-epoch contract; the other contracts are the planner's and the
# resume state's, the same whichever pool loads, so their process-pool runs (a few seconds of
# worker start each) are part of `make test-all`.
POOLS_ALL = ["thread", pytest.param("process", marks=pytest.mark.combinations)]


def spec_for(tmp_path, fmt, pool, **kw) -> MixtureSpec:
    raw = corpus_spec(tmp_path, fmt, **kw)
    raw["backend"]["pool"] = pool
    return MixtureSpec.from_dict(raw, base_dir=str(tmp_path))


@pytest.mark.parametrize("pool", POOLS)
def test_resume_mid_epoch_gives_identical_batches(tmp_path, fmt, pool):
    check_resume(spec_for(tmp_path, fmt, pool), split=3, total=7)


@pytest.mark.parametrize("pool", POOLS_ALL)
def test_resume_at_epoch_boundary_gives_identical_batches(tmp_path, fmt, pool):
    spec = spec_for(tmp_path, fmt, "thread")
    ref, _ = run_steps(spec, 40)
    # The first step after which the small "long" source has wrapped into its second epoch.
    states = [s[0].state_after["sources"]["long"]["epoch"] for s in ref]
    split = states.index(1) + 1
    spec = replace(spec, backend=replace(spec.backend, pool=pool))
    check_resume(spec, split=split, total=split + 3)


@pytest.mark.parametrize("pool", POOLS_ALL)
def test_resume_after_weight_change_loses_and_repeats_nothing(tmp_path, fmt, pool):
    spec = spec_for(tmp_path, fmt, pool)
    raw = spec.to_dict()
    raw["sources"][0]["weight"], raw["sources"][2]["weight"] = 0.1, 0.6
    check_resume(spec, split=4, total=10, after=MixtureSpec.from_dict(raw))


@pytest.mark.parametrize("pool", POOLS_ALL)
def test_resume_with_other_world_size_continues_the_stream(tmp_path, fmt, pool):
    spec = spec_for(tmp_path, fmt, pool)
    raw = spec.to_dict()
    raw["micro_batch_size"] = 1
    after = MixtureSpec.from_dict(raw)  # 4 ranks x 1 row: the same rows per step as 2 x 2
    ref, first, second = check_resume(spec, split=3, total=8, after=after, after_world_size=4)
    # With constant weights the document stream does not depend on how steps cut it.
    resumed = merged_stream(first + second)
    want = merged_stream(ref)
    k = min(len(resumed), len(want)) - 1  # the last may still be in flight
    assert resumed[:k] == want[:k]


def test_stream_is_identical_for_any_worker_count_and_pool(tmp_path):
    base = MixtureSpec.from_dict(corpus_spec(tmp_path, "jsonl"), base_dir=str(tmp_path))
    ref, _ = run_steps(base, 5)
    for pool, workers, prefetch in (("thread", 1, 1), ("thread", 4, 3), ("process", 3, 2)):
        backend = replace(base.backend, pool=pool, num_workers=workers, prefetch_steps=prefetch)
        spec = replace(base, backend=backend)
        assert_same_batches(run_steps(spec, 5)[0], ref)


def test_resume_without_packing_gives_identical_batches(tmp_path, fmt):
    spec = spec_for(tmp_path, fmt, "thread", packing=False)
    ref, _, _ = check_resume(spec, split=3, total=6)
    # One document piece per row: every row holds a single document.
    for step in ref:
        for rank in step:
            for mb in rank.micro_batches:
                assert int(mb["doc_ids"].max()) == 0


def test_resume_mixing_by_tokens_gives_identical_batches(tmp_path, fmt):
    check_resume(spec_for(tmp_path, fmt, "thread", mix_by="tokens"), split=3, total=7)


def test_resume_with_a_larger_global_batch_continues_the_stream(tmp_path):
    # 2 ranks x 4 rows, then 4 ranks x 4 rows: the global batch doubles at the resume. The
    # stream is global, so it simply continues: each source's order is unchanged and every
    # token is delivered once (checked inside check_resume).
    spec = spec_for(tmp_path, "jsonl", "thread")
    ref, first, second = check_resume(spec, split=3, total=7, after_world_size=4)
    assert len(second[0]) == 4 and len(first[0]) == 2
    rows = [mb["input_ids"].shape[0] for r in second[0] for mb in r.micro_batches]
    assert sum(rows) == 2 * sum(
        mb["input_ids"].shape[0] for r in first[0] for mb in r.micro_batches
    )
