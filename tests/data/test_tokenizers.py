"""Tokenizers: byte-level round trip; BPE trained on a mixture, saved, loaded, used by loaders."""

from __future__ import annotations

import pytest

from slipstream.data import ByteTokenizer, MixtureSpec, build_source_loaders, build_tokenizer
from slipstream.tools.tokenizer import mixture_texts, train_bpe
from tests.conftest import corpus_spec


def test_byte_tokenizer_round_trips_and_ends_documents():
    tok = ByteTokenizer()
    ids = tok.encode_batch(["héllo"])[0]
    assert ids[-1] == tok.eos_id and len(ids) == len("héllo".encode()) + 1
    assert tok.decode(ids) == "héllo"


def test_bpe_trained_on_the_mixture_is_loaded_by_source_loaders(tmp_path):
    raw = corpus_spec(tmp_path, "jsonl")
    spec = MixtureSpec.from_dict(raw, base_dir=str(tmp_path))
    tok = train_bpe(mixture_texts(spec, 200), tmp_path / "tok.json", vocab_size=400)
    assert tok.vocab_size <= 400
    text = "def return class import self"
    ids = tok.encode_batch([text])[0]
    assert tok.decode(ids[:-1]) == text
    assert len(ids) < len(text) // 2  # merges learned from the corpus compress it

    raw["tokenizer"] = "tok.json"
    loaders = build_source_loaders(MixtureSpec.from_dict(raw, base_dir=str(tmp_path)))
    doc = loaders[0].get_many([0])[0]
    assert doc[-1] == tok.eos_id and doc.max() < tok.vocab_size


def test_missing_tokenizer_file_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="train-tokenizer"):
        build_tokenizer("missing.json", tmp_path)
