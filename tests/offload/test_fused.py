"""The fused host pass (grads.py) against the two-pass path it replaces: the same bits in every
mode (fp32, bf16 and fp16 with loss scaling; clipping; gradient accumulation, told which
micro-step is the last or not; early bucket steps; the delayed update; ZeRO-2 over 2 ranks),
and no fp32 gradient buffer without accumulation.

Why bit-equality is the right bar: acc + g is the same fp32 sum whether the last micro-step is
added first or read beside the sum, and both paths take the sums of squares segment by segment
in the same blocks; the kernel's AdamW is the same code after that."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from slipstream.models import GPT, GPTConfig
from slipstream.offload.engine import OffloadOptimizer


def tiny(dtype: torch.dtype) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=16))
    return model.to(dtype)


def batches(n: int, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 16), generator=g) for _ in range(n)]


def run(dtype, fused: bool, micro: int, clip: float, tell: bool, delayed: bool, steps=4):
    model = tiny(dtype)
    opt = OffloadOptimizer(
        [{"params": list(model.parameters()), "weight_decay": 0.1}],
        lr=1e-2, betas=(0.9, 0.95), eps=1e-8, bucket_numel=3000, max_norm=clip,
        delayed_update=delayed, delay_start=1, fused=fused,
    )  # fmt: skip
    norms = []
    data = batches(steps * micro)
    for s in range(steps):
        for j, x in enumerate(data[s * micro : (s + 1) * micro]):
            if tell:
                opt.before_backward(last=j == micro - 1)
            logits = model(x[:, :-1]).float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
            (loss * opt.loss_scale / micro).backward()
        norms.append(opt.step())
        opt.zero_grad()
    opt.flush()
    out = (
        [p.detach().clone() for p in model.parameters()],
        [b.master.clone() for b in opt.buckets],
        norms,
        opt.early_steps,
        [g.acc is not None for g in opt.grads],
    )
    opt.close()
    return out


MODES = [  # dtype, micro-batches, clipping, told the last micro-step, delayed update
    (torch.float32, 1, 0.5, True, False),
    (torch.bfloat16, 1, 0.5, True, False),
    (torch.bfloat16, 1, float("inf"), True, False),  # buckets step during backward
    (torch.bfloat16, 2, 0.5, True, False),
    (torch.bfloat16, 3, float("inf"), True, False),
    (torch.bfloat16, 2, 0.5, False, False),  # not told: staged, then folded on the next one
    (torch.float32, 2, 0.5, False, False),
    (torch.float16, 1, 1.0, True, False),  # loss scaling
    (torch.float16, 2, 1.0, True, False),
    (torch.bfloat16, 1, 0.5, True, True),  # the delayed update (double-buffered stages)
    (torch.bfloat16, 2, float("inf"), True, True),
]


@pytest.mark.parametrize(("dtype", "micro", "clip", "tell", "delayed"), MODES)
def test_fused_pass_gives_the_two_pass_bits(dtype, micro, clip, tell, delayed):
    fused = run(dtype, True, micro, clip, tell, delayed)
    two = run(dtype, False, micro, clip, tell, delayed)
    for a, b in zip(fused[0] + fused[1], two[0] + two[1], strict=True):
        assert torch.equal(a, b)
    assert fused[2] == two[2]  # the norms, to the last bit
    assert fused[3] == two[3]  # as many buckets stepped during backward
    if not delayed and clip == float("inf") and tell:
        assert fused[3] > 0  # the early steps ran, reading the staged gradients
    if micro == 1:  # no accumulation: no fp32 gradient is ever made
        assert not any(fused[4])
    assert all(two[4])


def test_norm_is_the_gradients_norm_for_any_thread_count():
    """The sums of squares taken as gradients are staged are those of the gradient the step
    reads: double sums of fp32 squares (relative error ~1e-16 per term, far below the 1e-12
    asked), the same bits for 1 and 2 threads."""
    model = tiny(torch.bfloat16)
    norms = {}
    for threads in (1, 2):
        opt = OffloadOptimizer(
            [{"params": list(model.parameters()), "weight_decay": 0.0}],
            lr=0.0, betas=(0.9, 0.95), eps=1e-8, bucket_numel=3000, num_threads=threads,
        )  # fmt: skip
        x = batches(1)[0]
        model(x[:, :-1]).float().square().mean().backward()
        want = sum(float(opt.gradient(k).double().square().sum()) for k in range(len(opt.grads)))
        norms[threads] = opt.step()
        opt.close()
        assert norms[threads] ** 2 == pytest.approx(want, rel=1e-12)
    assert norms[1] == norms[2]


def _rank(rank: int, init: str, out) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        got = {}
        for fused in (True, False):
            model = tiny(torch.bfloat16)
            opt = OffloadOptimizer(
                [{"params": list(model.parameters()), "weight_decay": 0.1}],
                lr=1e-2, betas=(0.9, 0.95), eps=1e-8, bucket_numel=3000, max_norm=0.5,
                group=dist.group.WORLD, fused=fused,
            )  # fmt: skip
            norms = []
            for s, x in enumerate(batches(6, seed=rank)):  # 3 steps of 2 micro-batches
                opt.before_backward(last=s % 2 == 1)
                model(x[:, :-1]).float().square().mean().backward()
                if s % 2 == 1:
                    norms.append(opt.step())
                    opt.zero_grad()
            got[fused] = ([b.master.clone() for b in opt.buckets], norms)
            opt.close()
        same = (
            all(torch.equal(a, b) for a, b in zip(got[True][0], got[False][0], strict=True))
            and got[True][1] == got[False][1]
        )
        out.put((rank, same, got[True][1]))
    finally:
        dist.destroy_process_group()
    out.close()
    out.join_thread()
    os._exit(0)  # as in test_zero2.py: no interpreter teardown once the results are out


def test_zero2_fused_pass_gives_the_two_pass_bits(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    init = f"file://{tmp_path / 'init'}"
    procs = [ctx.Process(target=_rank, args=(r, init, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert [same for _, same, _ in got] == [True, True]
    assert got[0][2] == got[1][2]  # every rank has the same global norm
