"""The numbers `slipstream doctor` takes from the other pillars (tools/doctor.py): the step the
trainer would take without offload is the trainer's own optimizer over the run's model (its
clipping, its parameter groups, its fused AdamW), not a stand-in, so its time is the one the
offload what-if compares with."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from benchmarks import doctor_scenarios as scenarios
from slipstream.config import RunConfig
from slipstream.models import GPT
from slipstream.tools.doctor import plain_step, plain_step_seconds
from slipstream.tools.memory import gpt_config
from slipstream.train.device_optim import DeviceAdamW


def offload_run(tmp_path: Path) -> RunConfig:
    recipe, _ = scenarios.write(tmp_path, "offload")
    return RunConfig.load(recipe, [])


def record(tp: int = 1) -> dict:
    return {"device": {"type": "cpu", "threads": 1}, "topology": {"tp_size": tp}}


def test_the_plain_step_is_the_trainers_optimizer_over_the_runs_parameters(tmp_path):
    cfg = offload_run(tmp_path)
    assert cfg.optim.offload and cfg.optim.grad_clip > 0
    opt, scale = plain_step(cfg, record())
    with torch.device("meta"):
        shapes = [p.shape for p in GPT(gpt_config(cfg)).parameters()]
    assert isinstance(opt, DeviceAdamW) and scale == 1.0
    assert [p.shape for p in opt.params] == shapes
    assert opt.max_norm == cfg.optim.grad_clip
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] > 0
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0
    assert decay["fused"] and decay["betas"] == (cfg.optim.beta1, cfg.optim.beta2)
    # Its step clips to the global norm. Gradients of +-1 make every partial sum of squares
    # an integer below 2**24, exact in fp32 in any order: each tensor's norm is sqrt(k) up
    # to one rounding (u = 2**-24), and the norm over the m tensors' norms adds at most
    # (m + 2) u relative (the roundings of m squares and m sums, then the root).
    for p in opt.params:
        p.grad.copy_(torch.where(p.grad >= 0, 1.0, -1.0))
    n, m, u = sum(p.numel() for p in opt.params), len(opt.params), 2**-24
    norm = opt.step()
    assert abs(norm - math.sqrt(n)) <= (m + 3) * u * math.sqrt(n)
    # The gradients it stepped with were scaled to max_norm: by max_norm / (norm + 1e-6),
    # one more rounding per element and of the factor.
    after = math.sqrt(sum(float(p.grad.double().square().sum()) for p in opt.params))
    assert abs(after - cfg.optim.grad_clip) <= ((m + 6) * u + 1e-6 / norm) * cfg.optim.grad_clip
    # ... and it steps every parameter from zero.
    assert all(bool(p.detach().abs().sum() > 0) for p in opt.params)
    assert plain_step_seconds(cfg, record(), repeats=1) > 0


def test_a_model_over_the_cap_steps_its_first_parameters_and_scales_by_count(tmp_path):
    cfg = offload_run(tmp_path)
    with torch.device("meta"):
        shapes = [p.shape for p in GPT(gpt_config(cfg)).parameters()]
    total = sum(s.numel() for s in shapes)
    cap = shapes[0].numel() + shapes[1].numel()
    opt, scale = plain_step(cfg, record(), cap=cap)
    assert [p.shape for p in opt.params] == shapes[:2]
    assert scale == total / cap
    # Under tensor parallelism a rank steps about 1/tp of the model.
    _, halved = plain_step(cfg, record(tp=2))
    assert halved == 0.5
