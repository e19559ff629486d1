"""`slipstream train` end to end: a CLI run, exact resume, and 2 ranks under torchrun matching
one process with the same global batch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from slipstream.config import RunConfig
from slipstream.train import Trainer
from tests.conftest import corpus_spec, run_cli

ROOT = Path(__file__).resolve().parents[2]


def write_recipe(tmp_path: Path, name: str = "recipe.toml", **data_overrides) -> Path:
    shape = {
        "seq_len": 64,
        "micro_batch_size": 2,
        "num_micro_batches": 2,
        "holdout_fraction": 0.1,
    }
    data = corpus_spec(tmp_path, "jsonl", **{**shape, **data_overrides})
    data["backend"] = {"num_workers": 1, "prefetch_steps": 2}
    lines = [
        "[model]",
        "n_layer = 2",
        "n_head = 2",
        "d_model = 32",
        "max_seq_len = 64",
        "",
        "[optim]",
        "lr = 3e-3",
        "warmup_steps = 2",
        "",
        "[train]",
        "steps = 6",
        f'out_dir = "{tmp_path / "run"}"',
        "eval_every = 3",
        "eval_steps = 1",
        "checkpoint_every = 3",
        "log_every = 1",
        "sample_tokens = 8",
        "num_threads = 1",
        "",
        "[data]",
    ]
    for k, v in data.items():
        if k not in ("sources", "backend"):
            lines.append(f"{k} = {json.dumps(v)}")
    lines += ["[data.backend]", "num_workers = 1", "prefetch_steps = 2"]
    for s in data["sources"]:
        lines += ["[[data.sources]]"] + [f"{k} = {json.dumps(v)}" for k, v in s.items()]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


slipstream = run_cli


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


def torchrun(
    recipe: Path, *args: str, nproc: int = 2, module: tuple[str, ...] = ("slipstream", "train")
) -> subprocess.CompletedProcess:
    """`slipstream train RECIPE ARGS` on `nproc` ranks (gloo) under torchrun."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        *module,
        str(recipe),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory) -> list[float]:
    """The default recipe's 6 losses, one process, uninterrupted (the corpus is seeded, so any
    folder holds the same one)."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = RunConfig.load(write_recipe(tmp), [f"train.out_dir='{tmp / 'run'}'"])
    return [r["loss"] for r in Trainer(cfg).fit()]


def test_train_cli_runs_evaluates_checkpoints_and_reports(tmp_path):
    out = slipstream("train", str(write_recipe(tmp_path)))
    assert out.returncode == 0, out.stderr
    run = tmp_path / "run"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[2]["eval_loss"] > 0 and "time/data_wait_s" in rows[0]
    # The overall loss is the per-source losses weighted by their targets.
    names = [k.split("/")[1] for k in rows[2] if k.startswith("eval_loss/")]
    counts = [rows[2][f"eval_targets/{n}"] for n in names]
    mean = sum(c * rows[2][f"eval_loss/{n}"] for n, c in zip(names, counts)) / sum(counts)
    assert len(names) >= 2 and rows[2]["eval_loss"] == pytest.approx(mean, rel=1e-9)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_00000003",
        "step_00000006",
    ]
    # The recipe says vocab_size = 0 (the tokenizer's); what it resolved to is saved beside it.
    assert json.loads((run / "config.json").read_text())["model"]["vocab_size"] == 0
    resolved = json.loads((run / "resolved.json").read_text())
    assert resolved["model"]["vocab_size"] == 257 and resolved["data"]["dp_world_size"] == 1
    assert 0 < rows[2]["eval_bpb"] < 12 and "eval_bpb/short" in rows[2]
    assert "-bound:" in out.stdout and "step breakdown" in out.stdout
    assert "sample" in out.stdout


def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path, reference_losses):
    first = RunConfig.load(
        write_recipe(tmp_path), [f"train.out_dir='{tmp_path / 'b'}'", "train.stop_at_step=4"]
    )
    Trainer(first).fit()
    second = RunConfig.load(write_recipe(tmp_path), [f"train.out_dir='{tmp_path / 'b'}'"])
    Trainer(second, resume=True).fit()
    got = losses(tmp_path / "b")
    assert len(got) == 6
    # CPU, fp32, same kernels in the same order: resume is exact, 1e-6 leaves room for nothing
    # but a changed thread count.
    assert got == pytest.approx(reference_losses, rel=1e-6, abs=1e-6)


def test_two_ranks_under_torchrun_match_one_process(tmp_path, reference_losses):
    # Same rows per step (2 ranks x 2 rows x 1 micro-batch = 1 rank x 2 rows x 2 micro-batches)
    recipe = write_recipe(tmp_path, "two.toml", num_micro_batches=1)
    out = torchrun(recipe, "--set", f"train.out_dir='{tmp_path / 'two'}'")
    assert out.returncode == 0, out.stderr[-3000:]
    got = losses(tmp_path / "two")
    # Each step's two half-gradients are added once either way (micro-batch accumulation, or
    # an all-reduce of two ranks), so the losses agree to the last bit in practice; 1e-6 only
    # leaves room for kernels whose summation order follows the thread count.
    assert got == pytest.approx(reference_losses, rel=1e-6)


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.toml")))
def test_every_recipe_parses(recipe):
    cfg = RunConfig.load(recipe)
    assert cfg.train.steps > 0 and cfg.data.sources
    # Its tokenizer file is where the Makefile writes it (data/demo/tokenizer-*.json), by the
    # path rule (relative to the file that names it): a recipe that points elsewhere passes
    # every other test and fails `make demo` on a fresh clone.
    if cfg.data.tokenizer not in ("byte", "model"):
        made = re.findall(
            r"\$\(DEMO_DIR\)/(tokenizer[-\w]*\.json)", (ROOT / "Makefile").read_text()
        )
        assert Path(cfg.data.resolve(cfg.data.tokenizer)).resolve() in {
            (ROOT / "data" / "demo" / name).resolve() for name in made
        }


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.seq_len=4096", "data.seq_len: 4096 is longer than model.max_seq_len 64"),
        ("model.n_heads=3", "model: unknown keys ['n_heads']"),
        ("trainer.steps=3", "unknown sections ['trainer']"),
        ("model.d_model=30", "must split into 2 heads"),
        ("train.steps", "expected KEY=VALUE"),
        ("optim.lr=abc", "optim.lr: 'abc' is not a number"),
        ("train.steps=2.5", "train.steps: 2.5 is not an integer"),
        ("model.kind=rnn", "model.kind: 'rnn' is unknown"),
    ],
)
def test_bad_recipes_and_overrides_print_one_line(tmp_path, override, message, capsys):
    # The command's own entry point, in this process (a subprocess per case would spend its
    # time importing torch; tests/test_cli.py runs the command as a user does).
    from slipstream.cli import main

    status = main(["train", str(write_recipe(tmp_path)), "--set", override])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert message in err and "Traceback" not in err


def test_no_config_is_changed_by_a_run(tmp_path):
    import copy

    cfg = RunConfig.load(write_recipe(tmp_path), ["train.steps=2", "train.eval_every=1"])
    before = copy.deepcopy(cfg)
    Trainer(cfg).fit()
    assert cfg == before and cfg.to_dict() == before.to_dict()
    with pytest.raises(AttributeError):  # frozen: a write raises instead of passing silently
        cfg.data.seq_len = 8  # type: ignore[misc]


def test_resume_without_a_checkpoint_says_so(tmp_path):
    out = slipstream("train", str(write_recipe(tmp_path)), "--resume")
    assert out.returncode == 2 and "no checkpoint" in out.stderr


def test_overrides_reach_the_mixture_spec_file():
    cfg = RunConfig.load(
        ROOT / "recipes" / "demo.toml", ["data.sources.1.weight=0.9", "data.backend.num_workers=3"]
    )
    assert cfg.data.sources[1].name == "prose" and cfg.data.sources[1].weight == 0.9
    assert cfg.data.backend.num_workers == 3 and cfg.data.seq_len == 128


LONG_RUN = ["--set", "train.steps=120", "--set", "train.checkpoint_every=0",
            "--set", "train.eval_every=0"]  # fmt: skip


@pytest.fixture(scope="module")
def long_run_losses(tmp_path_factory) -> list[float]:
    """The default recipe's losses over 120 steps, uninterrupted."""
    ref = tmp_path_factory.mktemp("long") / "ref"
    out = slipstream("train", str(write_recipe(ref.parent)), *LONG_RUN,
                     "--set", f"train.out_dir='{ref}'")  # fmt: skip
    assert out.returncode == 0, out.stderr
    return losses(ref)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_checkpoints_a_whole_step_and_resume_continues_exactly(
    tmp_path, long_run_losses, signame
):
    import signal
    import time

    recipe = write_recipe(tmp_path)
    steps = LONG_RUN
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "slipstream", "train", str(recipe), *steps],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (
        (run / "metrics.jsonl").is_file()
        and len((run / "metrics.jsonl").read_text().splitlines()) >= 3
    ):
        assert time.monotonic() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.05)  # polling a file another process writes: nothing to await
    proc.send_signal(getattr(signal, signame))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err  # stopped before train.steps, with a checkpoint
    assert "continue with --resume" in out
    stopped = len(losses(run))
    assert 3 <= stopped < 120
    resumed = slipstream("train", str(recipe), *steps, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert losses(run) == pytest.approx(long_run_losses, rel=1e-6, abs=1e-6)


def test_resume_under_torchrun_with_another_world_size_continues_the_run(
    tmp_path, reference_losses
):
    run = tmp_path / "run"
    first = RunConfig.load(
        write_recipe(tmp_path), [f"train.out_dir='{run}'", "train.stop_at_step=3"]
    )
    Trainer(first).fit()  # one process, 2 micro-batches of 2 rows
    recipe = write_recipe(tmp_path, "two.toml", num_micro_batches=1)  # 2 ranks x 2 rows
    out = torchrun(recipe, "--resume", "--set", f"train.out_dir='{run}'")
    assert out.returncode == 0, out.stderr[-3000:]
    # The data plane's state is global and the step's rows are the same, so the run goes on
    # as if nothing changed (same tolerance as the 2-rank test above).
    assert losses(run) == pytest.approx(reference_losses, rel=1e-6)


def stop_and_resume(tmp_path: Path, overrides: list[str], stop_at: int) -> tuple[list, list]:
    """(losses uninterrupted, losses stopped at `stop_at` and resumed) under `overrides`."""
    recipe = write_recipe(tmp_path)
    ref = RunConfig.load(recipe, [*overrides, f"train.out_dir='{tmp_path / 'ref'}'"])
    want = [r["loss"] for r in Trainer(ref).fit()]
    run = [*overrides, f"train.out_dir='{tmp_path / 'b'}'"]
    Trainer(RunConfig.load(recipe, [*run, f"train.stop_at_step={stop_at}"])).fit()
    Trainer(RunConfig.load(recipe, run), resume=True).fit()
    return want, losses(tmp_path / "b")


def test_resume_with_dropout_on_gives_the_losses_of_an_uninterrupted_run(tmp_path):
    # Dropout draws from torch's RNG every step: a resume that restored the RNG wrongly would
    # give other masks, and other losses.
    want, got = stop_and_resume(tmp_path, ["model.dropout=0.3", "train.eval_every=0"], 4)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)  # same tolerance as resume above
    recipe = write_recipe(tmp_path)
    # And dropout does change the run (so the equality above could have failed).
    plain = RunConfig.load(recipe, ["train.eval_every=0", f"train.out_dir='{tmp_path / 'p'}'"])
    assert [r["loss"] for r in Trainer(plain).fit()][1:] != pytest.approx(want[1:], rel=1e-3)


def write_hf_recipe(tmp_path: Path) -> Path:
    """The e2e recipe with a small randomly initialized Llama (whose heads split over 2)."""
    llama = (
        '{model_type = "llama", vocab_size = 300, hidden_size = 32, num_hidden_layers = 2, '
        "num_attention_heads = 2, num_key_value_heads = 2, intermediate_size = 64, "
        "max_position_embeddings = 64}"
    )
    recipe = write_recipe(tmp_path)
    gpt = "[model]\nn_layer = 2\nn_head = 2\nd_model = 32\nmax_seq_len = 64\n"
    text = recipe.read_text()
    assert gpt in text
    recipe.write_text(text.replace(gpt, f'[model]\nkind = "hf"\nconfig = {llama}\n'))
    return recipe


def test_a_hugging_face_model_trains_through_the_trainer(tmp_path):
    pytest.importorskip("transformers")
    recipe = write_hf_recipe(tmp_path)
    cfg = RunConfig.load(recipe, ["train.sample_tokens=4"])
    history = Trainer(cfg).fit()
    assert len(history) == 6 and history[-1]["loss"] < history[0]["loss"]
    assert history[2]["eval_bpb"] > 0
    resolved = json.loads((tmp_path / "run" / "resolved.json").read_text())
    assert resolved["model"]["kind"] == "hf" and resolved["num_params"] > 0


def test_a_second_stop_signal_aborts_at_once(tmp_path):
    import signal
    import time

    recipe = write_recipe(tmp_path)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "slipstream", "train", str(recipe), "--set", "train.steps=5000"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.05)  # polling a file another process writes: nothing to await
    # Two signals microseconds apart land within one step: the second aborts. (Two of the same
    # kind could merge into one while pending, so the second is another kind.)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err, (out, err)
    assert "Traceback" not in err


def test_tensor_parallel_run_matches_one_process_and_resumes(tmp_path, reference_losses):
    """parallel.tp = 2 (shm overlap) under torchrun: the attention and MLP are split over the
    2 ranks, the batch is the same, so the losses are those of one process up to fp32
    rounding; stopped at step 3 and resumed, it continues exactly."""
    recipe = write_recipe(tmp_path)
    run = tmp_path / "tp"
    args = ("--set", f"train.out_dir='{run}'", "--set", "parallel.tp=2")
    first = torchrun(recipe, *args, "--set", "train.stop_at_step=3")
    assert first.returncode == 0, first.stderr
    second = torchrun(recipe, *args, "--resume")
    assert second.returncode == 0, second.stderr
    resolved = json.loads((run / "resolved.json").read_text())
    assert resolved["tp"] == 2
    # The whole model's parameters, and each rank's slice (the embeddings stay whole).
    assert resolved["num_params"] > resolved["num_params_per_tp_rank"] > resolved["num_params"] / 2
    assert "per tensor-parallel rank" in second.stdout
    saved = sorted(p.name for p in (run / "checkpoints" / "step_00000006").glob("model*.pt"))
    assert saved == ["model.tp0.pt", "model.tp1.pt"]  # one slice per tensor-parallel rank
    # Measured: equal to 1 fp32 ulp (4e-8) over 6 steps; the split matmuls add the same
    # products in another order. A wrong split or a missed gradient sum moves step 2 by >1e-3.
    assert losses(run) == pytest.approx(reference_losses, rel=1e-5)
    other = slipstream("train", str(recipe), "--set", f"train.out_dir='{run}'", "--resume")
    assert other.returncode == 2 and "saved with parallel.tp = 2" in other.stderr


def test_two_by_two_mesh_matches_one_process(tmp_path, reference_losses):
    """4 processes as 2 data-parallel replicas x 2 tensor-parallel ranks: each replica's two
    ranks get the same balanced share of the step, and the losses stay those of one process."""
    recipe = write_recipe(tmp_path, num_micro_batches=1)  # 2 replicas: the same rows per step
    run = tmp_path / "mesh"
    args = ("--set", f"train.out_dir='{run}'", "--set", "parallel.tp=2", "--set", "parallel.dp=2")
    overlap = ("--set", "parallel.overlap='collective'")
    out = torchrun(recipe, *args, *overlap, nproc=4, module=("tests.e2e.released",))
    assert out.returncode == 0, out.stderr
    # Every rank freed its trainer (DDP and its comm hook) before interpreter exit.
    alive = re.findall(r"trainers alive after train: (\d+) of (\d+)", out.stdout)
    assert alive == [("0", "1")] * 4, out.stdout
    resolved = json.loads((run / "resolved.json").read_text())
    assert (resolved["tp"], resolved["data"]["dp_world_size"]) == (2, 2)
    assert losses(run) == pytest.approx(reference_losses, rel=1e-5)  # tolerance: see above


def test_two_ranks_on_the_ray_backend_match_one_process(tmp_path, reference_losses):
    """`data.backend.kind = 'ray'` under torchrun: rank 0 starts a local Ray, rank 1 joins it,
    both use the job's loader actors (found by name); the losses are those of one process."""
    pytest.importorskip("ray")
    recipe = write_recipe(tmp_path, "two.toml", num_micro_batches=1)
    run = tmp_path / "ray"
    out = torchrun(recipe, "--set", f"train.out_dir='{run}'", "--set", "data.backend.kind='ray'")
    assert out.returncode == 0, out.stderr[-3000:]
    assert losses(run) == pytest.approx(reference_losses, rel=1e-6)  # tolerance: see above
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["data/replicas/short"] >= 1  # the loader actors are in the metrics
