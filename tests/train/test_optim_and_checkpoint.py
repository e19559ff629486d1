"""Schedule, and checkpoints: atomic, pruned, refused when they do not fit."""

from __future__ import annotations

import pytest
import torch

from slipstream.train import checkpoint as ckpt
from slipstream.train.distributed import Dist
from slipstream.train.optim import OptimConfig, lr_factor


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[99] == pytest.approx(0.1, abs=1e-3)


def save(tmp_path, step, keep=2, model_cfg=None):
    return ckpt.save_checkpoint(
        tmp_path,
        step,
        Dist(),
        keep,
        model={"w": torch.full((2,), float(step))},
        optimizer={"optimizer": {"state": {}}},
        data={"version": 1},
        meta={"model": model_cfg or {"d": 1}},
    )


def test_only_the_last_k_checkpoints_are_kept(tmp_path):
    for step in (10, 20, 30):
        save(tmp_path, step)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000020", "step_00000030"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000030"


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 10)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError):
        save(tmp_path, 20)
    monkeypatch.undo()
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_00000010"
    state = ckpt.load_checkpoint(latest, Dist(), {"d": 1})
    assert state["model"]["w"].tolist() == [10.0, 10.0]
    save(tmp_path, 20)  # the next save clears the half-written folder
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000020"


def test_checkpoint_of_another_model_is_refused_with_the_difference(tmp_path):
    path = save(tmp_path, 10, model_cfg={"d_model": 256, "n_layer": 4})
    with pytest.raises(ValueError, match="d_model 256 -> 512"):
        ckpt.load_checkpoint(path, Dist(), {"d_model": 512, "n_layer": 4})


class Payload:
    """Unpickling this would run `os.system`: what a hostile checkpoint file carries."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_a_checkpoint_holding_a_pickled_callable_is_refused_by_name(tmp_path):
    path = save(tmp_path, 10)
    torch.save({"state": {}, "x": Payload()}, path / "optimizer.pt")
    parts = ckpt.load_checkpoint(path, Dist(), {"d": 1})["optimizer"]
    assert parts.names() == ["optimizer"]
    with pytest.raises(ValueError, match=r"optimizer\.pt: refused to load"):
        parts.load("optimizer")


def test_rng_states_round_trip_through_a_safe_load(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    want = (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random())
    ckpt.set_rng_state(ckpt.safe_load(tmp_path / "rng.pt"))
    assert (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()) == want
