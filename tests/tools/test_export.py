"""`slipstream export`: a trained run as a Hugging Face model folder that `transformers` loads
with the same logits, whose tokenizer gives the same ids, and that trains further as
model.kind = "hf"."""

from __future__ import annotations

import json
import shutil
import types

import pytest
import torch

from slipstream.config import RunConfig
from slipstream.data.sources.tokenizers import build_tokenizer
from slipstream.models import GPT, GPTConfig
from slipstream.overlap.layout import merge_slices
from slipstream.overlap.tp import _split
from slipstream.tools.export import export_run
from slipstream.tools.tokenizer import train_bpe
from slipstream.train import Trainer
from slipstream.train.checkpoint import latest_checkpoint, safe_load
from tests.conftest import make_docs, run_cli
from tests.e2e.test_train import write_recipe

transformers = pytest.importorskip("transformers")
TEXTS = ["The play begins.", "naïve café — 東京 ✓", "  two  spaces\n\ttab", "def f(x): return x"]


def trained_run(tmp_path, *overrides: str):
    recipe = write_recipe(tmp_path)
    cfg = RunConfig.load(recipe, ["train.sample_tokens=0", "train.eval_every=0", *overrides])
    history = Trainer(cfg).fit()
    return tmp_path / "run", history, recipe


@pytest.fixture(scope="module")
def run12(tmp_path_factory):
    """One run shared by the tests that only read it: 12 steps at lr 1e-2, tied embeddings,
    the byte tokenizer."""
    return trained_run(tmp_path_factory.mktemp("run12"), "train.steps=12", "optim.lr=1e-2")


def our_model(run) -> GPT:
    meta = json.loads((latest_checkpoint(run) / "meta.json").read_text())
    model = GPT(GPTConfig(**meta["model"]))
    model.load_state_dict(safe_load(latest_checkpoint(run) / "model.pt"))
    return model.eval()


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_loads_the_export_with_the_same_logits_and_tokens(tmp_path, tied, run12):
    if tied:
        run = run12[0]
    else:  # untied, with a trained BPE beside the byte tokenizer
        tok = train_bpe(iter(make_docs(5, 200, 30)), tmp_path / "bpe.json", 300)
        assert tok.vocab_size == 300
        run, _, _ = trained_run(
            tmp_path, "model.tie_embeddings=false", f"data.tokenizer='{tmp_path / 'bpe.json'}'"
        )
    out = export_run(run, tmp_path / "hf")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = torch.randint(
        0, hf.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        ours, theirs = our_model(run)(ids), hf(input_ids=ids).logits
    # The same fp32 operations in another order (the fused q|k|v and gate|up matmuls against
    # three and two) and RoPE's angles computed in fp64 here, fp32 there (an angle of at most
    # 48 rad is off by <= 48 * 2**-24 = 3e-6 rad): with 2 layers of width 32 and logits of
    # order 1, that moves them by ~1e-6, inside 1e-5. A swapped projection or a wrong RoPE
    # layout moves them by > 1e-2.
    assert (ours - theirs).abs().max().item() < 1e-5
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    resolved = json.loads((run / "resolved.json").read_text())
    tok = build_tokenizer(resolved["data"]["tokenizer"])
    for text in TEXTS:
        assert (
            hf_tok.encode(text, add_special_tokens=False)
            == tok.encode_batch([text])[0][:-1].tolist()
        )
    assert hf_tok.eos_token_id == tok.eos_id


def test_the_export_trains_further_as_a_hugging_face_model(tmp_path, run12):
    run, history, recipe = run12
    out = export_run(run, tmp_path / "hf")
    text = recipe.read_text()
    gpt = "[model]\nn_layer = 2\nn_head = 2\nd_model = 32\nmax_seq_len = 64\n"
    assert gpt in text
    text = text.replace(gpt, f'[model]\nkind = "hf"\npath = "{out}"\n')
    hf_recipe = recipe.with_name("hf.toml")  # beside the first: its data paths are relative
    hf_recipe.write_text(text.replace("[data]\n", '[data]\ntokenizer = "model"\n'))
    cfg = RunConfig.load(
        hf_recipe,
        [f"train.out_dir='{tmp_path / 'again'}'", "train.steps=2", "train.sample_tokens=0"],
    )
    again = Trainer(cfg).fit()
    # The same first batch (same data seed, same tokenizer ids): the exported weights, trained
    # 12 steps at lr 1e-2, fit it better than the first run's random start (about ln 257 = 5.5
    # nats) by far more than 0.3; an export that lost or scrambled the weights would not.
    assert again[0]["loss"] < history[0]["loss"] - 0.3, (again[0]["loss"], history[0]["loss"])


def test_tensor_parallel_slices_join_to_the_whole_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=4, d_model=32, max_seq_len=16))
    layout, whole = model.tensor_parallel_layout(), model.state_dict()
    out_parts = {f"{m}.weight": n for m, n in layout.colwise.items()}
    in_split = {f"{m}.weight" for m in layout.rowwise}
    slices = []
    for rank in range(2):
        group = types.SimpleNamespace(rank=rank, world_size=2)  # _split reads only these
        slices.append({
            k: _split(v, 0, out_parts[k], group) if k in out_parts
            else _split(v, 1, 1, group) if k in in_split else v
            for k, v in whole.items()
        })  # fmt: skip
    assert slices[0]["blocks.0.attn.qkv.weight"].shape[0] == 48
    joined = merge_slices(slices, layout)
    assert joined.keys() == whole.keys()
    assert all(torch.equal(joined[k], whole[k]) for k in whole)


def test_export_mistakes_are_one_line(tmp_path, run12, capsys):
    from slipstream.cli import main

    out = run_cli("export", str(tmp_path), str(tmp_path / "hf"))  # as a user runs it
    assert out.returncode == 2 and "not a run folder" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    run = tmp_path / "run"
    shutil.copytree(run12[0], run)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    assert main(["export", str(run), str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert main(["export", str(run), str(tmp_path / "hf"), "--step", "99"]) == 2
    assert "no checkpoint of step 99" in capsys.readouterr().err
    for folder in (run / "checkpoints").iterdir():
        (folder / "model.pt").write_bytes(b"")  # every checkpoint damaged
    assert main(["export", str(run), str(tmp_path / "hf")]) == 2
    assert "every checkpoint is damaged" in capsys.readouterr().err
    # Nothing is made by an export that fails: no folder, no half-written files beside it.
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))
