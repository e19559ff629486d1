"""ZeRO-2 with offload across 2 ranks (gloo, under torchrun) against one process with the same
global batch, and resume across world sizes; bad settings get clear errors."""

from __future__ import annotations

import pytest

from slipstream.config import RunConfig
from slipstream.train import Trainer
from tests.e2e.test_train import losses, slipstream, torchrun, write_recipe

OFFLOAD = ["--set", "optim.offload=true", "--set", "train.eval_every=0"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> list[float]:
    """Offload in one process: 2 micro-batches of 2 rows per step."""
    tmp = tmp_path_factory.mktemp("one")
    cfg = RunConfig.load(
        write_recipe(tmp),
        ["optim.offload=true", "train.eval_every=0", f"train.out_dir='{tmp / 'run'}'"],
    )
    return [r["loss"] for r in Trainer(cfg).fit()]


def test_two_ranks_with_sharded_host_state_match_one_process(tmp_path, one_process):
    recipe = write_recipe(tmp_path, "two.toml", num_micro_batches=1)  # 2 ranks x 2 rows
    out = torchrun(
        recipe,
        *OFFLOAD,
        "--set",
        "optim.zero_stage=2",
        "--set",
        f"train.out_dir='{tmp_path / 'z'}'",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # Each rank steps half of every bucket; the reduce-scatter sums what one process
    # accumulates over its two micro-batches. bf16 working weights on both sides, rounded
    # from the same fp32 masters: the losses agree to fp32 noise.
    assert losses(tmp_path / "z") == pytest.approx(one_process, rel=1e-5)


def test_one_process_checkpoint_resumes_on_two_sharded_ranks(tmp_path, one_process):
    run = tmp_path / "run"
    first = RunConfig.load(
        write_recipe(tmp_path),
        [
            "optim.offload=true",
            "train.eval_every=0",
            f"train.out_dir='{run}'",
            "train.stop_at_step=3",
        ],
    )
    Trainer(first).fit()
    recipe = write_recipe(tmp_path, "two.toml", num_micro_batches=1)
    out = torchrun(
        recipe,
        *OFFLOAD,
        "--set",
        "optim.zero_stage=2",
        "--resume",
        "--set",
        f"train.out_dir='{run}'",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # The checkpoint holds the full host state; two ranks each take their half of it.
    assert losses(run) == pytest.approx(one_process, rel=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.zero_stage=2"], "optim.zero_stage: 2 is implemented by the offload engine"),
        (["optim.offload=true", "optim.zero_stage=2"], "this run has one; run under torchrun"),
        (["optim.zero_stage=3"], "optim.zero_stage: 3; use 0 or 2"),
    ],
)
def test_bad_offload_settings_say_what_to_do(tmp_path, overrides, message):
    args = [a for o in overrides for a in ("--set", o)]
    out = slipstream("train", str(write_recipe(tmp_path)), *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_delayed_update_on_two_sharded_ranks_matches_one_process(tmp_path):
    dpu = ["optim.offload=true", "optim.delayed_update=true", "optim.delayed_update_start=2"]
    one = RunConfig.load(
        write_recipe(tmp_path), [*dpu, "train.eval_every=0", f"train.out_dir='{tmp_path / 'one'}'"]
    )
    want = [r["loss"] for r in Trainer(one).fit()]
    recipe = write_recipe(tmp_path, "two.toml", num_micro_batches=1)
    args = [a for o in [*dpu, "optim.zero_stage=2", "train.eval_every=0"] for a in ("--set", o)]
    out = torchrun(recipe, *args, "--set", f"train.out_dir='{tmp_path / 'z'}'")
    assert out.returncode == 0, out.stderr[-3000:]
    assert losses(tmp_path / "z") == pytest.approx(want, rel=1e-5)  # as in the test above


def test_sharded_checkpoint_resumes_in_one_process_and_on_two_ranks(tmp_path, one_process):
    """Two ranks save their own slices (one file each, no gather); one process and two ranks
    both resume from them exactly."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path, "two.toml", num_micro_batches=1)
    zero2 = [*OFFLOAD, "--set", "optim.zero_stage=2", "--set", f"train.out_dir='{run}'"]
    out = torchrun(recipe, *zero2, "--set", "train.stop_at_step=3")
    assert out.returncode == 0, out.stderr[-3000:]
    (saved,) = sorted((run / "checkpoints").glob("step_*"))
    assert sorted(p.name for p in saved.glob("optimizer*")) == [
        "optimizer.shard0.pt",
        "optimizer.shard1.pt",
    ]
    import shutil

    one = tmp_path / "one"
    shutil.copytree(run, one)
    resumed = RunConfig.load(
        write_recipe(tmp_path),
        ["optim.offload=true", "train.eval_every=0", f"train.out_dir='{one}'"],
    )
    Trainer(resumed, resume=True).fit()
    assert losses(one) == pytest.approx(one_process, rel=1e-5)
    out = torchrun(recipe, *zero2, "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    assert losses(run) == pytest.approx(one_process, rel=1e-5)
