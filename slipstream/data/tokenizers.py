"""Tokenizers used inside source loaders: byte-level (no files) and BPE from a Hugging Face
`tokenizers` JSON file, plus training such a BPE on a mixture. Every tokenizer appends an
end-of-document token to each document so the model learns where documents end.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

EOS_TOKEN = "<|endoftext|>"


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """int32 token ids per text, each ending with `eos_id`."""
        ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255; 256 is the end of a document."""

    vocab_size = 257
    eos_id = 256

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        out = []
        for t in texts:
            raw = np.frombuffer(t.encode("utf-8", errors="replace"), dtype=np.uint8)
            ids = np.empty(len(raw) + 1, dtype=np.int32)
            ids[:-1] = raw
            ids[-1] = self.eos_id
            out.append(ids)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers` JSON file (for example from `slipstream data train-tokenizer`)."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        if not path.is_file():
            raise ValueError(
                f"tokenizer: {path} not found; use 'byte' or train one with "
                "`slipstream data train-tokenizer`"
            )
        self._tok = _Tok.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()
        eos = self._tok.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(f"tokenizer: {path} has no {EOS_TOKEN!r} token; retrain it with one")
        self.eos_id = eos

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # encode_batch runs in Rust and releases the GIL, so thread-pool loaders scale with it.
        encs = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.array([*e.ids, self.eos_id], dtype=np.int32) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def build_tokenizer(name: str, base_dir: str | Path = ".") -> Tokenizer:
    """`byte`, or a path (relative to `base_dir`) of a tokenizers JSON file."""
    if name == "byte":
        return ByteTokenizer()
    path = Path(name).expanduser()
    return HFTokenizer(path if path.is_absolute() else Path(base_dir) / path)


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
