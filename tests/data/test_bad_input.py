"""Bad input: each mistake gets one message naming the field or file and the fix."""

from __future__ import annotations

import json
import os
import signal

import pytest

from slipstream.data import MixtureLoader, MixtureSpec, build_source_loaders
from tests.conftest import CACHE, corpus_spec, write_source
from tests.data.contract import assert_same_batches, run_steps


def spec_with(tmp_path, **source_changes) -> dict:
    raw = corpus_spec(tmp_path, "jsonl")
    raw["sources"][0].update(source_changes)
    return raw


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weight": -1.0}, r"sources\.short\.weight: -1.0 is negative"),
        ({"format": "csv"}, r"sources\.short\.format: unknown format 'csv'"),
        ({"paths": []}, r"sources\.short\.paths: list at least one"),
        ({"on_error": "ignore"}, r"on_error: use 'skip' or 'raise'"),
    ],
)
def test_bad_source_fields_name_the_field(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        MixtureSpec.from_dict(spec_with(tmp_path, **change), base_dir=str(tmp_path))


@pytest.mark.parametrize("seq_len", [0, -5])
def test_non_positive_seq_len_is_refused(tmp_path, seq_len):
    with pytest.raises(ValueError, match="seq_len"):
        MixtureSpec.from_dict(corpus_spec(tmp_path, "jsonl", seq_len=seq_len))


def test_all_zero_weights_are_refused(tmp_path):
    raw = corpus_spec(tmp_path, "jsonl")
    for s in raw["sources"]:
        s["weight"] = 0.0
    with pytest.raises(ValueError, match="every weight is 0"):
        MixtureSpec.from_dict(raw)


def test_missing_path_names_the_pattern(tmp_path):
    spec = MixtureSpec.from_dict(spec_with(tmp_path, paths=["nowhere/*.jsonl"]), str(tmp_path))
    with pytest.raises(
        ValueError, match=r"sources\.short\.paths: 'nowhere/\*\.jsonl' matches no file"
    ):
        build_source_loaders(spec)


def test_empty_source_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.jsonl").write_text("\n\n")
    spec = MixtureSpec.from_dict(spec_with(tmp_path, paths=["empty/a.jsonl"]), str(tmp_path))
    with pytest.raises(ValueError, match=r"sources\.short: no documents in 1 file"):
        build_source_loaders(spec)


def corrupt_jsonl(tmp_path):
    path = tmp_path / "bad" / "a.jsonl"
    path.parent.mkdir()
    lines = [
        json.dumps({"text": "good one"}),
        "{not json",
        json.dumps({"other": 1}),
        json.dumps({"text": "good two"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    return "bad/a.jsonl"


def test_corrupt_jsonl_lines_are_skipped_and_counted(tmp_path):
    raw = spec_with(tmp_path, paths=[corrupt_jsonl(tmp_path)], max_bad_fraction=0.5)
    loader = build_source_loaders(MixtureSpec.from_dict(raw, str(tmp_path)))[0]
    assert loader.num_docs == 2 and loader.num_bad == 2
    assert loader.read_texts([0, 1]) == ["good one", "good two"]


def test_corrupt_jsonl_line_stops_when_asked(tmp_path):
    raw = spec_with(tmp_path, paths=[corrupt_jsonl(tmp_path)], on_error="raise")
    with pytest.raises(ValueError, match=r"a\.jsonl:2: not valid JSON"):
        build_source_loaders(MixtureSpec.from_dict(raw, str(tmp_path)))


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_corrupt_parquet_file_is_skipped_or_fatal(tmp_path, on_error):
    glob = write_source(tmp_path, "pq", "parquet", [f"doc {i}" for i in range(10)])
    (tmp_path / "pq" / "part-9.parquet").write_bytes(b"PAR1 this is not parquet")
    raw = spec_with(tmp_path, format="parquet", paths=[glob], on_error=on_error)
    raw["sources"][0]["max_bad_fraction"] = 0.5  # 1 bad file beside 10 good rows
    spec = MixtureSpec.from_dict(raw, str(tmp_path))
    if on_error == "raise":
        with pytest.raises(ValueError, match=r"part-9\.parquet: corrupt parquet file"):
            build_source_loaders(spec)
    else:
        loader = build_source_loaders(spec)[0]
        assert loader.num_docs == 10 and loader.num_bad == 1


def test_index_cache_is_rebuilt_when_the_shard_changes(tmp_path):
    glob = write_source(tmp_path, "c", "jsonl", [f"doc {i}" for i in range(6)], shards=1)
    spec = MixtureSpec.from_dict(spec_with(tmp_path, paths=[glob]), str(tmp_path))
    assert build_source_loaders(spec)[0].num_docs == 6
    assert len(list((CACHE / "index").glob("*-part-0.jsonl.slipidx.npz"))) >= 1
    with open(tmp_path / "c" / "part-0.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    assert build_source_loaders(spec)[0].num_docs == 7


def test_read_error_mid_run_loses_nothing_delivered(tmp_path):
    raw = corpus_spec(tmp_path, "jsonl")
    raw["backend"]["prefetch_steps"] = 1
    spec = MixtureSpec.from_dict(raw, base_dir=str(tmp_path))
    ref, _ = run_steps(spec, 30, world_size=1)
    shards = sorted(tmp_path.glob("*/part-*.jsonl"))
    good = {p: p.read_bytes() for p in shards}
    loader = MixtureLoader(spec)
    delivered = [next(loader) for _ in range(2)]
    state = loader.state_dict()
    for p in shards:  # corrupted under a running loader
        p.write_bytes(b"x" * len(good[p]))
    with pytest.raises(ValueError):
        for _ in range(28):
            delivered.append(next(loader))
    assert loader.state_dict()["planner"] == delivered[-1].state_after
    loader.close()
    for p in shards:
        p.write_bytes(good[p])
    rest, _ = run_steps(spec, 30 - len(delivered), loader.state_dict(), world_size=1)
    assert_same_batches([[b] for b in delivered] + rest, ref)
    assert len(delivered) < 30 and state["planner"]["step"] == 2


def test_killed_loader_worker_is_replaced_and_the_stream_unchanged(tmp_path):
    raw = corpus_spec(tmp_path, "jsonl")
    raw["backend"].update(pool="process", prefetch_steps=1)
    spec = MixtureSpec.from_dict(raw, base_dir=str(tmp_path))
    ref, _ = run_steps(spec, 8, world_size=1)
    with MixtureLoader(spec) as loader:
        got = [next(loader) for _ in range(2)]
        pids = loader.backend.worker_pids()
        assert pids
        os.kill(pids[0], signal.SIGKILL)
        got += [next(loader) for _ in range(6)]
    assert_same_batches([[b] for b in got], ref)


def test_transform_runs_in_the_loader_and_a_bad_one_is_named(tmp_path):
    import string

    plain = build_source_loaders(MixtureSpec.from_dict(spec_with(tmp_path), str(tmp_path)))[0]
    raw = spec_with(tmp_path, transform="string:capwords")
    loader = build_source_loaders(MixtureSpec.from_dict(raw, str(tmp_path)))[0]
    assert loader.read_texts([0]) == [string.capwords(plain.read_texts([0])[0])]
    raw = spec_with(tmp_path, transform="no_such_module:f")
    with pytest.raises(ValueError, match=r"sources\.short\.transform: cannot load"):
        build_source_loaders(MixtureSpec.from_dict(raw, str(tmp_path)))


def test_a_binary_file_in_a_text_source_is_refused_by_name(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "weights.txt").write_bytes(b"PK\x03\x04\x00\x00" + bytes(range(256)) * 8)
    raw = spec_with(tmp_path, format="text", paths=["bin/weights.txt"])
    with pytest.raises(ValueError, match=r"weights\.txt: a binary file, not text"):
        build_source_loaders(MixtureSpec.from_dict(raw, str(tmp_path)))
