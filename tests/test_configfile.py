"""One builder for every config: nested tables, unknown keys, and values of the wrong type."""

from __future__ import annotations

import pytest

from slipstream.configfile import build_config, check_version
from slipstream.data import MixtureSpec
from slipstream.models import GPTConfig, HFConfig, model_config_from_raw
from slipstream.train import OptimConfig, TrainConfig

SOURCE = {"name": "a", "paths": "x/*.jsonl", "weight": 1}


def test_nested_tables_build_their_dataclasses():
    spec = MixtureSpec.from_dict(
        {
            "sources": [{**SOURCE, "schedule": [[0, 1], [10, 2]], "weight": None}],
            "balance": {"method": "kk"},
            "backend": {"num_workers": 3},
        }
    )
    assert spec.sources[0].paths == ["x/*.jsonl"]  # one path may be written as a string
    assert spec.sources[0].weight_at(5) == 1.5
    assert spec.balance.method == "kk" and spec.backend.num_workers == 3


@pytest.mark.parametrize(
    ("cls", "raw", "message"),
    [
        (OptimConfig, {"lr": "abc"}, "optim.lr: 'abc' is not a number"),
        (OptimConfig, {"lr": True}, "optim.lr: True is not a number"),
        (TrainConfig, {"steps": 2.5}, "train.steps: 2.5 is not an integer"),
        (TrainConfig, {"progress": "yes"}, "train.progress: 'yes' is not true or false"),
        (TrainConfig, {"sample_prompts": "def "}, "train.sample_prompts: 'def ' is not a list"),
        (TrainConfig, {"sample_prompts": [1]}, "train.sample_prompts.0: 1 is not a string"),
        (TrainConfig, {"stepz": 1}, "train: unknown keys ['stepz']"),
    ],
)
def test_a_wrong_value_or_key_is_named_with_the_type_expected(cls, raw, message):
    where = "optim" if cls is OptimConfig else "train"
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_config(cls, raw, where)


def test_nested_errors_name_the_whole_path():
    with pytest.raises(ValueError, match=r"data\.backend\.num_workers: 1\.5 is not an integer"):
        MixtureSpec.from_dict({"sources": [SOURCE], "backend": {"num_workers": 1.5}})
    with pytest.raises(ValueError, match=r"data\.sources\.0 \(a\)\.weight: 'heavy' is not"):
        MixtureSpec.from_dict({"sources": [{**SOURCE, "weight": "heavy"}]})
    with pytest.raises(ValueError, match=r"schedule: expected a list of \[step, weight\] pairs"):
        MixtureSpec.from_dict({"sources": [{**SOURCE, "weight": None, "schedule": 3}]})


def test_an_integer_is_accepted_where_a_number_is_expected():
    assert build_config(OptimConfig, {"lr": 1}, "optim").lr == 1.0


def test_the_model_kind_chooses_the_config():
    assert isinstance(model_config_from_raw({"n_layer": 2}), GPTConfig)
    assert isinstance(model_config_from_raw({"kind": "hf", "path": "m"}), HFConfig)
    with pytest.raises(ValueError, match=r"model: unknown keys \['n_layer'\]"):
        model_config_from_raw({"kind": "hf", "path": "m", "n_layer": 2})


def test_state_of_another_version_is_refused_by_name():
    check_version({"version": 3}, 3, "thing")
    with pytest.raises(ValueError, match="thing: state version 1 is not 3"):
        check_version({"version": 1}, 3, "thing")
    with pytest.raises(ValueError, match="thing: state version None is not 3"):
        check_version({}, 3, "thing")
