"""The model seam: `CausalLM`, what the trainer needs of any model, and `CausalLMBase`, the
parts every model shares (parameter counts, FLOPs per token, sampling). A model that can be
split over tensor-parallel ranks declares how (`TensorParallelLayout`); the overlap pillar
applies the declaration from outside, so a model holds no tensor-parallel code."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn


@runtime_checkable
class CausalLM(Protocol):
    vocab_size: int

    def __call__(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] of a packed batch; attention stays within documents."""
        ...

    def num_params(self, embeddings: bool = True) -> int: ...

    def flops_per_token(self, seq_len: int) -> float: ...

    def generate(self, ids: list[int], max_new_tokens: int, seed: int = 0) -> list[int]: ...

    def tokenizer_file(self, out: Path) -> Path | None:
        """Write the model's own tokenizer (a `tokenizers` JSON file) for the data plane to
        use, and return its path; None when the model has none (the data spec names one)."""
        ...


@dataclass(frozen=True, slots=True)
class TensorParallelLayout:
    """How a model splits over tensor-parallel ranks, by module and parameter names (as
    `named_modules()` gives them). Between `scatter_after` and `gather_before` the residual
    stream is split by rows (tokens) across the ranks (sequence parallel)."""

    colwise: dict[str, int]
    """Linear layers whose output features are split, each with the number of equal fused
    blocks its weight holds (q|k|v: 3, gate|up: 2), each block split alike. Each gathers its
    input rows as it multiplies (all-gather + matmul)."""
    rowwise: tuple[str, ...]
    """Linear layers whose input features are split (their outputs are summed and scattered
    by rows: matmul + reduce-scatter)."""
    gather_before: str
    """The module whose input, row shards, is gathered back to the full rows [B, T, D]."""
    scatter_after: str = ""
    """The module whose output, the full rows [B, T, D], is split by rows ..."""
    scatter_before: str = ""
    """... or the module whose input is (exactly one of the two)."""
    gather_inputs: tuple[str, ...] = ()
    """Modules whose input rows are gathered once for the several split layers inside them
    (an attention's q, k and v projections): their layers are `colwise_local`."""
    colwise_local: dict[str, int] = field(default_factory=dict)
    """Linear layers (biases allowed) whose output features are split and whose input is
    already the full rows (inside a `gather_inputs` module): a local matmul."""
    row_local: tuple[str, ...] = ()
    """Replicated parameters that see only this rank's rows (their gradients are summed)."""
    divides: dict[str, int] = field(default_factory=dict)
    """Sizes the tensor-parallel size must divide, by the config field that sets them."""


class CausalLMBase(nn.Module):
    """Shared parts; a model sets `vocab_size`, `num_layers`, `width`, `max_context`, and
    implements `forward` and `input_embeddings`."""

    vocab_size: int
    num_layers: int
    width: int
    max_context: int

    def input_embeddings(self) -> nn.Module:
        raise NotImplementedError

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.input_embeddings().weight.numel()

    def tied_output(self) -> bool:
        """Whether the output projection is the input embedding (then it is not counted in
        num_params(embeddings=False), but its matmul still runs)."""
        return False

    def weight_flops_per_token(self) -> float:
        """Training FLOPs per token of the weights' matmuls (6 per weight used)."""
        head = self.vocab_size * self.width if self.tied_output() else 0
        return 6.0 * (self.num_params(embeddings=False) + head)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: the weights plus attention over full causal rows of
        seq_len (forward 2 * layers * width * seq_len, backward twice that)."""
        return self.weight_flops_per_token() + 6 * self.num_layers * self.width * seq_len

    def attention_cost(self) -> float:
        """A squared document token's cost relative to a token's weight FLOPs: causal
        attention over a document of n tokens does 6 * layers * width * n^2 training FLOPs.
        The data plane balances ranks with it."""
        return 6.0 * self.num_layers * self.width / self.weight_flops_per_token()

    def tokenizer_file(self, out: Path) -> Path | None:
        return None

    def tensor_parallel_layout(self) -> TensorParallelLayout:
        raise ValueError(
            f"parallel.tp: {type(self).__name__} declares no tensor-parallel layout; use "
            "parallel.tp = 1 with this model"
        )

    @torch.no_grad()
    def generate(
        self,
        ids: list[int],
        max_new_tokens: int,
        temperature: float = 0.8,
        top_k: int = 40,
        seed: int = 0,
    ) -> list[int]:
        """Sample a continuation, top-k, seeded (no KV cache: the demo models are small)."""
        device = self.input_embeddings().weight.device
        g = torch.Generator(device=device).manual_seed(seed)
        out = list(ids)
        for _ in range(max_new_tokens):
            ctx = torch.tensor([out[-self.max_context :]], device=device)
            logits = self(ctx)[0, -1].float() / max(temperature, 1e-5)
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits[logits < kth] = -float("inf")
            out.append(int(torch.multinomial(F.softmax(logits, -1), 1, generator=g)))
        return out[len(ids) :]
