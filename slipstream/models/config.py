"""One config per model kind, chosen by `kind` in the recipe's `[model]` table."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from slipstream.configfile import build_config

KINDS = ("gpt", "hf")


@dataclass(kw_only=True, slots=True, frozen=True)
class GPTConfig:
    """Slipstream's GPT (`models/gpt.py`)."""

    kind: str = "gpt"
    """`gpt` (this model) or `hf` (a Hugging Face model)."""
    vocab_size: int = 0
    """0 = the data plane tokenizer's vocabulary size (resolved at build, saved in
    resolved.json)."""
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads; d_model / n_head is the head size (even, for RoPE)."""
    d_model: int = 256
    """Width of the residual stream."""
    mlp: str = "swiglu"
    """`swiglu` or `gelu`."""
    mlp_ratio: float = 4.0
    """Hidden width / d_model for GELU; SwiGLU uses 2/3 of it (same parameter count)."""
    rope_theta: float = 10_000.0
    """RoPE's base: the wavelengths of the rotary position embedding."""
    max_seq_len: int = 1024
    """Longest row the model takes; must be >= the data plane's seq_len."""
    tie_embeddings: bool = True
    """The output layer shares the token embedding's weights."""
    init_std: float = 0.02
    """Standard deviation of the normal initialization (residual projections: scaled down
    by sqrt(2 * n_layer))."""
    dropout: float = 0.0
    """Dropout on attention and MLP outputs during training (0 = off)."""
    activation_checkpointing: bool = False
    """Keep only each block's input for backward and recompute the rest (less activation
    memory, one more forward of compute)."""

    def __post_init__(self) -> None:
        if self.kind != "gpt":
            raise ValueError(f"model.kind: {self.kind!r} is not 'gpt'")
        for key in ("n_layer", "n_head", "d_model", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key}: must be > 0")
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(
                f"model.d_model: {self.d_model} must split into {self.n_head} heads of an "
                "even size; change d_model or n_head"
            )
        if self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"model.mlp: {self.mlp!r} is unknown; use 'swiglu' or 'gelu'")
        if self.vocab_size < 0:
            raise ValueError(f"model.vocab_size: {self.vocab_size} must be >= 0 (0 = tokenizer's)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout: {self.dropout} must be in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(kw_only=True, slots=True, frozen=True)
class HFConfig:
    """A Hugging Face causal LM (`models/hf.py`)."""

    kind: str = "hf"
    """`hf`."""
    path: str = ""
    """A local model folder (relative to the recipe), or `pkg:NAME` for an installed package
    that ships one."""
    gguf_file: str = ""
    """A GGUF file inside `path`, for models shipped as GGUF."""
    config: dict | None = None
    """Build from a config instead (e.g. {model_type = "llama", ...}), randomly initialized."""

    def __post_init__(self) -> None:
        if self.kind != "hf":
            raise ValueError(f"model.kind: {self.kind!r} is not 'hf'")
        if not (self.path or self.config):
            raise ValueError("model: kind = 'hf' needs path (a local folder) or config")

    def to_dict(self) -> dict:
        return asdict(self)


ModelConfig = GPTConfig | HFConfig


def model_config_from_raw(raw: Any, where: str = "model") -> ModelConfig:
    """The config class that `raw["kind"]` names (default `gpt`), built from the table."""
    kind = raw.get("kind", "gpt") if isinstance(raw, dict) else None
    if kind not in KINDS:
        raise ValueError(f"{where}.kind: {kind!r} is unknown; use one of {', '.join(KINDS)}")
    return build_config(GPTConfig if kind == "gpt" else HFConfig, raw, where)
