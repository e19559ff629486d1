"""Tokenizers used inside source loaders: byte-level (no files) and BPE from a Hugging Face
`tokenizers` JSON file. Every tokenizer appends an end-of-document token to each document so
the model learns where documents end, and tells how many UTF-8 bytes each token stands for, so
a loss can be reported in bits per byte whatever the tokenizer. (Training a BPE is a tool:
`slipstream/tools/tokenizer.py`.)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np

EOS_TOKEN = "<|endoftext|>"


class Tokenizer(Protocol):
    fingerprint: str
    """Changes when the tokenization would (keys the cache of token counts)."""

    vocab_size: int
    eos_id: int

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """int32 token ids per text, each ending with `eos_id`."""
        ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_bytes(self) -> np.ndarray:
        """int64 [vocab_size]: UTF-8 bytes each token decodes to (0 for special tokens)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255; 256 is the end of a document."""

    fingerprint = "byte"

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

    def token_bytes(self) -> np.ndarray:
        out = np.ones(self.vocab_size, dtype=np.int64)
        out[self.eos_id] = 0
        return out


def one_thread_tokenizer() -> None:
    """In a process that only loads (a pool's worker, a Ray loader actor): encode each batch
    on the calling thread. `tokenizers` otherwise fans every `encode_batch` out over a thread
    per core, whose idle spinning costs CPU (measured: 6-10% more CPU per token with 2 loader
    threads on 2 cores, and no faster), and which oversubscribes a machine whose cores the
    workers and actors already share out. Never called in a trainer's own process: there it
    would change the user's tokenizers too."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


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
        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception type for a bad file
            reason = (str(e).splitlines() or ["unreadable"])[0][:120]
            raise ValueError(
                f"tokenizer: {path} is not a readable tokenizers JSON file ({reason}); "
                "train it again with `slipstream data train-tokenizer`, or use 'byte'"
            ) from None
        # What caches of token counts are keyed by: the vocabulary and rules, not the path.
        self.fingerprint = hashlib.sha1(path.read_bytes()).hexdigest()[:16]
        self.vocab_size = self._tok.get_vocab_size()
        eos = self._tok.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(f"tokenizer: {path} has no {EOS_TOKEN!r} token; retrain it with one")
        self.eos_id = eos
        self._token_bytes: np.ndarray | None = None

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # encode_batch runs in Rust and releases the GIL, so thread-pool loaders scale with it.
        encs = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.array([*e.ids, self.eos_id], dtype=np.int32) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        """Byte-level BPE tokens are strings over a 256-character alphabet, one per byte;
        SentencePiece-style ones are text (with '\u2581' for a space) or byte tokens `<0xNN>`."""
        if self._token_bytes is not None:  # the vocabulary is read once, not per evaluation
            return self._token_bytes
        import json

        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        byte_level = "ByteLevel" in json.dumps(decoder)
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for tok, i in self._tok.get_vocab(with_added_tokens=True).items():
            if i >= self.vocab_size or tok in special:
                continue
            if byte_level:
                out[i] = len(tok)
            elif tok.startswith("<0x") and tok.endswith(">") and len(tok) == 6:
                out[i] = 1
            else:
                out[i] = len(tok.replace("\u2581", " ").encode("utf-8"))
        self._token_bytes = out
        return out


def build_tokenizer(name: str, base_dir: str | Path = ".") -> Tokenizer:
    """`byte`, or a path (relative to `base_dir`) of a tokenizers JSON file."""
    if name == "byte":
        return ByteTokenizer()
    path = Path(name).expanduser()
    return HFTokenizer(path if path.is_absolute() else Path(base_dir) / path)
