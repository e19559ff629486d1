"""GPT: a decoder-only transformer (RoPE, RMSNorm, SwiGLU or GELU MLP, tied embeddings) whose
attention honours the data plane's document boundaries: a token attends only to earlier tokens
of its own document. On CUDA with bf16/fp16 that is one variable-length flash-attention call
over `cu_seqlens`; elsewhere `scaled_dot_product_attention` with a block-diagonal causal mask.

Shapes: B batch rows, T tokens per row, D model width, H heads, K head size (D = H * K).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

try:  # variable-length flash attention (CUDA only)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch
    varlen_attn = None


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The model. `kind = "gpt"` builds Slipstream's GPT; `kind = "hf"` loads a Hugging Face
    causal LM (see `hf_model.py`)."""

    kind: str = "gpt"
    """`gpt` or `hf`."""
    vocab_size: int = 0
    """0 = the data plane tokenizer's vocabulary size."""
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    mlp: str = "swiglu"
    """`swiglu` or `gelu`."""
    mlp_ratio: float = 4.0
    """Hidden width / d_model for GELU; SwiGLU uses 2/3 of it (same parameter count)."""
    rope_theta: float = 10_000.0
    max_seq_len: int = 1024
    """Longest row the model takes; must be >= the data plane's seq_len."""
    tie_embeddings: bool = True
    init_std: float = 0.02
    hf_path: str = ""
    """kind = hf: a local model folder (relative to the recipe)."""
    hf_gguf_file: str = ""
    """kind = hf: a GGUF file inside `hf_path`, for models shipped as GGUF."""
    hf_config: dict | None = None
    """kind = hf: build from a config instead (e.g. {model_type = "llama", ...}), random init."""

    def __post_init__(self) -> None:
        if self.kind not in ("gpt", "hf"):
            raise ValueError(f"model.kind: {self.kind!r} is unknown; use 'gpt' or 'hf'")
        if self.kind == "gpt":
            if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
                raise ValueError(
                    f"model.d_model: {self.d_model} must split into {self.n_head} heads of an "
                    "even size; change d_model or n_head"
                )
            if self.mlp not in ("swiglu", "gelu"):
                raise ValueError(f"model.mlp: {self.mlp!r} is unknown; use 'swiglu' or 'gelu'")
            for key in ("n_layer", "n_head", "d_model", "max_seq_len"):
                if getattr(self, key) <= 0:
                    raise ValueError(f"model.{key}: must be > 0")
        elif not (self.hf_path or self.hf_config):
            raise ValueError("model: kind = 'hf' needs hf_path (a local folder) or hf_config")

    def to_dict(self) -> dict:
        return asdict(self)


def document_mask(doc_ids_BT: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool: query i sees key j when j <= i and both are in the same document
    (padding, doc id -1, sees only padding, so no row is empty)."""
    T = doc_ids_BT.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids_BT.device).tril()
    same = doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :]
    return (same & causal)[:, None]


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
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BTD, cos, sin, mask, cu_seqlens, max_seqlen) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).view(B, T, 3, self.n_head, self.head_dim).unbind(2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if mask is None:  # varlen: the batch is one long sequence cut at cu_seqlens
            flat = [t.reshape(B * T, self.n_head, self.head_dim) for t in (q, k, v)]
            y = varlen_attn(
                *flat, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, window_size=(-1, 0)
            )
        else:
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
            ).transpose(1, 2)
        return self.proj(y.reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        hidden = int(cfg.mlp_ratio * cfg.d_model * (2 / 3 if self.swiglu else 1))
        hidden = 64 * math.ceil(hidden / 64)
        self.up = nn.Linear(cfg.d_model, hidden * (2 if self.swiglu else 1), bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1, self.attn = RMSNorm(cfg.d_model), Attention(cfg)
        self.norm2, self.mlp = RMSNorm(cfg.d_model), MLP(cfg)

    def forward(self, x, cos, sin, mask, cu_seqlens, max_seqlen) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, mask, cu_seqlens, max_seqlen)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.vocab_size > 0, "vocab_size is resolved from the tokenizer before building"
        self.cfg = cfg
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

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.embed.weight.numel()

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per weight plus attention scores (full causal rows)."""
        c = self.cfg
        return 6 * self.num_params(embeddings=False) + 6 * c.n_layer * c.d_model * seq_len

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
        if doc_ids is None:
            doc_ids = torch.zeros_like(input_ids)
        x = self.embed(input_ids)
        cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]
        use_varlen = (
            varlen_attn is not None
            and cu_seqlens is not None
            and x.is_cuda
            and torch.get_autocast_dtype("cuda") in (torch.bfloat16, torch.float16)
            and torch.is_autocast_enabled("cuda")
        )
        mask = None if use_varlen else document_mask(doc_ids)
        for block in self.blocks:
            x = block(x, cos, sin, mask, cu_seqlens, max_seqlen)
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate(
        self,
        ids: list[int],
        max_new_tokens: int,
        temperature: float = 0.8,
        top_k: int = 40,
        seed: int = 0,
    ) -> list[int]:
        """Sample a continuation (no KV cache: the demo models are small)."""
        device = self.embed.weight.device
        g = torch.Generator(device=device).manual_seed(seed)
        out = list(ids)
        for _ in range(max_new_tokens):
            ctx = torch.tensor([out[-self.cfg.max_seq_len :]], device=device)
            logits = self(ctx)[0, -1].float() / max(temperature, 1e-5)
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits[logits < kth] = -float("inf")
            out.append(int(torch.multinomial(F.softmax(logits, -1), 1, generator=g)))
        return out[len(ids) :]


def build_model(cfg: ModelConfig, base_dir: str = ".") -> nn.Module:
    """Slipstream's GPT, or the Hugging Face adapter for `kind = "hf"`."""
    if cfg.kind == "hf":
        from slipstream.train.hf_model import HFCausalLM

        return HFCausalLM(cfg, base_dir)
    return GPT(cfg)
