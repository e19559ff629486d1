"""GPT: a decoder-only transformer (RoPE, RMSNorm, SwiGLU or GELU MLP, tied embeddings) whose
attention honours the data plane's document boundaries: a token attends only to earlier tokens
of its own document (`attention.py` picks the path: varlen flash attention on CUDA under
bf16/fp16, one causal SDPA call per document elsewhere).

Shapes: B batch rows, T tokens per row, D model width, H heads, K head size (D = H * K).
`tensor_parallel_layout` declares how the model splits over tensor-parallel ranks (attention by
heads, the MLP by hidden units, the residual stream by rows between the embedding and the
final norm); the overlap pillar applies it, and nothing here changes under it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from slipstream.models.attention import Layout, attend, plan_layout
from slipstream.models.base import CausalLMBase, TensorParallelLayout
from slipstream.models.config import GPTConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotate(x_BTHK: torch.Tensor, cos_BTK: torch.Tensor, sin_BTK: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, half-split layout."""
    x1, x2 = x_BTHK.chunk(2, dim=-1)
    cos, sin = cos_BTK[:, :, None], sin_BTK[:, :, None]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x_BTHK)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, layout: Layout) -> torch.Tensor:
        """x: [B, T, D] (split by rows under tensor parallelism: qkv then gives [B, T, .] of
        this rank's heads, hence the -1)."""
        B, T = cos.shape[:2]
        q, k, v = self.qkv(x).view(B, T, 3, -1, self.head_dim).unbind(2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = attend(q, k, v, layout).reshape(B, T, -1)
        return self.dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        hidden = int(cfg.mlp_ratio * cfg.d_model * (2 / 3 if self.swiglu else 1))
        hidden = 64 * math.ceil(hidden / 64)
        self.up = nn.Linear(cfg.d_model, hidden * (2 if self.swiglu else 1), bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.dropout(self.down(F.silu(gate) * up))
        return self.dropout(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.norm1, self.attn = RMSNorm(cfg.d_model), Attention(cfg)
        self.norm2, self.mlp = RMSNorm(cfg.d_model), MLP(cfg)

    def forward(self, x, cos, sin, layout: Layout) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, layout)
        return x + self.mlp(self.norm2(x))


class GPT(CausalLMBase):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        assert cfg.vocab_size > 0, "vocab_size is resolved from the tokenizer before building"
        self.cfg = cfg
        self.vocab_size, self.num_layers, self.width = cfg.vocab_size, cfg.n_layer, cfg.d_model
        self.max_context = cfg.max_seq_len
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        half = cfg.d_model // cfg.n_head // 2
        inv_freq = cfg.rope_theta ** (-torch.arange(half, dtype=torch.float64) / half)
        angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), inv_freq)
        self.register_buffer("rope_cos", angles.cos().float(), persistent=False)
        self.register_buffer("rope_sin", angles.sin().float(), persistent=False)
        self.apply(self._init)
        for block in self.blocks:  # residual projections scaled down with depth (GPT-2)
            for w in (block.attn.proj.weight, block.mlp.down.weight):
                nn.init.normal_(w, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=self.cfg.init_std)

    def input_embeddings(self) -> nn.Module:
        return self.embed

    def tied_output(self) -> bool:
        return self.cfg.tie_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        B, T = input_ids.shape
        if self.cfg.max_seq_len < T:
            raise ValueError(f"seq_len {T} exceeds model.max_seq_len {self.cfg.max_seq_len}")
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed(input_ids)
        cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]
        layout = plan_layout(input_ids, doc_ids, cu_seqlens, max_seqlen)
        for block in self.blocks:
            if self.cfg.activation_checkpointing and torch.is_grad_enabled():
                # Non-reentrant: works with DDP, hooks and inputs that need no grad; the RNG
                # state is saved, so dropout draws the same masks in the recompute.
                x = checkpoint(block, x, cos, sin, layout, use_reentrant=False)
            else:
                x = block(x, cos, sin, layout)
        return self.head(self.norm(x))

    def tensor_parallel_layout(self) -> TensorParallelLayout:
        """Attention split by heads (q|k|v fused), the MLP by hidden units (gate|up fused
        under SwiGLU), the rows split from the embedding to the final norm; every rank
        computes the output layer and the loss on all rows."""
        colwise, rowwise, row_local = {}, [], []
        for i, block in enumerate(self.blocks):
            at = f"blocks.{i}"
            colwise[f"{at}.attn.qkv"] = 3
            colwise[f"{at}.mlp.up"] = 2 if block.mlp.swiglu else 1
            rowwise += [f"{at}.attn.proj", f"{at}.mlp.down"]
            row_local += [f"{at}.norm1.weight", f"{at}.norm2.weight"]
        return TensorParallelLayout(
            colwise=colwise,
            rowwise=tuple(rowwise),
            scatter_after="embed",
            gather_before="norm",
            row_local=tuple(row_local),
            divides={"model.n_head": self.cfg.n_head},
        )
