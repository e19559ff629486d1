"""The `slipstream data` commands, run as a user runs them."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from slipstream.data import MixtureSpec
from tests.conftest import corpus_spec, run_cli

slipstream = run_cli


def write_spec_toml(tmp_path) -> str:
    raw = corpus_spec(tmp_path, "jsonl")
    lines = [f"seq_len = {raw['seq_len']}", "micro_batch_size = 2", ""]
    for s in raw["sources"]:
        lines += [
            "[[sources]]",
            f'name = "{s["name"]}"',
            f"paths = {json.dumps(s['paths'])}",
            f"weight = {s['weight']}",
            "",
        ]
    path = tmp_path / "mix.toml"
    path.write_text("\n".join(lines))
    return str(path)


def test_preview_reports_proportions_packing_and_imbalance(tmp_path):
    out = slipstream(
        "data",
        "preview",
        write_spec_toml(tmp_path),
        "--steps",
        "5",
        "--ranks",
        "2",
        "--set",
        "balance.method=kk",
    )
    assert out.returncode == 0, out.stderr
    assert "over 2 ranks" in out.stdout
    assert "short" in out.stdout and "packing efficiency:" in out.stdout
    assert "rows in random order" in out.stdout and "balanced ('kk')" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data", "preview", "nowhere.toml"], "nowhere.toml: file not found"),
        (["data", "preview", "{spec}", "--set", "seq_len=0"], "seq_len: 0 must be a positive"),
        (
            ["data", "preview", "{spec}", "--set", "sources.0.paths=['x/*.jsonl']"],
            "matches no file",
        ),
        (["data", "preview", "{spec}", "--set", "sources.1.weight=-2"], "is negative"),
        (["data", "preview", "{spec}", "--set", "packing=maybe"], "data.packing: 'maybe' is not"),
        (
            ["data", "preview", "{spec}", "--set", "backend.num_workers=1.5"],
            "data.backend.num_workers: 1.5 is not an integer",
        ),
        (["data", "preview", "{spec}", "--set", "dp_world_size=4"], "takes --ranks N"),
        (["data", "preview", "{spec}", "--ranks", "0"], "--ranks: 0 must be >= 1"),
        (["memory", "--params=-7e9", "--layers", "32", "--hidden", "4096"], "--params: -7"),
        (["memory", "--params", "7e9", "--layers", "0", "--hidden", "4096"], "--layers: 0"),
        (["memory", "{spec}", "--params", "7e9"], "--params with a recipe"),
        (
            ["data", "preview", "{spec}", "--set", "tokenizer='{tok}'"],
            "is not a readable tokenizers JSON file",
        ),
    ],
)
def test_user_mistakes_print_one_line_and_no_traceback(tmp_path, args, message):
    spec = write_spec_toml(tmp_path)
    tok = tmp_path / "truncated-tokenizer.json"
    tok.write_text('{"version": "1.0", "truncation": null, "model": {"type": "BPE", "vo')
    out = slipstream(*[a.replace("{spec}", spec).replace("{tok}", str(tok)) for a in args])
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_version_is_printed():
    out = slipstream("--version")
    assert out.returncode == 0 and out.stdout.startswith("slipstream ")


def test_prepare_demo_writes_jsonl_parquet_manifest_and_spec(tmp_path):
    out = slipstream(
        "data",
        "prepare-demo",
        str(tmp_path / "demo"),
        "--spec-out",
        str(tmp_path / "demo.toml"),
        "--limit",
        "30",
    )
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "demo" / "manifest.json").read_text())
    sources = manifest["sources"]
    assert {"code", "docs", "pkgdocs"} <= set(sources)  # prose needs the package index
    assert {s["format"] for s in sources.values()} == {"jsonl", "parquet"}
    assert all(s["num_docs"] > 0 and s["num_bytes"] > 0 for s in sources.values())
    table = pq.read_table(tmp_path / "demo" / sources["docs"]["files"][0])
    assert table.num_rows == sources["docs"]["num_docs"]
    spec = MixtureSpec.from_toml(tmp_path / "demo.toml")
    assert [s.name for s in spec.sources] == [
        n for n in ("code", "prose", "docs", "pkgdocs") if n in sources
    ]
    tok = slipstream(
        "data",
        "train-tokenizer",
        str(tmp_path / "demo.toml"),
        "--out",
        str(tmp_path / "tok.json"),
        "--vocab-size",
        "512",
        "--max-docs",
        "60",
    )
    assert tok.returncode == 0, tok.stderr
    assert (tmp_path / "tok.json").is_file()
