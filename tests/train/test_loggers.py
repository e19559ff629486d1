"""train.loggers: the step metrics in TensorBoard's event files and an offline Weights & Biases
run, read back with each tool's own reader; a resumed run continues them."""

from __future__ import annotations

import json

import pytest

from slipstream.config import RunConfig
from slipstream.train import Trainer
from tests.e2e.test_train import write_recipe


def rows(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_holds_every_step_and_a_resume_continues_it(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = write_recipe(tmp_path)
    base = ["train.loggers=['jsonl', 'tensorboard']", "train.sample_tokens=0"]
    Trainer(RunConfig.load(recipe, [*base, "train.stop_at_step=4"])).fit()
    # As after a crash: the records reach step 4, the newest checkpoint is step 3's.
    run = tmp_path / "run"
    for folder in (run / "checkpoints").glob("step_00000004"):
        folder.rename(run / "gone")
    Trainer(RunConfig.load(recipe, base), resume=True).fit()
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    loss = acc.Scalars("loss")
    # Step 4 of the first run was dropped from both records: each step once, as continued.
    assert [e.step for e in loss] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows(run)] == [1, 2, 3, 4, 5, 6]
    # TensorBoard keeps float32: a float64 loss rounds by at most 2**-24 (6e-8) relative.
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows(run)], rel=1e-6)
    assert "eval_bpb" in acc.Tags()["scalars"] and "time/step_s" in acc.Tags()["scalars"]


def wandb_records(path) -> list:
    """An offline W&B run's transaction log, as W&B's own protobuf records: a 7-byte header
    (":W&B", magic, version), then LevelDB-log blocks of 32 KiB, each record a 7-byte header
    (crc, length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", raw[:7]
    pos, block, parts, out = 7, 32768, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data, pos = raw[pos + 7 : pos + 7 + n], pos + 7 + n
        parts = data if kind in (1, 2) else parts + data
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            out.append(record)
    return out


def test_wandb_offline_run_records_the_metrics_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline because nobody is logged in
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a W&B key
    recipe = write_recipe(tmp_path)
    cfg = RunConfig.load(recipe, ["train.loggers=['wandb']", "train.sample_tokens=0"])
    history = Trainer(cfg).fit()
    (log,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(log)
    steps = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                   for i in r.history.item}  # fmt: skip
            steps[row["_step"]] = row
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert [steps[s]["loss"] for s in range(1, 7)] == pytest.approx([h["loss"] for h in history])
    assert "eval_bpb" in steps[3] and "time/step_s" in steps[1]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in run.config.update}
    assert config["model"]["n_layer"] == 2 and config["train"]["loggers"] == ["wandb"], (
        config.keys()
    )


def test_an_unknown_logger_is_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"train\.loggers: 'mlflow' unknown; use any of jsonl"):
        RunConfig.load(write_recipe(tmp_path), ["train.loggers=['mlflow']"])
