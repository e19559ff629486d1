"""The consumer GEMM of all-gather + matmul as a Triton kernel: each program computes one
[BLOCK_M, BLOCK_N] tile of y = A @ B, where A is the symmetric gather buffer [world * m, K],
and before loading its rows waits until the flag of the shard they belong to reaches this
call's epoch. Programs walk shards in rank + i order (program 0 takes this rank's own shard),
the order the producers deliver them.

The wait is bounded: after `max_spins` polls the tile gives up, computes nothing useful and
marks itself in `status`; the host turns that into an error naming the shards and the flags,
instead of a hang. Runs on the GPU, and on CPU tensors under TRITON_INTERPRET=1 (where an
interpreted program can spin on a flag another process sets in shared memory). On CPU tensors
(the interpreter) bf16 is upcast to fp32 before the dot (the interpreter's bf16 dot is wrong); on
the GPU the dot takes bf16 operands on the tensor cores, accumulating in fp32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
SPINS_PER_S = 2_000 if INTERPRETED else 2_000_000
"""Rough polls per second (a poll is a Python step in the interpreter, ~1 us on a GPU): turns
a timeout into a spin budget."""


@triton.jit
def _consumer_gemm(
    a_ptr, b_ptr, c_ptr, flag_ptr, status_ptr,
    m_shard, N, K, world, rank, epoch, max_spins,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_f0, stride_f1,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, ACQUIRE: tl.constexpr, WAIT: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    tiles_per_shard = tl.cdiv(m_shard, BLOCK_M)
    src = (rank + pid_m // tiles_per_shard) % world
    # Shard src's ready flag is written only by rank src, into its own slot [src, src].
    flag = flag_ptr + src * stride_f0 + src * stride_f1
    ok = True
    if WAIT:  # off only to measure what the waits cost
        if ACQUIRE:  # GPU: an acquire load orders the data loads below after the flag
            seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")
        else:
            seen = tl.load(flag, volatile=True)
        spins = 0
        while (seen < epoch) & (spins < max_spins):
            if ACQUIRE:
                seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")
            else:
                seen = tl.load(flag, volatile=True)
            spins += 1
        ok = seen >= epoch
    tl.store(status_ptr + pid_m * tl.num_programs(1) + pid_n, tl.where(ok, 0, 1))

    valid_end = (src + 1) * m_shard
    row_end = tl.where(ok, valid_end, 0)  # a tile that gave up loads nothing
    rows = src * m_shard + (pid_m % tiles_per_shard) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a_mask = (rows[:, None] < row_end) & (ks[None, :] < K)
        a = tl.load(
            a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak, mask=a_mask, other=0.0
        )
        b_mask = (ks[:, None] < K) & (cols[None, :] < N)
        b = tl.load(
            b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn, mask=b_mask, other=0.0
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b)
    c_mask = (rows[:, None] < valid_end) & (cols[None, :] < N)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty), mask=c_mask)  # fmt: skip


def consumer_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    flags: torch.Tensor,
    rank: int,
    epoch: int,
    timeout_s: float = 30.0,
    block: tuple[int, int, int] | None = None,
    wait: bool = True,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """(y = a @ b, the shards whose flags never reached `epoch`). a: [world * m, K], the
    gather buffer; flags: int64 [world, world], row src = shard src's ready flag. `block`,
    `num_warps`, `num_stages`: the tile and its launch (Triton's defaults if not given)."""
    world = flags.shape[0]
    if a.shape[0] % world or a.shape[1] != b.shape[0]:
        raise ValueError(
            f"consumer_gemm: a {tuple(a.shape)} @ b {tuple(b.shape)} over {world} shards"
        )
    m, (K, N) = a.shape[0] // world, b.shape
    bm, bn, bk = block or ((32, 32, 32) if INTERPRETED else (128, 128, 64))
    c = torch.empty((a.shape[0], N), dtype=torch.result_type(a, b), device=a.device)
    tiles_per_shard = triton.cdiv(m, bm)
    grid = (world * tiles_per_shard, triton.cdiv(N, bn))
    status = torch.zeros(grid, dtype=torch.int32, device=a.device)
    _consumer_gemm[grid](
        a, b, c, flags, status,
        m, N, K, world, rank, epoch, int(timeout_s * SPINS_PER_S),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        flags.stride(0), flags.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        UPCAST=not a.is_cuda and torch.bfloat16 in (a.dtype, b.dtype),
        ACQUIRE=a.is_cuda,
        WAIT=wait,
        **({} if num_warps is None else {"num_warps": num_warps}),
        **({} if num_stages is None else {"num_stages": num_stages}),
    )  # fmt: skip
    failed = status.amax(dim=1).view(world, tiles_per_shard).amax(dim=1).nonzero().flatten()
    steps = failed.tolist()
    return c, sorted((rank + s) % world for s in steps)
