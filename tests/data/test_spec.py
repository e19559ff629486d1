"""Mixture spec: TOML with relative paths, overrides, schedules, round trip."""

from __future__ import annotations

import pytest

from slipstream.data import MixtureSpec, WeightSchedule

SPEC = """
seq_len = 256
[balance]
method = "kk"
[[sources]]
name = "a"
paths = "a/*.jsonl"
weight = 2
[[sources]]
name = "b"
format = "parquet"
paths = ["b/*.parquet"]
schedule = [[0, 0.0], [100, 2.0]]
"""


def test_toml_spec_resolves_paths_against_its_folder(tmp_path):
    (tmp_path / "mix.toml").write_text(SPEC)
    spec = MixtureSpec.from_toml(tmp_path / "mix.toml", ["seq_len=1024", "sources.0.weight=1"])
    assert spec.seq_len == 1024 and spec.balance.method == "kk"
    assert spec.resolve("a/x.jsonl") == tmp_path.resolve() / "a/x.jsonl"
    assert spec.weights_at(0) == [1.0, 0.0]
    assert spec.weights_at(50) == [0.5, 0.5]
    assert MixtureSpec.from_dict(spec.to_dict()) == spec


def test_schedule_interpolates_linearly_and_holds_at_the_ends():
    s = WeightSchedule(points=((10, 1.0), (20, 3.0)))
    assert [s.weight_at(t) for t in (0, 10, 15, 20, 99)] == [1.0, 1.0, 2.0, 3.0, 3.0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("seq_len = 8\n", "lists no source"),
        ("bogus = 1\n[[sources]]\nname='a'\npaths='x'\nweight=1\n", r"unknown keys \['bogus'\]"),
        ("[[sources]]\nname='a'\npaths='x'\n", "exactly one of `weight` or `schedule`"),
        ("[[sources]]\nname='a'\npaths='x'\nschedule=[[5,1],[2,1]]\n", "strictly increasing"),
        ("seq_len = [\n", "not valid TOML"),
    ],
)
def test_bad_spec_files_are_named(tmp_path, text, message):
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(ValueError, match=message):
        MixtureSpec.from_toml(tmp_path / "bad.toml")


def test_bad_override_names_the_syntax(tmp_path):
    (tmp_path / "mix.toml").write_text(SPEC)
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        MixtureSpec.from_toml(tmp_path / "mix.toml", ["seq_len"])
