"""Runs are safe: a folder that holds a run is trained into again only with --resume or
--overwrite; each recipe has its own default folder; the exit status tells a finished run, a
stopped one and a mistake apart."""

from __future__ import annotations

import json
import shutil

import pytest

from slipstream.config import RunConfig
from tests.e2e.test_train import losses, slipstream, write_recipe


def _steps(run) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run of 8 steps stopped at step 6, with its checkpoints at steps 3 and 6 (both kept),
    for each test to copy: the recipe and its corpus are written the same in any folder."""
    base = tmp_path_factory.mktemp("stopped")
    first = slipstream(
        "train", str(write_recipe(base)), "--set", "train.steps=8", "--set", "train.stop_at_step=6"
    )
    assert first.returncode == 3, first.stderr
    return base / "run"


def test_a_second_run_into_a_used_folder_is_refused_and_changes_nothing(tmp_path, stopped_run):
    recipe = write_recipe(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    again = slipstream("train", str(recipe), "--set", "train.steps=3")
    assert again.returncode == 2, again.stderr
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and str(run) in lines[0], lines
    assert "--resume" in lines[0] and "--overwrite" in lines[0]
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # config.json, metrics, checkpoints: untouched


def test_overwrite_replaces_the_run(tmp_path, stopped_run):
    recipe = write_recipe(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    out = slipstream("train", str(recipe), "--overwrite", "--set", "train.steps=3")
    assert out.returncode == 0, out.stderr
    assert _steps(run) == [1, 2, 3]  # the old run's rows are gone, not appended to
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert saved == ["step_00000003"]  # its own checkpoint, not the old run's
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 3


def test_each_recipe_has_its_own_default_folder(tmp_path):
    recipe = write_recipe(tmp_path, name="my-run.toml")
    text = "\n".join(ln for ln in recipe.read_text().splitlines() if not ln.startswith("out_dir"))
    recipe.write_text(text + "\n")
    assert RunConfig.load(recipe).train.out_dir == "runs/my-run"


def test_an_out_dir_that_is_a_file_is_one_line(tmp_path):
    recipe = write_recipe(tmp_path)
    (tmp_path / "taken").write_text("not a folder")
    out = slipstream("train", str(recipe), "--set", f"train.out_dir='{tmp_path / 'taken'}'")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "is a file" in out.stderr


def test_an_out_dir_that_cannot_be_written_is_one_line(tmp_path):
    # /proc takes no new folders, even from root (who ignores a folder's permission bits)
    recipe = write_recipe(tmp_path)
    out = slipstream("train", str(recipe), "--set", "train.out_dir='/proc/slipstream-run'")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and "cannot be written" in out.stderr


def test_the_exit_status_tells_stopped_finished_and_already_finished_apart(tmp_path):
    recipe = write_recipe(tmp_path)
    stopped = slipstream("train", str(recipe), "--set", "train.stop_at_step=2")
    assert stopped.returncode == 3, stopped.stderr  # stopped early: --resume continues
    done = slipstream("train", str(recipe), "--resume")
    assert done.returncode == 0, done.stderr
    assert _steps(tmp_path / "run") == [1, 2, 3, 4, 5, 6]
    again = slipstream("train", str(recipe), "--resume")
    assert again.returncode == 0
    assert "finished at step 6 of 6" in again.stdout and "train.steps" in again.stdout
    assert len(losses(tmp_path / "run")) == 6  # nothing trained or logged again
    both = slipstream("train", str(recipe), "--resume", "--overwrite")
    assert both.returncode == 2 and "pass one" in both.stderr


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("model.pt", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
        ("optimizer.pt", lambda p: p.write_bytes(b"")),
        ("meta.json", lambda p: p.write_text("{not json")),
    ],
    ids=["truncated-model", "empty-optimizer", "corrupt-meta"],
)
def test_resume_names_a_damaged_checkpoint_and_falls_back_to_an_intact_one(
    tmp_path, stopped_run, name, damage
):
    recipe = write_recipe(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    damage(run / "checkpoints" / "step_00000006" / name)
    out = slipstream("train", str(recipe), "--set", "train.steps=8", "--resume")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    said = " ".join(out.stdout.split())  # the console wraps long lines
    assert f"step_00000006/{name}: unreadable" in said and "trying an older one" in said
    assert "at step 3" in said
    assert _steps(run)[-5:] == [4, 5, 6, 7, 8]  # continued from step 3


def test_resume_with_every_checkpoint_damaged_is_one_line(tmp_path, stopped_run):
    recipe = write_recipe(tmp_path)
    shutil.copytree(stopped_run, tmp_path / "run")
    for folder in (tmp_path / "run" / "checkpoints").iterdir():
        (folder / "model.pt").write_bytes(b"")
    out = slipstream("train", str(recipe), "--resume", "--set", "train.steps=8")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "every checkpoint" in lines[0] and "--overwrite" in lines[0]


def test_train_says_what_it_skipped_and_a_peak_it_never_reaches(tmp_path):
    recipe = write_recipe(tmp_path)
    shard = sorted((tmp_path / "short").glob("*.jsonl"))[0]  # 2 bad of 152: under 5%
    shard.write_text(shard.read_text() + "{not json\n" + json.dumps({"text": 7}) + "\n")
    out = slipstream(
        "train", str(recipe), "--set", "train.steps=2", "--set", "optim.warmup_steps=10"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    said = " ".join(out.stdout.split())
    assert "2 corrupt record(s) skipped (on_error = 'skip')" in said, said[:600]
    assert "optim.warmup_steps 10 > train.steps 2: the learning rate never reaches" in said
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    resolved = json.loads((run / "resolved.json").read_text())
    assert (
        summary["data_skipped"] == resolved["data_skipped"] == {"short": 2, "medium": 0, "long": 0}
    )
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["data/skipped/short"] == 2


def test_the_end_of_a_run_says_what_it_came_to(tmp_path):
    recipe = write_recipe(tmp_path)
    out = slipstream("train", str(recipe))
    assert out.returncode == 0, out.stderr
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["final_loss"] == losses(run)[-1]
    assert summary["final_eval_bpb"] > 0 and summary["num_params"] > 0
    assert summary["tokens"] > 0 and summary["wall_s"] > 0
    assert summary["checkpoint"].endswith("step_00000006")
    said = " ".join(out.stdout.split())
    assert f"{summary['num_params']:,} parameters;" in said and "metrics.jsonl" in said
