"""The GPT: document masking, shapes, parameter count, generation."""

from __future__ import annotations

import torch

from slipstream.models import GPT, GPTConfig, document_mask


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, d_model=32, max_seq_len=16, **kw))


def test_a_token_sees_only_its_own_document():
    # Row = doc A (5 tokens) + doc B (4 tokens): B's outputs must equal B run alone, with
    # positions restarting at 0.
    model = tiny().eval()
    a, b = torch.randint(0, 50, (5,)), torch.randint(0, 50, (4,))
    packed = torch.cat([a, b])[None]
    pos = torch.cat([torch.arange(5), torch.arange(4)])[None]
    docs = torch.tensor([[0] * 5 + [1] * 4])
    out = model(packed, pos, docs)
    alone_a, alone_b = model(a[None]), model(b[None])
    # fp32 attention over different key sets sums in another order: agreement to ~1e-6.
    torch.testing.assert_close(out[0, 5:], alone_b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0, :5], alone_a[0], atol=1e-5, rtol=1e-5)


def test_document_mask_is_block_diagonal_causal_and_never_empty():
    m = document_mask(torch.tensor([[0, 0, 1, 1, -1]]))[0, 0]
    assert m.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [False, False, True, False, False],
        [False, False, True, True, False],
        [False, False, False, False, True],
    ]


def test_gelu_and_untied_variants_build_and_count_parameters():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert untied.num_params() == tied.num_params() + 50 * 32
    assert tiny(mlp="gelu")(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 50)
    assert tied.num_params(embeddings=False) == tied.num_params() - 50 * 32
    assert tied(torch.zeros(2, 16, dtype=torch.long)).shape == (2, 16, 50)


def test_generate_is_seeded():
    model = tiny().eval()
    assert model.generate([1, 2], 20, seed=3) == model.generate([1, 2], 20, seed=3)
    # 20 tokens from a near-uniform 50-way distribution: two seeds agree with odds ~1e-34.
    assert model.generate([1, 2], 20, seed=3) != model.generate([1, 2], 20, seed=4)
    assert len(model.generate([1, 2], 5)) == 5


def test_dropout_is_active_in_training_only():
    model = tiny(dropout=0.5)
    ids = torch.randint(0, 50, (1, 8))
    model.train()
    assert not torch.equal(model(ids), model(ids))
    model.eval()
    assert torch.equal(model(ids), model(ids))


def test_per_document_attention_matches_the_dense_mask(monkeypatch):
    from slipstream.models import attention

    monkeypatch.setattr(attention, "CALL_COST", 0)  # per-document calls even at this size
    # Row 0: documents of 3 and 2 tokens, then 3 of padding; row 1: documents of 5 and 3.
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, -1, -1, -1], [0, 0, 0, 0, 0, 1, 1, 1]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 0, 1, 2]])
    cu = torch.tensor([0, 3, 5, 8, 13, 16], dtype=torch.int32)
    ids = torch.randint(0, 50, (2, 8))
    assert attention.plan_layout(ids[..., None], doc_ids, cu, 5).kind == "segments"
    model = tiny()
    dense = model(ids, pos, doc_ids)  # one SDPA call with a block-diagonal mask
    dense.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    per_doc = model(ids, pos, doc_ids, cu, 5)  # one causal SDPA call per document
    per_doc.square().sum().backward()
    # Same math, other summation order (fp32): agreement to ~1e-6.
    torch.testing.assert_close(per_doc, dense, atol=1e-5, rtol=1e-5)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


def test_activation_checkpointing_gives_the_same_gradients_and_saves_less():
    from slipstream.tools.memory import saved_activation_bytes

    ids = torch.randint(0, 50, (2, 16))
    grads = []
    for ckpt in (False, True):
        model = tiny(activation_checkpointing=ckpt, dropout=0.1)
        torch.manual_seed(1)  # dropout masks: the recompute must draw the same ones
        model(ids).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # same math, recomputed
    cfg = GPTConfig(vocab_size=50, n_layer=4, n_head=2, d_model=64, max_seq_len=64)
    full = saved_activation_bytes(cfg, 4, 64, torch.float32)
    kept = saved_activation_bytes(
        GPTConfig(**{**cfg.to_dict(), "activation_checkpointing": True}), 4, 64, torch.float32
    )
    assert kept < 0.5 * full
