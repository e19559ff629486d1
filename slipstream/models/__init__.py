"""Models behind one seam (`CausalLM`): Slipstream's GPT and a Hugging Face adapter, each with
its own config, sharing the document masks."""

from __future__ import annotations

from pathlib import Path

from slipstream.models.base import CausalLM, CausalLMBase
from slipstream.models.config import GPTConfig, HFConfig, ModelConfig, model_config_from_raw
from slipstream.models.gpt import GPT
from slipstream.models.masks import document_mask


def build_model(cfg: ModelConfig, base_dir: str | Path = ".") -> CausalLMBase:
    """Slipstream's GPT (its vocab_size resolved), or the Hugging Face adapter."""
    if isinstance(cfg, HFConfig):
        from slipstream.models.hf import HFCausalLM  # imports transformers: only when asked

        return HFCausalLM(cfg, base_dir)
    return GPT(cfg)


__all__ = ["GPT", "CausalLM", "CausalLMBase", "GPTConfig", "HFConfig", "ModelConfig"]
__all__ += ["build_model", "document_mask", "model_config_from_raw"]
