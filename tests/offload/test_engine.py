"""OffloadOptimizer against torch.optim.AdamW on a real model: parity with clipping and weight
decay groups, every micro-step of accumulation counted, bf16 working weights from fp32
masters, and exact resume through the trainer."""

from __future__ import annotations

import pytest
import torch

from slipstream.models import GPT, GPTConfig
from slipstream.offload.engine import OffloadOptimizer
from slipstream.train.optim import OptimConfig, build_optimizer
from tests.e2e.test_train import stop_and_resume


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=16))


def batches(n: int):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 64, (2, 16), generator=g) for _ in range(n)]


def train(model, opt, data, micro: int = 1, clip: float = 0.5) -> list[float]:
    losses = []
    for i in range(0, len(data), micro):
        for x in data[i : i + micro]:
            logits = model(x[:, :-1]).float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
            (loss / micro).backward()
            losses.append(loss.item())
        opt.step(clip)
        opt.zero_grad(set_to_none=True)
    return losses


def test_matches_torch_adamw_with_clipping_and_decay_groups_over_20_steps():
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, grad_clip=0.5)
    ref, off = tiny(), tiny()
    want = train(ref, build_optimizer(ref, cfg, torch.device("cpu")), batches(20))
    opt = build_optimizer(
        off,
        OptimConfig(**{**cfg.to_dict(), "offload": True, "offload_dtype": "fp32"}),
        torch.device("cpu"),
    )
    assert isinstance(opt, OffloadOptimizer)
    got = train(off, opt, batches(20))
    # fp32 on both sides; the host norm sums in double, torch's in fp32: ~1e-6 relative.
    assert got == pytest.approx(want, rel=1e-5)
    for a, b in zip(off.parameters(), ref.parameters(), strict=True):
        # Adam's m / sqrt(v) turns 1-ulp differences in tiny gradients into up to ~1e-3 of a
        # step; steps are lr = 1e-2: so 1e-5 absolute after 20 steps.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _accumulate(model, opt, data, micro: int) -> list[torch.Tensor]:
    """One step's backward passes over `data` in `micro` micro-batches, without stepping:
    the host's accumulated fp32 gradient, bucket by bucket."""
    for x in data:
        logits = model(x[:, :-1]).float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        (loss / micro).backward()
    opt.finish_backward()
    return [opt.gradient(k) for k in range(len(opt.buckets))]


def test_every_micro_step_of_accumulation_counts():
    """Checked where the two sides must agree, the accumulated gradient, not along a
    trajectory: Adam's first update is lr * g / (|g| + eps), which turns a last-bit difference
    in a tiny gradient into up to lr / eps (1e6) times as much weight difference, and how the
    last bits fall depends on the CPU's instruction set."""
    cfg = OptimConfig(lr=1e-2, offload=True, offload_dtype="fp32")
    one, two = tiny(), tiny()
    data = batches(4)
    opt_one, opt_two = (build_optimizer(m, cfg, torch.device("cpu")) for m in (one, two))
    got = _accumulate(one, opt_one, data, micro=4)
    # The same four batches as two micro-steps of twice the batch: the same gradient.
    merged = [torch.cat(data[i : i + 2]) for i in range(0, 4, 2)]
    want = _accumulate(two, opt_two, merged, micro=2)
    for a, b in zip(got, want, strict=True):
        # Each element sums a few hundred fp32 products in another order (and the 1/4 and 1/2
        # scales are exact): a relative error of a few 1e-7 of the largest element.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    # Dropping all but the last micro-step (DeepSpeed issue 7967's bug) gives another one.
    three = tiny()
    dropped = _accumulate(three, build_optimizer(three, cfg, torch.device("cpu")), merged[1:], 2)
    assert not all(torch.allclose(a, b, rtol=1e-2) for a, b in zip(dropped, want, strict=True))
    # Then one step from the same gradient is the same update, bit for bit.
    for k, gt in enumerate(opt_two.grads):
        gt.clear()
        for j in range(len(gt.segments)):
            gt.put(j, gt.seg(got[k], j), last=True)
    opt_one.step(0.5)
    opt_two.step(0.5)
    assert all(torch.equal(a, b) for a, b in zip(one.parameters(), two.parameters(), strict=True))


def _train_early(model, opt, data, micro: int, early: bool) -> None:
    """Steps of `micro` micro-batches; `early`: announce the last backward, as the trainer does."""
    for i in range(0, len(data), micro):
        for j, x in enumerate(data[i : i + micro]):
            logits = model(x[:, :-1]).float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
            if early:
                opt.before_backward(last=j == micro - 1)
            (loss / micro).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _small_buckets(model, dtype: torch.dtype, clip: float) -> OffloadOptimizer:
    model.to(dtype)  # several buckets, so most step while backward still runs
    groups = [{"params": list(model.parameters()), "weight_decay": 0.1}]
    return OffloadOptimizer(
        groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, bucket_numel=3000, max_norm=clip
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_buckets_step_during_backward_without_clipping_bit_for_bit(dtype):
    runs = {}
    for early in (False, True):
        model = tiny()
        opt = _small_buckets(model, dtype, clip=float("inf"))
        _train_early(model, opt, batches(6), micro=2, early=early)
        runs[early] = (model, opt.early_steps, len(opt.buckets))
        opt.close()
    (plain, none, _), (early, stepped, buckets) = runs[False], runs[True]
    assert buckets > 3 and none == 0 and stepped == 3 * buckets  # every bucket, every step
    for a, b in zip(plain.parameters(), early.parameters(), strict=True):
        assert torch.equal(a, b)
    # With clipping the scale waits for the last bucket: nothing steps early.
    model = tiny()
    opt = _small_buckets(model, dtype, clip=1.0)
    _train_early(model, opt, batches(2), micro=2, early=True)
    assert opt.early_steps == 0


def test_bf16_working_weights_come_from_fp32_masters():
    model = tiny()
    opt = build_optimizer(model, OptimConfig(lr=1e-3, offload=True), torch.device("cpu"))
    train(model, opt, batches(3))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for b in opt.buckets:
        for i, p in enumerate(b.params):
            master = b.view(b.master, i)
            assert torch.equal(p.detach(), master.to(torch.bfloat16))  # rounded once, from fp32
    # The masters keep what bf16 cannot: small updates accumulate there.
    assert any(not torch.equal(b.master, b.master.to(torch.bfloat16).float()) for b in opt.buckets)


def test_gradients_leave_the_model_during_backward():
    model = tiny()
    opt = build_optimizer(
        model, OptimConfig(offload=True, offload_dtype="fp32"), torch.device("cpu")
    )
    x = batches(1)[0]
    torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(opt.gradient(k).abs().sum() > 0 for k in range(len(opt.buckets)))


def test_trainer_with_offload_resumes_exactly(tmp_path):
    want, got = stop_and_resume(tmp_path, ["optim.offload=true", "train.eval_every=0"], 3)
    # The masters and moments are in the checkpoint: the resumed run continues bit for bit.
    assert got == want
    assert want[-1] < want[0]


def test_delayed_update_matches_a_one_step_delayed_torch_adamw():
    import copy

    start, steps = 3, 12
    cfg = OptimConfig(
        lr=1e-2, offload=True, offload_dtype="fp32", delayed_update=True, delayed_update_start=start
    )
    model = tiny()
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    got = train(model, opt, batches(steps))
    opt.flush()
    # The reference: torch AdamW steps a master copy; the model that computes gradients holds
    # the master's weights until `start`, then the master's previous weights (one behind).
    work, master = tiny(), tiny()
    ref_opt = build_optimizer(master, OptimConfig(lr=1e-2), torch.device("cpu"))
    want = []
    for k, x in enumerate(batches(steps)):
        logits = work(x[:, :-1]).float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        want.append(loss.item())
        for pw, pm in zip(work.parameters(), master.parameters(), strict=True):
            pm.grad, pw.grad = pw.grad, None
        previous = copy.deepcopy(master.state_dict())
        ref_opt.step(0.5)
        ref_opt.zero_grad()
        work.load_state_dict(master.state_dict() if k < start else previous)
    assert got == pytest.approx(want, rel=1e-5)
    # Without the delay the losses differ after `start` (so the check above can fail).
    plain = tiny()
    undelayed = train(
        plain,
        build_optimizer(
            plain, OptimConfig(lr=1e-2, offload=True, offload_dtype="fp32"), torch.device("cpu")
        ),
        batches(steps),
    )
    # The first delayed step still sees current weights; the one after sees stale ones.
    assert undelayed[: start + 1] == pytest.approx(got[: start + 1], rel=1e-5)
    assert undelayed[start + 1 :] != pytest.approx(got[start + 1 :], rel=1e-3)
    # After the flush the model holds the master's last weights.
    for b in opt.buckets:
        for i, p in enumerate(b.params):
            assert torch.equal(p.detach(), b.view(b.master, i))


def test_trainer_with_delayed_update_resumes_exactly(tmp_path):
    args = ["optim.offload=true", "optim.delayed_update=true", "optim.delayed_update_start=1"]
    # Checkpoints finish the update in flight: both runs checkpoint at step 3.
    want, got = stop_and_resume(
        tmp_path, [*args, "train.eval_every=0", "train.checkpoint_every=3"], 3
    )
    assert got == want


def test_gradient_copies_are_their_own_phase_in_the_step_breakdown(tmp_path):
    from slipstream.config import RunConfig
    from slipstream.train import Trainer
    from tests.e2e.test_train import write_recipe

    recipe = write_recipe(tmp_path)
    off = RunConfig.load(recipe, ["optim.offload=true", f"train.out_dir='{tmp_path / 'o'}'"])
    rows = Trainer(off).fit()
    assert all(r["time/grad_offload_s"] > 0 for r in rows)
    assert all(r["time/grad_offload_s"] < r["time/step_s"] for r in rows)
    # The host step's own figures ride in every row: bf16 (the default), two micro-batches per
    # step in this recipe: the staged gradient (2), the fp32 sum of the first (4), master and
    # moments (24), the bf16 copy (2).
    assert all(r["offload/host_bytes_per_param"] == 32 for r in rows)
    assert all(r["offload/host_step_s"] > 0 and r["offload/host_gb_per_s"] > 0 for r in rows)
    plain = RunConfig.load(recipe, [f"train.out_dir='{tmp_path / 'p'}'"])
    plain_rows = Trainer(plain).fit()
    assert all(r["time/grad_offload_s"] == 0 for r in plain_rows)
    assert not any(k.startswith("offload/") for k in plain_rows[0])


@pytest.mark.parametrize(("fused", "micro", "want"), [(True, 1, 28), (True, 2, 32),
                                                      (False, 1, 44), (False, 2, 44)])  # fmt: skip
def test_the_engine_reports_its_host_bytes_and_seconds(fused, micro, want):
    """Bytes per parameter of the host step as counted in `host_bytes_per_param` (bf16:
    fused 2 + 24 + 2, plus the fp32 sum read with accumulation; two-pass the add 10, the
    norm 4 and the fp32 step 30), and the seconds HostAdamW spent since the last report."""
    model = tiny().to(torch.bfloat16)
    groups = [{"params": list(model.parameters()), "weight_decay": 0.1}]
    opt = OffloadOptimizer(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    assert opt.stats()["offload/host_step_s"] == 0  # nothing stepped yet
    _train_early(model, opt, batches(2 * micro), micro=micro, early=True)
    row = opt.stats()
    assert row["offload/host_bytes_per_param"] == want
    assert row["offload/host_step_s"] > 0 and row["offload/host_gb_per_s"] > 0
    assert opt.stats()["offload/host_step_s"] == 0  # reported once
    opt.close()


def scaled_train(model, opt, data) -> list[float]:
    """A loop that scales the loss as the trainer does under fp16."""
    losses = []
    for x in data:
        logits = model(x[:, :-1]).float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        (loss * opt.loss_scale).backward()
        losses.append(loss.item())
        opt.step(1.0)
        opt.zero_grad(set_to_none=True)
    return losses


def test_fp16_working_weights_train_with_dynamic_loss_scaling():
    model = tiny()
    opt = build_optimizer(
        model, OptimConfig(lr=1e-2, offload=True, offload_dtype="fp16"), torch.device("cpu")
    )
    assert opt.loss_scale == 2.0**16
    data = batches(1) * 12  # one batch, learned by heart: the loss must fall
    losses = scaled_train(model, opt, data)
    assert losses[-1] < losses[0] - 0.5
    ref = tiny()
    fp32 = OptimConfig(lr=1e-2, offload=True, offload_dtype="fp32")
    want = scaled_train(ref, build_optimizer(ref, fp32, torch.device("cpu")), data)
    # fp16 weights (11-bit mantissa) follow the fp32 run to ~1e-2 over 12 steps.
    assert losses == pytest.approx(want, rel=2e-2)
    for b in opt.buckets:
        for i, p in enumerate(b.params):
            assert p.dtype == torch.float16
            assert torch.equal(p.detach(), b.view(b.master, i).half())


def test_an_overflowing_step_is_skipped_and_the_scale_halved():
    model = tiny()
    opt = build_optimizer(
        model, OptimConfig(lr=1e-2, offload=True, offload_dtype="fp16"), torch.device("cpu")
    )
    scaled_train(model, opt, batches(2))
    before = [p.detach().clone() for p in model.parameters()]
    steps = [int(opt.host.state[b.master]["step"]) for b in opt.buckets]
    opt.scaler.scale = 1e30  # fp16 gradients of a loss this large are inf
    scaled_train(model, opt, batches(1))
    assert opt.loss_scale == 5e29  # halved
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert [int(opt.host.state[b.master]["step"]) for b in opt.buckets] == steps  # no Adam step


def test_trainer_with_fp16_offload_resumes_exactly(tmp_path):
    args = ["optim.offload=true", "optim.offload_dtype='fp16'", "train.eval_every=0"]
    want, got = stop_and_resume(tmp_path, args, 3)
    assert got == want  # the loss scale is in the checkpoint too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_copy_stream_path_matches_torch_adamw_with_accumulation():
    """On CUDA, gradients go through the side stream and pinned staging (streams.py); a
    parameter without a gradient leaves its bucket partly filled: the next micro-step adds
    what is staged before overwriting a slot, and `wait()` completes the bucket.

    Checked where the two sides must agree, not along a trajectory: on an H200 (torch 2.11)
    the losses of a 6-step run drifted 2.7e-4 apart. The embedding's backward adds with
    atomics on a GPU, in no fixed order, and Adam turns last-bit differences of small
    gradients into whole steps, so trajectories part even between two runs of one optimizer.
    Here: every micro-step's gradient lands in the host buffers (same kernels, so equal but
    for that order), then one step matches torch's AdamW."""
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    ref, off = tiny().to(dev), tiny().to(dev)
    for m in (ref, off):
        m.register_parameter("unused", torch.nn.Parameter(torch.ones(3, device=dev)))
    ref_opt = build_optimizer(ref, cfg, dev)
    opt = build_optimizer(
        off, OptimConfig(**{**cfg.to_dict(), "offload": True, "offload_dtype": "fp32"}), dev
    )
    for model in (ref, off):
        for x in batches(2):  # two micro-steps, accumulated
            x = x.to(dev)
            logits = model(x[:, :-1]).float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
            (loss / 2).backward()
    opt.wait_grads()
    assert opt.mover.cuda and opt.mover.copy_s > 0
    want = {id(o): r.grad for o, r in zip(off.parameters(), ref.parameters(), strict=True)}
    for k, b in enumerate(opt.buckets):
        for i, p in enumerate(b.params):
            g = want[id(p)]
            expect = torch.zeros(p.shape) if g is None else g.cpu()  # "unused": zeros
            torch.testing.assert_close(b.view(opt.gradient(k), i), expect, rtol=1e-5, atol=1e-7)
            assert p.grad is None  # the device copy was freed
    ref_opt.step()
    opt.step()
    for a, b in zip(off.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_staged_gradients_are_added_only_where_a_gradient_was_written():
    """On CUDA a bucket's copies land in its staging buffer; when `wait()` completes a bucket
    some parameter of which got no gradient, that parameter's slot holds an older backward's
    gradient (or nothing) and must not be counted (HostGrad.landed with those slots only)."""
    from slipstream.offload.buckets import make_bucket
    from slipstream.offload.grads import HostGrad
    from slipstream.offload.host_adam import HostAdamW

    params = [torch.nn.Parameter(torch.zeros(s)) for s in (3, 4, 5)]
    bucket = make_bucket(params, 1, 0, None)
    grad = HostGrad(bucket, 1, True, HostAdamW([bucket.master]), pin=False)
    grad.buf.copy_(torch.arange(12, dtype=torch.float32) + 1)  # every slot holds something
    staged = grad.buf.clone()
    grad.landed([0, 2], last=False)  # an earlier micro-step: into the fp32 sum
    got = grad.gradient()
    assert torch.equal(bucket.view(got, 1), torch.zeros(4))  # the stale slot stayed out
    assert torch.equal(bucket.view(got, 0), bucket.view(staged, 0))
    assert torch.equal(bucket.view(got, 2), bucket.view(staged, 2))
    grad.landed([0, 1, 2], last=True)  # the last: stays staged, read by the step
    got = grad.gradient()
    assert torch.equal(bucket.view(got, 1), bucket.view(staged, 1))
    assert torch.equal(bucket.view(got, 0), 2 * bucket.view(staged, 0))
    (src, acc), sq = grad.finish()
    assert src is grad.buf and acc is not None
    assert sq == pytest.approx(float(got.double().square().sum()), rel=1e-12)
