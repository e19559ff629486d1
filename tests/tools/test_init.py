"""Your own data in one command: `slipstream init` writes a recipe and its spec that train as
they are; and one path rule: a path in a file is relative to that file's folder, a path on the
command line to the working directory."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from slipstream.config import RunConfig
from tests.conftest import make_docs


def cli(cwd, *args, timeout_s=300):
    """`slipstream ARGS` as a user runs it, in `cwd`."""
    cmd = [sys.executable, "-m", "slipstream", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=cwd)


def own_files(root):
    (root / "corpus" / "2025").mkdir(parents=True)
    docs = make_docs(3, 120, 40)
    (root / "corpus" / "a.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in docs[:60])
    )
    blob = "".join(json.dumps({"text": t}) + "\n" for t in docs[60:]).encode()
    (root / "corpus" / "2025" / "b.jsonl.gz").write_bytes(gzip.compress(blob))
    (root / "papers").mkdir()
    pq.write_table(pa.table({"body": make_docs(4, 40, 80)}), root / "papers" / "p.parquet")


def test_init_writes_a_recipe_that_trains_on_your_files(tmp_path):
    own_files(tmp_path)
    out = cli(tmp_path, "init", "my-run", "--data", "corpus", "--data", "papers/*.parquet",
              "--text-field", "body", "--vocab-size", "400")  # fmt: skip
    assert out.returncode == 2 and "no field 'body'" in out.stderr  # corpus has 'text'
    assert not list(tmp_path.glob("my-run*"))  # a failed init leaves nothing behind
    out = cli(tmp_path, "init", "my-run", "--data", "corpus", "--data", "papers/*.parquet",
              "--vocab-size", "400")  # fmt: skip
    # the parquet column is 'body': one line says so, naming the file and the column
    assert out.returncode == 2 and "p.parquet: no column 'text'" in out.stderr, out.stderr
    out = cli(tmp_path, "init", "my-run", "--data", "corpus", "--vocab-size", "400")
    assert out.returncode == 0, out.stderr
    said = " ".join(out.stdout.split())
    assert "source 'corpus': 120 documents" in said and "slipstream train my-run.toml" in said
    spec = (tmp_path / "my-run.data.toml").read_text()
    assert 'paths = ["corpus"]' in spec and 'tokenizer = "my-run.tokenizer.json"' in spec
    again = cli(tmp_path, "init", "my-run", "--data", "corpus")
    assert again.returncode == 2 and "exist; choose another name, or pass --force" in again.stderr
    # --force that fails on the way puts back the files it was replacing, byte for byte.
    before = {p.name: p.read_bytes() for p in tmp_path.glob("my-run*")}
    failed = cli(tmp_path, "init", "my-run", "--force", "--data", "corpus", "--data",
                 "papers/*.parquet", "--vocab-size", "400")  # fmt: skip
    assert failed.returncode == 2 and "no column 'text'" in failed.stderr, failed.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.glob("my-run*")} == before
    run = cli(tmp_path, "train", "my-run.toml", "--set", "train.steps=3", "--set",
              "train.eval_every=0", "--set", "train.sample_tokens=0", "--set", "model.n_layer=1")  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((tmp_path / "runs" / "my-run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["data_skipped"] == {"corpus": 0}


def test_paths_in_a_file_follow_the_file_and_on_the_command_line_the_working_dir(
    tmp_path, monkeypatch
):
    (tmp_path / "recipes" / "data").mkdir(parents=True)
    (tmp_path / "recipes" / "data" / "tok.json").write_text("{}")
    (tmp_path / "recipes" / "data" / "spec.toml").write_text(
        'tokenizer = "tok.json"\n[[sources]]\nname = "a"\npaths = ["x.jsonl"]\nweight = 1.0\n'
    )
    recipe = tmp_path / "recipes" / "r.toml"
    recipe.write_text('[data]\nspec = "data/spec.toml"\n[train]\nout_dir = "out"\n')
    cfg = RunConfig.load(recipe)
    assert cfg.train.out_dir == str(tmp_path / "recipes" / "out")
    assert cfg.data.resolve("x.jsonl") == tmp_path / "recipes" / "data" / "x.jsonl"
    assert cfg.data.tokenizer == "tok.json"  # the spec's own: from the spec's folder
    recipe.write_text('[data]\nspec = "data/spec.toml"\ntokenizer = "data/tok.json"\n')
    assert RunConfig.load(recipe).data.tokenizer == str(tmp_path / "recipes" / "data" / "tok.json")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cfg = RunConfig.load(recipe, ["train.out_dir=mine", "data.tokenizer=t.json"])
    assert cfg.train.out_dir == str(cwd / "mine") and cfg.data.tokenizer == str(cwd / "t.json")
