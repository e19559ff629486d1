"""Attention over packed rows, kept within documents, by the cheapest path the device has:

- `varlen`: one variable-length flash-attention call over `cu_seqlens` (CUDA, bf16/fp16);
- `segments`: one causal SDPA call per document piece (any device): its cost follows
  sum(len^2) of the documents, not T^2 per row, so packing short documents is cheaper, as with
  a varlen kernel. Each call has a fixed cost, so it is taken only when that pays (below);
- `mask`: SDPA with a dense block-diagonal causal mask (cost ~ rows * T^2);
- `causal`: one causal SDPA call per row, when the row is one document (e.g. sampling).

Shapes: B rows, T tokens, H heads, K head size; `cu_seqlens` marks the segments of the
flattened [B * T] batch (padding is a segment of its own), as the data plane builds it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slipstream.models.masks import document_mask


@functools.cache
def _varlen_attn():
    """torch's variable-length flash attention (CUDA only), or None. Imported on first use on
    a CUDA device: importing it loads torch._dynamo, 1.3 s of every process's start."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # pragma: no cover - older torch
        return None
    return varlen_attn


# Per-document calls win when sum(len^2) + CALL_COST * calls < DENSE_COST * rows * T^2.
# Measured on 2 x86 cores, 4 heads of 48, forward + backward: a dense masked SDPA costs ~13 ns
# per T^2, a causal one ~6.5 ns per len^2, plus ~0.65 ms per call. So at 256 tokens a dense
# mask is faster; at 1,024 and more, per-document calls are (1.3x for one document per row,
# 2-3x for several). The choice changes speed only, never results.
DENSE_COST = 2.0
CALL_COST = 100_000


@dataclass(slots=True)
class Layout:
    """How one forward pass attends; computed once, used by every layer."""

    kind: str  # varlen | segments | mask | causal
    mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    segments: list[tuple[int, int]] | None = None


def plan_layout(
    x: torch.Tensor,
    doc_ids: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
) -> Layout:
    if cu_seqlens is not None:
        if x.is_cuda and _half_autocast() and _varlen_attn() is not None:
            return Layout("varlen", cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        bounds = cu_seqlens.tolist()  # a device sync on CUDA; free on CPU
        segments = list(zip(bounds[:-1], bounds[1:], strict=True))
        B, T = x.shape[:2]
        per_doc = sum((e - s) ** 2 for s, e in segments) + CALL_COST * len(segments)
        if doc_ids is None or per_doc < DENSE_COST * B * T * T:
            return Layout("segments", segments=segments)
    if doc_ids is not None:
        return Layout("mask", mask=document_mask(doc_ids))
    return Layout("causal")


def _half_autocast() -> bool:
    return torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in (
        torch.bfloat16,
        torch.float16,
    )


def attend(q_BTHK: torch.Tensor, k_BTHK: torch.Tensor, v_BTHK: torch.Tensor, lay: Layout):
    """Causal attention within documents; returns [B, T, H, K]."""
    B, T, H, K = q_BTHK.shape
    if lay.kind == "varlen":
        flat = [t.reshape(B * T, H, K) for t in (q_BTHK, k_BTHK, v_BTHK)]
        y = _varlen_attn()(
            *flat,
            lay.cu_seqlens,
            lay.cu_seqlens,
            lay.max_seqlen,
            lay.max_seqlen,
            window_size=(-1, 0),
        )
        return y.view(B, T, H, K)
    if lay.kind == "segments":
        # [1, H, B * T, K]: 4-D inputs (with a batch dimension) take SDPA's fused CPU kernel;
        # 3-D ones fall back to a slow path.
        q, k, v = (t.reshape(1, B * T, H, K).transpose(1, 2) for t in (q_BTHK, k_BTHK, v_BTHK))
        parts = [
            F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True)
            for s, e in lay.segments
        ]
        return torch.cat(parts, dim=2).transpose(1, 2).reshape(B, T, H, K)
    q, k, v = (t.transpose(1, 2) for t in (q_BTHK, k_BTHK, v_BTHK))
    if lay.kind == "mask":
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=lay.mask)
    else:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2)
