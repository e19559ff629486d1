"""HostAdamW against torch.optim.AdamW, across thread counts, with the fused bf16 copy-out."""

from __future__ import annotations

import pytest
import torch

from slipstream.offload import adamw_kernel as kernel
from slipstream.offload.host_adam import HostAdamW

HYPER = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Odd sizes: vector bodies and scalar tails both run; one tensor spans several blocks.
    return [torch.randn(n, generator=g) for n in (1, 37, 4099, 70_001)]


def grads(step: int, like: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) * 0.1 for p in like]


def run(opt_cls, steps: int, grad_scale: float = 1.0, **kw) -> list[torch.Tensor]:
    ps = [p.clone() for p in params()]
    opt = opt_cls(ps, **HYPER, **kw)
    for s in range(steps):
        for p, g in zip(ps, grads(s, ps), strict=True):
            p.grad = g
        if opt_cls is HostAdamW:
            opt.step(grad_scale=grad_scale)
        else:
            for p in ps:
                p.grad.mul_(grad_scale)
            opt.step()
    return ps


@pytest.mark.parametrize("use_kernel", [True, False])
def test_matches_torch_adamw_to_1e6_after_100_steps(use_kernel):
    if use_kernel and kernel.load() is None:
        pytest.skip("no C compiler here")
    got = run(HostAdamW, 100, use_kernel=use_kernel, num_threads=2)
    want = run(torch.optim.AdamW, 100)
    for a, b in zip(got, want, strict=True):
        # fp32 with the same formula in another operation order: ~1 ulp per step at most.
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_same_bits_for_any_thread_count():
    if kernel.load() is None:
        pytest.skip("no C compiler here")
    one = run(HostAdamW, 5, num_threads=1)
    for n in (2, 3, 7):
        for a, b in zip(one, run(HostAdamW, 5, num_threads=n), strict=True):
            assert torch.equal(a, b)


def test_grad_scale_is_applied_in_the_pass():
    got = run(HostAdamW, 3, grad_scale=0.25, num_threads=2)
    want = run(torch.optim.AdamW, 3, grad_scale=0.25)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_bf16_copy_out_is_the_rounded_new_weight():
    ps = params()
    opt = HostAdamW(ps, **HYPER, num_threads=2)
    outs = {p: torch.empty(p.shape, dtype=torch.bfloat16) for p in ps}
    for p, g in zip(ps, grads(0, ps), strict=True):
        p.grad = g
    opt.step(bf16_out=outs)
    for p in ps:
        assert torch.equal(outs[p], p.to(torch.bfloat16))  # round to nearest even, as torch


def test_grad_norm_is_exact_and_thread_independent():
    ps = params()
    for p, g in zip(ps, grads(0, ps), strict=True):
        p.grad = g
    want = sum(float(g.double().square().sum()) for g in grads(0, ps))
    norms = {n: HostAdamW(ps, num_threads=n).grad_sq_norm() for n in (1, 2, 5)}
    assert len(set(norms.values())) == 1
    assert norms[1] == pytest.approx(want, rel=1e-12)  # double partial sums of fp32 squares


def test_state_has_torchs_layout_and_round_trips():
    ps = run(HostAdamW, 2, num_threads=2)
    opt = HostAdamW(ps, **HYPER)
    for p, g in zip(ps, grads(0, ps), strict=True):
        p.grad = g
    opt.step()
    state = opt.state_dict()
    assert set(state["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    again = HostAdamW([p.clone() for p in ps], **HYPER)
    again.load_state_dict(state)
    assert torch.equal(again.state_dict()["state"][3]["exp_avg"], state["state"][3]["exp_avg"])


def test_refuses_parameters_that_are_not_fp32_host_tensors():
    with pytest.raises(ValueError, match="contiguous fp32 CPU tensors"):
        HostAdamW([torch.zeros(3, dtype=torch.bfloat16)])


@pytest.mark.parametrize("n", [1, 7, 2049, 70_001])  # ragged against the kernel's chunks
def test_bf16_gradient_add_gives_torchs_bits(n):
    """The kernel's bf16 -> fp32 add is the sum torch's add_ gives, bit for bit (the
    conversion is exact), for any length; other dtypes and layouts take add_ itself."""
    p = torch.zeros(8)
    opt = HostAdamW([p], num_threads=2)
    assert opt.uses_kernel
    g = torch.randn(n, generator=torch.Generator().manual_seed(n)).bfloat16()
    g[0] = float("nan") if n > 1 else g[0]  # a NaN stays a NaN (an fp16 loss-scale overflow)
    dst = torch.randn(n, generator=torch.Generator().manual_seed(n + 1))
    want = dst.clone().add_(g)
    opt.add_grad(dst, g)
    assert torch.allclose(dst, want, rtol=0, atol=0, equal_nan=True)
    half = g.half()
    dst2 = torch.zeros(n)
    opt.add_grad(dst2, half)  # fp16: torch's add_
    assert torch.allclose(dst2, half.float(), rtol=0, atol=0, equal_nan=True)
    if n > 2:  # a strided view: torch's add_
        dst3 = torch.zeros(n)[::2]
        opt.add_grad(dst3, g[::2])
        assert torch.allclose(dst3, g[::2].float(), rtol=0, atol=0, equal_nan=True)
