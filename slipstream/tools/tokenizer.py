"""`slipstream data train-tokenizer`: train a byte-level BPE on a sample of a mixture, drawn
across sources in proportion to their weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from slipstream.data.sources.loader import build_source_loaders
from slipstream.data.sources.tokenizers import EOS_TOKEN, HFTokenizer
from slipstream.data.spec import MixtureSpec


def mixture_texts(spec: MixtureSpec, max_docs: int) -> Iterator[str]:
    """Up to `max_docs` raw documents drawn across sources in proportion to the step-0 weights,
    for training a tokenizer."""
    loaders = build_source_loaders(spec)
    rng = np.random.default_rng(spec.seed)
    for ldr, w in zip(loaders, spec.weights_at(0), strict=True):
        k = min(ldr.num_docs, int(round(max_docs * w)))
        ids = np.sort(rng.choice(ldr.num_docs, size=k, replace=False))
        for start in range(0, k, 256):
            yield from ldr.read_texts(ids[start : start + 256])
        ldr.close()


def train_bpe(texts: Iterator[str], out_path: str | Path, vocab_size: int) -> HFTokenizer:
    """Train a byte-level BPE on `texts` and save it as a tokenizers JSON file."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise ValueError(f"vocab_size: {vocab_size} is too small for byte-level BPE; use >= 300")
    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_path))
    return HFTokenizer(out_path)
