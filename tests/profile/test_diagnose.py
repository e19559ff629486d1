"""The diagnosis names the bottleneck with the largest claim, in rule order, and a lever that
exists."""

from __future__ import annotations

from slipstream.profile import diagnose


def test_each_rule_fires_on_its_phase():
    assert diagnose({"data_wait": 0.4, "forward": 0.3}).bottleneck == "data"
    assert diagnose({"comm": 0.2, "backward": 0.5}).bottleneck == "communication"
    off = diagnose({"grad_offload": 0.2, "backward": 0.5})
    assert off.bottleneck == "copy" and "micro_batch_size" in off.lever
    opt = diagnose({"optimizer": 0.3, "forward": 0.3})
    assert opt.bottleneck == "optimizer" and "optim.delayed_update" in opt.lever


def test_compute_bound_when_no_rule_fires():
    d = diagnose({"forward": 0.4, "backward": 0.55, "optimizer": 0.05})
    assert d.bottleneck == "compute" and abs(d.share - 0.95) < 1e-12 and "95%" in d.message


def test_data_comes_first_when_several_phases_are_large():
    assert diagnose({"data_wait": 0.2, "comm": 0.5}).bottleneck == "data"
