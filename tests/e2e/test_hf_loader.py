"""The loader used alone, from another training loop: Hugging Face label convention, and a
`transformers` model trained from it (examples/hf_loop.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from slipstream.data import IGNORE_INDEX, MixtureLoader, MixtureSpec
from tests.conftest import corpus_spec

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import hf_loop  # noqa: E402


def spec_of(tmp_path, **kw) -> MixtureSpec:
    return MixtureSpec.from_dict(corpus_spec(tmp_path, "jsonl", **kw), base_dir=str(tmp_path))


def test_hf_labels_are_the_next_token_labels_shifted_without_crossing_documents(tmp_path):
    spec = spec_of(tmp_path, seq_len=64)
    with MixtureLoader(spec) as a, MixtureLoader(spec, labels="hf") as b:
        pairs = [(next(a), next(b)) for _ in range(4)]
    num_lost = 0
    for sa, sb in pairs:
        for ma, mb in zip(sa.micro_batches, sb.micro_batches, strict=True):
            assert torch.equal(ma["input_ids"], mb["input_ids"])
            nxt, hf = ma["labels"], mb["labels"]
            shifted = hf[:, 1:]  # what a Hugging Face model compares logits[:, :-1] with
            kept = shifted != IGNORE_INDEX
            assert torch.equal(shifted[kept], nxt[:, :-1][kept])
            # Where the conventions differ, the next position starts another piece: the target
            # of a document cut there (Slipstream keeps it, Hugging Face cannot express it).
            lost = (nxt[:, :-1] != IGNORE_INDEX) & ~kept
            starts = ma["doc_ids"][:, 1:] != ma["doc_ids"][:, :-1]
            assert (starts[lost]).all()
            assert (hf[:, 0] == IGNORE_INDEX).all()  # a row's first token has no context
            num_lost += int(lost.sum())
    assert num_lost > 0  # cut documents occur at this seq_len: the difference was exercised


def test_a_transformers_model_trains_from_the_loader(tmp_path):
    spec = spec_of(tmp_path, seq_len=64, micro_batch_size=4, num_micro_batches=1)
    losses = hf_loop.train(spec, steps=12, lr=1e-2)
    assert len(losses) == 12
    # Random init starts near ln(257) = 5.55 nats; 12 steps of word salad get well below.
    assert losses[0] > 5.0 and sum(losses[-3:]) / 3 < losses[0] - 1.0


def test_unknown_label_convention_is_refused(tmp_path):
    with pytest.raises(ValueError, match="labels: 'shifted'; use 'next' or 'hf'"):
        MixtureLoader(spec_of(tmp_path), labels="shifted")
