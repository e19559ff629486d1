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
    assert off.host_bytes == pytest.approx(
        20 * 7e9
    )  # grads 4, masters 4, moments 8, bf16 2, staging 2
    dpu = estimate("offload+dpu", SEVEN_B, H100)
    assert dpu.host_bytes == pytest.approx(24 * 7e9)  # a second gradient buffer
    four = estimate("offload", Workload(**{**_fields(SEVEN_B), "world_size": 4}), H100)
    # ZeRO-2: every host buffer is the rank's slice; staging holds the reduced fp32 slice.
    assert four.host_bytes == pytest.approx((18 / 4 + 4 / 4) * 7e9)
    # The reduce-scatter and all-gather run in whole-bucket transients on the device.
    assert four.device_bytes == pytest.approx(2 * 7e9 + 2 * H100.bucket_bytes + act)


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
    out = run_cli("memory", "--params", "7e9", "--layers", "32", "--hidden", "4096")
    assert out.returncode == 0, out.stderr
    assert "offload" in out.stdout and "recommended: offload+dpu" in out.stdout
    bad = run_cli("memory", "--params", "7e9")
    assert bad.returncode == 2 and "missing: --layers, --hidden" in bad.stderr


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
