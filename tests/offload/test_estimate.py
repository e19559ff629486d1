"""The memory planner's arithmetic, its recommendation, and `slipstream memory`."""

from __future__ import annotations

import pytest

from slipstream.offload.estimate import GIB, Hardware, Workload, estimate, plan
from tests.conftest import run_cli

SEVEN_B = Workload(
    num_params=7e9, num_layers=32, width=4096, vocab_size=32_000, seq_len=4096, micro_batch=1
)
H100 = Hardware(device_bytes=80 * GIB, host_bytes=512 * GIB, device_flops=400e12)


def test_bytes_per_parameter_follow_the_table():
    from slipstream.offload.estimate import activation_bytes

    act = activation_bytes(SEVEN_B, checkpointing=False)
    # plain: weights and moments (12), then activations or gradients (4), whichever is larger:
    # backward makes the gradients as it frees the activations.
    plain = estimate("plain", SEVEN_B, H100).device_bytes
    assert plain == pytest.approx(12 * 7e9 + max(act, 4 * 7e9))
    off = estimate("offload", SEVEN_B, H100)
    assert off.device_bytes == pytest.approx(2 * 7e9 + H100.bucket_bytes + act)
    # masters 4, moments 8, bf16 weights 2, the staged bf16 gradient 2 (no fp32 gradient)
    assert off.host_bytes == pytest.approx(16 * 7e9)
    dpu = estimate("offload+dpu", SEVEN_B, H100)
    assert dpu.host_bytes == pytest.approx(18 * 7e9)  # a second staged gradient
    accum = Workload(**{**_fields(SEVEN_B), "accum_steps": 4})
    assert estimate("offload", accum, H100).host_bytes == pytest.approx(20 * 7e9)  # fp32 sum
    assert estimate("offload+dpu", accum, H100).host_bytes == pytest.approx(26 * 7e9)
    four = estimate("offload", Workload(**{**_fields(SEVEN_B), "world_size": 4}), H100)
    # ZeRO-2: every host buffer is the rank's slice; the stage holds the reduced fp32 slice.
    assert four.host_bytes == pytest.approx(18 / 4 * 7e9)
    # The reduce-scatter and all-gather run in whole-bucket transients on the device.
    assert four.device_bytes == pytest.approx(2 * 7e9 + 2 * H100.bucket_bytes + act)


@pytest.mark.parametrize("accum,delayed", [(1, False), (1, True), (3, False), (3, True)])
def test_the_planner_counts_what_the_engine_allocates_on_the_host(accum, delayed):
    """The host column against the engine's own buffers (all in the huge-page allocator,
    which counts them): a bf16 model of large matrices (nothing below the allocator's
    threshold), after steps that fill every buffer (the delayed update's second set too)."""
    import gc

    import torch

    from slipstream.offload import hostmem
    from slipstream.offload.engine import OffloadOptimizer
    from slipstream.offload.estimate import offload_host_bytes

    torch.manual_seed(0)
    # Two buckets of 2**20 parameters: every buffer at least one huge page (bf16: 2 MiB).
    model = torch.nn.Linear(1024, 2048, bias=False).to(torch.bfloat16)
    gc.collect()  # an earlier test's engine frees its buffers when it is collected
    before = hostmem.live_bytes()
    groups = [{"params": list(model.parameters()), "weight_decay": 0.1}]
    opt = OffloadOptimizer(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                           delayed_update=delayed, bucket_numel=2**20)  # fmt: skip
    for _ in range(3):
        for i in range(accum):
            opt.before_backward(last=i == accum - 1)
            model(torch.randn(4, 1024, dtype=torch.bfloat16)).float().square().sum().backward()
        opt.step()
        opt.zero_grad()
    opt.flush()
    n = sum(p.numel() for p in model.parameters())
    w = Workload(num_params=n, num_layers=1, width=512, vocab_size=1, seq_len=1,
                 micro_batch=1, accum_steps=accum)  # fmt: skip
    assert hostmem.live_bytes() - before == offload_host_bytes(w, delayed) * n
    opt.close()


def test_step_time_overlaps_as_each_mode_can():
    """Plain offload adds the host step and the weights' return to the step; early bucket
    steps hide the host step under backward; the delayed update under the whole step; none
    beats the physical limit (the largest resource), and on a CPU nothing overlaps."""
    from slipstream.offload.estimate import host_pass_bytes, step_time

    w = Workload(num_params=1.3e9, num_layers=24, width=2048, vocab_size=50_257,
                 seq_len=2048, micro_batch=8)  # fmt: skip
    hw = Hardware(device_bytes=140 * GIB, host_bytes=1e12, device_flops=400e12,
                  host_bytes_per_s=50e9, link_bytes_per_s=25e9)  # fmt: skip
    plain, early, delayed = (step_time(w, hw, m) for m in ("plain", "early", "delayed"))
    compute = 6 * 1.3e9 * 16_384 / 400e12
    host = 28 * 1.3e9 / 50e9  # 28 bytes per parameter, one micro-batch
    back = 2 * 1.3e9 / 25e9  # the bf16 weights
    assert host_pass_bytes(w) == 28
    assert plain.compute_s == pytest.approx(compute) and plain.host_s == pytest.approx(host)
    assert plain.step_s == pytest.approx(compute + host + back)  # the copies out beside backward
    assert early.step_s == pytest.approx(compute / 3 + max(2 * compute / 3, host) + back)
    assert delayed.step_s == pytest.approx(max(compute, host) + back)
    assert plain.bound == "host" and plain.limit_s == pytest.approx(host)
    assert plain.limit_s <= delayed.step_s <= early.step_s <= plain.step_s
    cpu = Hardware(**{**{k: getattr(hw, k) for k in hw.__dataclass_fields__},
                      "separate_device": False})  # fmt: skip
    for mode in ("plain", "early", "delayed"):
        assert step_time(w, cpu, mode, compute_s=2.0).step_s == pytest.approx(
            2.0 + host + 4 * 1.3e9 / 25e9
        )
    accum = Workload(**{**_fields(w), "accum_steps": 4})
    # Each of the 3 earlier micro-batches is added into the fp32 sum (2 + 8), the step reads it
    assert host_pass_bytes(accum) == 28 + 3 * 10 + 4
    assert step_time(accum, hw).compute_s == pytest.approx(4 * compute)
    with pytest.raises(ValueError, match="mode"):
        step_time(w, hw, "sideways")


def test_checkpointing_keeps_less_and_runs_the_forward_twice():
    plain, ckpt = estimate("offload", SEVEN_B, H100), estimate("offload+ckpt", SEVEN_B, H100)
    assert ckpt.device_bytes < plain.device_bytes and ckpt.step_s > plain.step_s


def test_the_delayed_update_hides_the_host_step_under_compute():
    a, b = estimate("offload", SEVEN_B, H100), estimate("offload+dpu", SEVEN_B, H100)
    assert b.step_s < a.step_s and b.device_bytes == a.device_bytes


def test_recommends_the_fastest_available_strategy_that_fits():
    rows, best = plan(SEVEN_B, H100)
    assert not rows[0].fits  # 7B x 16 bytes does not fit 80 GiB
    assert best is not None and best.strategy == "offload+dpu"  # the host step hidden
    small = Workload(
        num_params=1e8, num_layers=12, width=768, vocab_size=50_257, seq_len=1024, micro_batch=8
    )
    assert plan(small, H100)[1].strategy == "plain"  # plain is fastest when it fits
    tiny_host = Hardware(device_bytes=80 * GIB, host_bytes=1 * GIB, device_flops=400e12)
    assert plan(SEVEN_B, tiny_host)[1] is None


def test_cli_prints_the_table_and_the_choice():
    out = run_cli("memory", "--params", "7e9", "--layers", "32", "--hidden", "4096",
                  "--host-gbps", "40")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "offload" in out.stdout and "recommended: offload+dpu" in out.stdout
    text = " ".join(out.stdout.split())  # rich wraps long lines
    assert "80 GiB" in text and "256 GiB of host memory" in text and "40.0 GB/s (given)" in text
    assert "(28 bytes per parameter)" in text and "the limit" in text


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("--host-gbps", "fast"), "--host-gbps"),
        (("--host-gbps", "-1"), "--host-gbps"),
        (("--accum", "0"), "--accum"),
        ((), "missing: --layers, --hidden"),
    ],
)
def test_cli_mistakes_are_one_line(capsys, args, said):
    from slipstream.cli import main

    shape = ("--layers", "32", "--hidden", "4096") if args else ()
    try:
        status = main(["memory", "--params", "7e9", *shape, *args])
    except SystemExit as e:  # argparse's own errors (a value that is not a number)
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and said in err, err
    assert "Traceback" not in err


def _fields(w: Workload) -> dict:
    return {k: getattr(w, k) for k in w.__dataclass_fields__}


def test_a_recipe_is_counted_and_its_activations_measured_on_the_meta_device(tmp_path):
    from tests.e2e.test_train import write_recipe

    out = run_cli("memory", str(write_recipe(tmp_path)), "--device-gib", "1", "--host-gib", "1")
    assert out.returncode == 0, out.stderr
    # The recipe's GPT: 2 layers, 32 wide, byte vocabulary (257): its exact parameter count.
    from slipstream.models import GPT, GPTConfig

    n = GPT(GPTConfig(vocab_size=257, n_layer=2, n_head=2, d_model=32, max_seq_len=64)).num_params()
    assert f"{n / 1e6:,.1f}M parameters" in out.stdout and "recommended: plain" in out.stdout


def test_saved_activations_are_counted_without_the_weights():
    import torch

    from slipstream.models import GPT, GPTConfig
    from slipstream.tools.memory import saved_activation_bytes

    cfg = GPTConfig(vocab_size=100, n_layer=2, n_head=2, d_model=32, max_seq_len=16)
    one, two, three = (saved_activation_bytes(cfg, b, 16, torch.float32) for b in (1, 2, 3))
    # Activations grow with the batch (about linearly: a few saved buffers are padded).
    assert two - one > 0 and abs((three - two) - (two - one)) < 0.1 * (two - one)
    # What does not grow with the batch is small: the weights (which autograd also saves)
    # are not counted.
    weights = GPT(cfg).num_params() * 4
    assert 0 <= 2 * one - two < weights / 4
    assert saved_activation_bytes(cfg, 1, 16, torch.bfloat16) < one


def test_meta_trace_counts_attention_as_the_fused_kernels_keep_it():
    """The meta device runs SDPA's math path (which keeps the [T, T] scores); the planner counts
    what the fused kernels a real run takes keep. Checked against a real forward on the CPU,
    whose flash kernel keeps q, k, v, the output and a log-sum-exp per row."""
    import torch

    from slipstream.models import GPTConfig
    from slipstream.tools.memory import saved_activation_bytes

    for dtype in (torch.float32, torch.bfloat16):
        cfg = GPTConfig(vocab_size=512, n_layer=2, n_head=4, d_model=128, max_seq_len=256)
        meta = saved_activation_bytes(cfg, 2, 256, dtype)
        real = saved_activation_bytes(cfg, 2, 256, dtype, device="cpu")
        assert abs(meta - real) < 0.05 * real, (dtype, meta, real)


def test_trace_under_autocast_counts_the_weight_copies_it_keeps():
    """Plain mixed precision (fp32 weights under bf16 autocast) keeps a bf16 copy of each
    matmul weight for backward: the trace on a real device counts them; the meta device
    cannot run autocast and says so."""
    import pytest
    import torch

    from slipstream.models import GPT, GPTConfig
    from slipstream.tools.memory import saved_activation_bytes

    cfg = GPTConfig(vocab_size=512, n_layer=2, n_head=4, d_model=128, max_seq_len=256)
    bf16 = saved_activation_bytes(cfg, 2, 256, torch.bfloat16, device="cpu")
    mixed = saved_activation_bytes(
        cfg, 2, 256, torch.float32, device="cpu", autocast=torch.bfloat16
    )
    matmul_weights = sum(p.numel() for p in GPT(cfg).parameters() if p.dim() == 2)
    # The copies, and little else: the activations themselves are bf16 under autocast (an
    # fp32 trace would keep about twice the bf16 one's).
    assert 2 * matmul_weights * 0.9 <= mixed - bf16 <= 2 * matmul_weights * 1.5
    with pytest.raises(ValueError, match="autocast needs a real device"):
        saved_activation_bytes(cfg, 2, 256, torch.float32, autocast=torch.bfloat16)


def test_a_recipe_can_be_traced_on_a_real_device(tmp_path):
    """`--trace-device cpu` (or cuda on a GPU machine) runs the recipe's forward there and
    counts what that device's kernels keep; the meta count agrees with the CPU's within 5%.
    A device this machine lacks, or no device at all, is refused with the reason."""
    import argparse

    import pytest
    import torch

    from slipstream.tools.memory import trace_device, workload_from_recipe
    from tests.e2e.test_train import write_recipe

    recipe = write_recipe(tmp_path)
    got = {}
    for device in ("meta", "cpu"):
        args = argparse.Namespace(recipe=recipe, set=[], ranks=1, trace_device=device)
        got[device] = workload_from_recipe(args)
    meta, cpu = got["meta"].saved_bytes, got["cpu"].saved_bytes
    assert cpu > 0 and abs(meta - cpu) < 0.05 * cpu
    with pytest.raises(ValueError, match="not a device"):
        trace_device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device here"):
            trace_device("cuda")
    out = run_cli("memory", str(recipe), "--trace-device", "nowhere")
    assert out.returncode != 0 and "--trace-device 'nowhere'" in out.stderr
