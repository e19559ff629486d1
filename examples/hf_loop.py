"""Slipstream's data plane feeding your own training loop and a Hugging Face model.

The loader alone: a weighted mixture of sources, packed rows, balanced ranks, exact resume,
and batches in the Hugging Face label convention (`labels="hf"`: the model shifts labels
itself). Packed documents are kept apart by position ids that restart per document and a 4-D
block-diagonal causal mask (CPU and SDPA need the mask; flash-attention-2 models can use the
position ids alone).

    python examples/hf_loop.py recipes/data/demo.toml --steps 20
"""

from __future__ import annotations

import argparse

import torch

from slipstream.data import MixtureLoader, MixtureSpec
from slipstream.models import document_mask


def tiny_llama(vocab_size: int, max_len: int):
    """A small randomly initialized Llama from `transformers`; use your own model instead."""
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max_len,
    )
    return LlamaForCausalLM(conf)


def train(spec: MixtureSpec, steps: int, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Train a tiny Llama for `steps` steps from the loader; returns the losses."""
    torch.manual_seed(seed)
    loader = MixtureLoader(spec, labels="hf")  # one rank; under torchrun pass rank, world size
    model = tiny_llama(loader.tokenizer.vocab_size, spec.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    with loader:
        for _ in range(steps):
            for mb in next(loader).micro_batches:
                out = model(
                    input_ids=mb["input_ids"],
                    position_ids=mb["position_ids"],
                    attention_mask=document_mask(mb["doc_ids"]),
                    labels=mb["labels"],
                )
                (out.loss / spec.num_micro_batches).backward()
                losses.append(out.loss.item())
            opt.step()
            opt.zero_grad(set_to_none=True)
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", help="a mixture spec TOML file")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    spec = MixtureSpec.from_toml(args.spec, ["seq_len=128", "micro_batch_size=4"])
    losses = train(spec, args.steps)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps")


if __name__ == "__main__":
    main()
