"""Tensor-parallel layers and a tensor-parallel GPT against the unsharded model on one
process: the same outputs and, gathered, the same gradients, at 2 and 4 ranks, for every
overlap implementation."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from slipstream.models import GPTConfig, build_model
from slipstream.overlap import OverlapGroup
from slipstream.overlap.layout import apply_tensor_parallel
from slipstream.overlap.tp import ColumnParallelLinear, RowParallelLinear, scatter_rows
from tests.overlap.ranks import run_ranks, values

CFG = dict(kind="gpt", vocab_size=97, n_layer=2, n_head=4, d_model=32, max_seq_len=16)


def _gather_dim(t: torch.Tensor, dim: int, parts: int, world: int) -> torch.Tensor:
    """Reassemble a weight split by `_split` (per part, then per rank)."""
    pieces = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(pieces, t.contiguous())
    per_rank = [p.chunk(parts, dim) for p in pieces]
    return torch.cat([torch.cat([r[i] for r in per_rank], dim) for i in range(parts)], dim)


def _layers(rank: int, world: int, impl: str) -> float:
    group = OverlapGroup(None, impl)
    torch.manual_seed(0)
    up, down = torch.nn.Linear(8, 12, bias=False), torch.nn.Linear(12, 8, bias=False)
    x = torch.randn(6 * world, 8, requires_grad=True)
    ref = down(F.gelu(up(x)))
    ref.square().sum().backward()
    col = ColumnParallelLinear.from_linear(up, group)
    row = RowParallelLinear.from_linear(down, group)
    x2 = x.detach().clone().requires_grad_()
    y = row(F.gelu(col(scatter_rows(x2, group))))  # this rank's rows of the output
    y.square().sum().backward()
    m = 6
    errs = [(y - ref[rank * m : (rank + 1) * m]).abs().max()]
    # scatter_rows' backward gathers every rank's rows: the full input gradient everywhere
    errs.append((x2.grad - x.grad).abs().max())
    errs.append((_gather_dim(col.weight.grad, 0, 1, world) - up.weight.grad).abs().max())
    errs.append((_gather_dim(row.weight.grad, 1, 1, world) - down.weight.grad).abs().max())
    return float(max(errs))


@pytest.mark.parametrize("impl", ["shm", "collective"])
def test_column_and_row_parallel_layers_match_nn_linear(impl, tmp_path):
    for err in values(run_ranks(_layers, 2, tmp_path, impl)):
        assert err < 1e-5  # fp32, sums in another order


def _split_against_whole(cfg, impl: str, world: int, split_dim) -> dict:
    """The largest difference from the whole model, in the logits and in every parameter's
    gradient (split ones gathered: `split_dim(name)` gives (dim, fused parts))."""
    torch.manual_seed(1)
    full = build_model(cfg, ".")
    torch.manual_seed(1)
    model = build_model(cfg, ".")
    plan = apply_tensor_parallel(model, model.tensor_parallel_layout(), OverlapGroup(None, impl))
    ids = torch.randint(0, 97, (3, 15))  # 45 rows: pads to a multiple of tp
    doc_ids = (torch.arange(15) >= 6).long().expand(3, 15)  # two documents per row
    pos = torch.where(doc_ids == 0, torch.arange(15), torch.arange(15) - 6)
    torch.manual_seed(2)  # every rank draws the same batch and target weights
    weights = torch.randn(3, 15, 97)
    ref = full(ids, pos, doc_ids)
    (ref * weights).sum().backward()
    out = model(ids, pos, doc_ids)
    (out * weights).sum().backward()
    plan.reduce_partial_grads()
    err = {"logits": float((out - ref).abs().max())}
    sharded = {id(p) for p in plan.sharded}
    full_params = dict(full.named_parameters())
    for name, p in model.named_parameters():
        g = p.grad
        if id(p) in sharded:
            g = _gather_dim(g, *split_dim(name), world)
        err[name] = float((g - full_params[name].grad).abs().max())
    return err


def _gpt(rank: int, world: int, impl: str, mlp: str) -> dict:
    def split_dim(name: str) -> tuple[int, int]:
        dim = 1 if name.endswith(("proj.weight", "down.weight")) else 0
        return dim, 3 if "qkv" in name else (2 if "up" in name and mlp == "swiglu" else 1)

    return _split_against_whole(GPTConfig(**{**CFG, "mlp": mlp}), impl, world, split_dim)


@pytest.mark.parametrize(
    ("world", "impl", "mlp"),
    [
        (2, "shm", "swiglu"),
        (2, "collective", "gelu"),
        (4, "shm", "gelu"),
        (2, "reference", "swiglu"),
    ],
)
def test_tensor_parallel_gpt_matches_the_unsharded_model(world, impl, mlp, tmp_path):
    for errors in values(run_ranks(_gpt, world, tmp_path, impl, mlp)):
        for name, err in errors.items():
            # fp32 throughout; logits ~1, gradients summed over 45 rows x 97 weights:
            # agreement to ~1e-5 is rounding in another summation order.
            assert err < 5e-5, (name, err)


LLAMA = {
    "model_type": "llama",
    "vocab_size": 97,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention: heads and their shared keys split alike
    "intermediate_size": 64,
    "max_position_embeddings": 16,
}


def _llama(rank: int, world: int, impl: str) -> dict:
    from slipstream.models import HFConfig

    def split_dim(name: str) -> tuple[int, int]:
        return (1 if name.endswith(("o_proj.weight", "down_proj.weight")) else 0), 1

    return _split_against_whole(HFConfig(config=dict(LLAMA)), impl, world, split_dim)


@pytest.mark.parametrize(("world", "impl"), [(2, "shm"), (2, "collective")])
def test_tensor_parallel_llama_matches_the_unsharded_model(world, impl, tmp_path):
    """A Hugging Face Llama split by its declared layout (gathered once per attention and
    MLP, heads and key/value heads split alike) against the whole model."""
    pytest.importorskip("transformers")
    for errors in values(run_ranks(_llama, world, tmp_path, impl)):
        for name, err in errors.items():
            assert err < 5e-5, (name, err)  # fp32; the GPT's tolerance, same argument


def test_heads_that_do_not_split_are_refused():
    model = build_model(GPTConfig(**{**CFG, "n_head": 2}), ".")

    class Three:
        world_size, rank = 3, 0

    with pytest.raises(ValueError, match="does not divide model.n_head"):
        apply_tensor_parallel(model, model.tensor_parallel_layout(), Three())
