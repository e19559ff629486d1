"""GPT: a decoder-only transformer (RoPE, RMSNorm, SwiGLU or GELU MLP, tied embeddings) whose
attention honours the data plane's document boundaries: a token attends only to earlier tokens
of its own document (`attention.py` picks the path: varlen flash attention on CUDA under
bf16/fp16, one causal SDPA call per document elsewhere).

Shapes: B batch rows, T tokens per row, D model width, H heads, K head size (D = H * K).
Under tensor parallelism (`shard_tensor_parallel`) the attention and MLP projections are split
across ranks by heads and hidden units and the residual stream by rows (sequence parallel).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from slipstream.models.attention import Layout, attend, plan_layout
from slipstream.models.base import CausalLMBase
from slipstream.models.config import GPTConfig
from slipstream.overlap.group import OverlapGroup
from slipstream.overlap.tp import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelPlan,
    gather_rows,
    scatter_rows,
)


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
        """x: [B, T, D], or under tensor parallelism this rank's rows [R / tp, D] (R = B * T
        padded to a multiple of tp); then qkv gives every row for this rank's heads."""
        B, T = cos.shape[:2]
        qkv = self.qkv(x)
        rows = qkv.shape[0] if qkv.dim() == 2 else 0
        q, k, v = qkv[: B * T].view(B, T, 3, -1, self.head_dim).unbind(2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = attend(q, k, v, layout).reshape(B, T, -1)
        if rows:  # back to the padded rows the row-parallel projection splits
            y = F.pad(y.view(B * T, -1), (0, 0, 0, rows - B * T))
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
        self.tp: OverlapGroup | None = None
        self.tp_plan: TensorParallelPlan | None = None
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
        layout = plan_layout(x, doc_ids, cu_seqlens, max_seqlen)
        if self.tp is not None:  # the residual stream is split by rows across the group
            x = F.pad(x.view(B * T, -1), (0, 0, 0, -(B * T) % self.tp.world_size))
            x = scatter_rows(x, self.tp)
        for block in self.blocks:
            if self.cfg.activation_checkpointing and torch.is_grad_enabled():
                # Non-reentrant: works with DDP, hooks and inputs that need no grad; the RNG
                # state is saved, so dropout draws the same masks in the recompute.
                x = checkpoint(block, x, cos, sin, layout, use_reentrant=False)
            else:
                x = block(x, cos, sin, layout)
        if self.tp is not None:  # every rank computes the output layer on all rows
            x = gather_rows(x, self.tp)[: B * T].view(B, T, -1)
        return self.head(self.norm(x))

    def shard_tensor_parallel(self, group: OverlapGroup) -> TensorParallelPlan:
        """Split the attention and MLP projections across `group` (heads and hidden units),
        in place, keeping this rank's slices of the weights built so far (so a sharded model
        starts from the same weights as the unsharded one)."""
        tp = group.world_size
        if self.cfg.n_head % tp:
            raise ValueError(
                f"parallel.tp: {tp} does not divide model.n_head {self.cfg.n_head}; choose a "
                "tensor-parallel size that divides the number of heads"
            )
        plan = TensorParallelPlan(group)
        for block in self.blocks:
            attn, mlp = block.attn, block.mlp
            attn.qkv = ColumnParallelLinear.from_linear(attn.qkv, group, parts=3)
            attn.proj = RowParallelLinear.from_linear(attn.proj, group)
            mlp.up = ColumnParallelLinear.from_linear(mlp.up, group, parts=2 if mlp.swiglu else 1)
            mlp.down = RowParallelLinear.from_linear(mlp.down, group)
            plan.sharded += [attn.qkv.weight, attn.proj.weight, mlp.up.weight, mlp.down.weight]
            plan.partial += [block.norm1.weight, block.norm2.weight]  # see only local rows
        self.tp, self.tp_plan = group, plan
        return plan
