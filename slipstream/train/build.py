"""Setup in one place: the model, the agreement between its vocabulary and the data plane's
tokenizer, and the precision. Returns values and changes no config: what it resolves (the
vocabulary size, the tokenizer file, the world size) is returned and saved as `resolved.json`.
Also the end-of-run samples, which need the same model and tokenizer."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from slipstream.data.sources.tokenizers import build_tokenizer
from slipstream.models import CausalLMBase, GPTConfig, ModelConfig, build_model
from slipstream.train.distributed import Dist

if TYPE_CHECKING:  # the root config imports this package's config: no import at run time
    from slipstream.config import RunConfig


@dataclass(slots=True)
class Built:
    model: CausalLMBase
    model_config: ModelConfig
    """The model's config with everything resolved (GPT: vocab_size)."""
    tokenizer: str
    """The data plane's tokenizer: `byte` or a file path."""

    def resolved(self, d: Dist, attention_cost: float, machine_group: list[int]) -> dict:
        """Run-time facts, saved beside config.json (by rank 0: its node's view)."""
        t = d.topology
        return {
            "model": self.model_config.to_dict(),
            "data": {
                "tokenizer": self.tokenizer,
                "dp_world_size": d.dp_size,
                "balance.attention_cost": attention_cost,
                "machine_group": machine_group,
            },
            "num_params": self.model.num_params(),
            "tp": d.tp_size,
            "topology": {
                "world_size": t.world_size,
                "nodes": t.num_nodes,
                "ranks_per_node": t.local_world_size,
            },  # fmt: skip
        }


def build(cfg: RunConfig, d: Dist, out_dir: Path) -> Built:
    """The model (seeded by train.seed) and the data plane's tokenizer, made to agree."""
    spec, model_cfg = cfg.data, cfg.model
    torch.manual_seed(cfg.train.seed)
    if spec.tokenizer == "model":
        if isinstance(model_cfg, GPTConfig):
            raise ValueError(
                "data.tokenizer: 'model' needs model.kind = 'hf'; use 'byte' or a tokenizer file"
            )
        model = build_model(model_cfg, cfg.recipe_dir)
        path = model.tokenizer_file(out_dir / f"tokenizer.rank{d.rank}.json")
        if path is None:
            raise ValueError("data.tokenizer: 'model', but the model has no tokenizer; name one")
        tokenizer = str(path.resolve())
        vocab = build_tokenizer(tokenizer).vocab_size
    else:
        tokenizer = spec.tokenizer  # as an absolute path (resolved.json, `slipstream export`)
        if tokenizer != "byte":
            tokenizer = str((Path(spec.base_dir) / Path(tokenizer).expanduser()).resolve())
        vocab = build_tokenizer(tokenizer, spec.base_dir).vocab_size
        if isinstance(model_cfg, GPTConfig) and model_cfg.vocab_size == 0:
            model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab)
        model = build_model(model_cfg, cfg.recipe_dir)
    if vocab > model.vocab_size:
        raise ValueError(
            f"data.tokenizer: its vocabulary ({vocab}) is larger than the model's "
            f"({model.vocab_size}); raise model.vocab_size or use the model's tokenizer "
            "(data.tokenizer = 'model')"
        )
    return Built(model, model_cfg, tokenizer)


def write_run_files(out_dir: Path, cfg: RunConfig, resolved: dict) -> None:
    """config.json (the recipe as loaded) and resolved.json (what the run resolved)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(out_dir / "config.json")
    (out_dir / "resolved.json").write_text(json.dumps(resolved, indent=2) + "\n")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 when asked, or on `auto` on a CUDA device that has it; None = fp32."""
    if precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    ):
        return torch.bfloat16
    return None


def sample(model, tokenizer, prompts: list[str], num_tokens: int, seed: int) -> list[str]:
    """One continuation per prompt, prompt included (none when num_tokens is 0)."""
    if not num_tokens:
        return []
    out = []
    was_training = model.training
    model.eval()
    for prompt in prompts:
        ids = tokenizer.encode_batch([prompt])[0][:-1].tolist()  # no end-of-document
        out.append(prompt + tokenizer.decode(model.generate(ids, num_tokens, seed=seed)))
    model.train(was_training)
    return out
