"""All-gather + matmul and matmul + reduce-scatter against the plain reference (torch matmul
and gloo collectives), at 1 to 4 ranks, ragged shapes, fp32 and fp16; 100 calls in a row with
one rank lagging (flags never reset, no buffer overwritten early); the event trace that shows
consumer tiles running while puts are still in flight; the Triton consumer kernel under
TRITON_INTERPRET=1."""

from __future__ import annotations

import os
import random
import time

import pytest
import torch
import torch.distributed as dist

from slipstream.overlap import OverlapGroup, SimLink, all_gather_matmul, matmul_reduce_scatter
from slipstream.overlap.trace import tiles_before_last_put
from tests.overlap.ranks import run_ranks, values

# Tolerances: the overlapped paths sum the same products in another order (per shard, per
# column chunk, partials added in arrival order), so they agree with the reference to
# rounding: a few ulps of the result's magnitude (|y| ~ sqrt(K) ~ 5 here).
TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


def _reference_ag(x_shard, w, world):
    full = [torch.empty_like(x_shard) for _ in range(world)]
    dist.all_gather(full, x_shard)
    return (torch.cat(full).float() @ w.float()).to(x_shard.dtype), torch.cat(full)


def _reference_rs(x, w, rank, world):
    partial = x.float() @ w.float()
    dist.all_reduce(partial)
    m = x.shape[0] // world
    return partial[rank * m : (rank + 1) * m].to(x.dtype)


def _parity(rank: int, world: int) -> list[tuple]:
    errors = []
    for impl in ("shm", "collective", "reference"):
        group = OverlapGroup(None, impl, chunks=3)
        for dtype in (torch.float32, torch.float16):
            for m, k, n in ((5, 7, 3), (1, 16, 33), (13, 9, 8)):  # ragged: nothing divides
                gen = torch.Generator().manual_seed(1000 * rank + m)
                x = torch.randn(m, k, generator=gen).to(dtype)
                w = torch.randn(k, n, generator=torch.Generator().manual_seed(k)).to(dtype)
                y, gathered = all_gather_matmul(x, w, group, return_gathered=True)
                ref_y, ref_x = _reference_ag(x, w, world)
                errors.append((impl, dtype, "ag", float((y.float() - ref_y.float()).abs().max())))
                errors.append((impl, dtype, "gathered", float((gathered - ref_x).abs().max())))
                xr = torch.randn(m * world, k, generator=gen).to(dtype)
                out = matmul_reduce_scatter(xr, w, group)
                ref = _reference_rs(xr, w, rank, world)
                errors.append((impl, dtype, "rs", float((out.float() - ref.float()).abs().max())))
                assert y.dtype == dtype and out.dtype == dtype
        group.close()
    return errors


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_overlapped_ops_match_the_reference(world, tmp_path):
    for rank_errors in values(run_ranks(_parity, world, tmp_path)):
        for impl, dtype, op, err in rank_errors:
            scale = 8.0 if op != "gathered" else 0.0  # the gather itself is exact
            assert err <= TOL[dtype] * scale, (impl, dtype, op, err)


def _many_calls(rank: int, world: int) -> int:
    group = OverlapGroup(None, "shm", timeout_s=30)
    lag = random.Random(rank)
    for call in range(100):
        x = torch.full((4, 6), float(call * 10 + rank))
        w = torch.eye(6)[:, :5]
        if rank == 1 and lag.random() < 0.3:
            time.sleep(0.01)  # a slow consumer: producers must wait for its ack, not overwrite
        y, _ = all_gather_matmul(x, w, group)
        expect = torch.cat([torch.full((4, 5), float(call * 10 + r)) for r in range(world)])
        assert torch.equal(y, expect), f"call {call}: stale or overwritten shard"
        out = matmul_reduce_scatter(torch.full((3 * world, 6), float(call + rank)), w, group)
        assert torch.equal(out, torch.full((3, 5), float(sum(call + r for r in range(world)))))
    return group._workspaces[("ag", (world, 4, 6), torch.float32)].epoch


def test_hundred_calls_in_a_row_without_resetting_flags(tmp_path):
    assert values(run_ranks(_many_calls, 3, tmp_path)) == [100, 100, 100]


def _traced(rank: int, world: int) -> list:
    # Each put takes 40 ms on the simulated link; each tile a few ms of real matmul.
    group = OverlapGroup(None, "shm", link=SimLink(latency_s=0.04), trace=True)
    x, w = torch.randn(64, 64), torch.randn(64, 64)
    for _ in range(3):
        all_gather_matmul(x, w, group)
    events = [None] * world
    dist.all_gather_object(events, group.trace.events)
    return [e for rank_events in events for e in rank_events]


def test_consumer_tiles_start_before_the_last_put_completes(tmp_path):
    world = 3
    events = values(run_ranks(_traced, world, tmp_path))[0]
    for call in (1, 2, 3):
        for rank in range(world):
            # Its own shard and the first arrival are computed while the last put is in flight.
            assert tiles_before_last_put(events, rank, call) >= 2, (rank, call)
            order = [e.peer for e in events if e.rank == rank and e.call == call
                     and e.kind == "tile_start"]  # fmt: skip
            shards = [p for i, p in enumerate(order) if i == 0 or order[i - 1] != p]
            assert shards == [(rank + i) % world for i in range(world)]  # rank + i order


def _triton_consumer(rank: int, world: int, drop: bool) -> list[float]:
    os.environ["TRITON_INTERPRET"] = "1"
    group = OverlapGroup(None, "shm", kernel="triton", timeout_s=1.0 if drop else 60)
    errors = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(19, 24, generator=gen).to(dtype)  # 19 rows: tiles straddle nothing
        w = torch.randn(24, 40, generator=torch.Generator().manual_seed(7)).to(dtype)
        if drop and rank == 1:
            group.workspace("ag", (world, 19, 24), dtype)  # joins the setup, then never puts:
            time.sleep(3)  # rank 0's kernel must give up, not hang
            return errors
        y, _ = all_gather_matmul(x, w, group)
        ref, _ = _reference_ag(x, w, world)
        errors.append(float((y.float() - ref.float()).abs().max()))
    return errors


def test_triton_consumer_kernel_matches_the_reference_under_the_interpreter(tmp_path):
    errs = values(run_ranks(_triton_consumer, 2, tmp_path, False))
    for fp32, fp16, bf16 in errs:
        assert fp32 <= 1e-4  # |y| ~ 5: fp32 accumulation in another order
        assert fp16 <= 2e-2  # the fp16 result's own rounding (ulp at 8-16 is 2^-7)
        assert bf16 <= 2e-1  # bf16 result rounding (ulp at 8-16 is 2^-4), fp32 dot inside


def test_triton_consumer_kernel_times_out_with_a_diagnostic(tmp_path):
    out = run_ranks(_triton_consumer, 2, tmp_path, True)
    status, text = out[0]
    assert status == "error" and text.startswith("SignalTimeout"), text
    assert "shard(s) [1]" in text and "flags" in text


def test_bad_shapes_and_settings_are_refused():
    group = OverlapGroup(None, "shm")
    with pytest.raises(ValueError, match=r"\[m, K\] @ \[K, N\]"):
        all_gather_matmul(torch.ones(2, 3), torch.ones(4, 5), group)
    with pytest.raises(ValueError, match="use one of"):
        OverlapGroup(None, "nccl")
    with pytest.raises(ValueError, match="'torch' or 'triton'"):
        OverlapGroup(None, "shm", kernel="cutlass")


def _late_peer(rank: int, world: int, impl: str) -> float:
    group = OverlapGroup(None, impl)
    x, w = torch.randn(8, 8), torch.randn(8, 8)
    all_gather_matmul(x, w, group)  # workspaces set up; both ranks in step
    dist.barrier()
    before = group.exposed_s
    if rank == 1:
        time.sleep(0.3)  # rank 1 is late: rank 0 can only wait for its shard
    all_gather_matmul(x, w, group)
    return group.exposed_s - before


@pytest.mark.parametrize("impl", ["shm", "collective", "reference"])
def test_waiting_for_a_late_peer_counts_as_exposed_communication(impl, tmp_path):
    waited = values(run_ranks(_late_peer, 2, tmp_path, impl))
    assert waited[0] >= 0.2  # the 0.3 s rank 0 stood still, less the ranks' start skew
    assert waited[1] < waited[0]  # the late rank found its peer's shard waiting


def _tile_and_launch(rank: int, world: int) -> float:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel's module is imported
    from slipstream.overlap.kernels.consumer_gemm import consumer_gemm

    a, b = torch.randn(2 * 40, 24), torch.randn(24, 36)
    flags = torch.ones(2, 2, dtype=torch.int64)
    y, failed = consumer_gemm(a, b, flags, 1, 1, block=(16, 32, 16), num_warps=8, num_stages=3)
    assert failed == []
    return float((y - a @ b).abs().max())


def test_consumer_kernel_takes_a_tile_and_launch_settings(tmp_path):
    """The GPU benchmark tries other tiles and launches (`gpu_overlap.TILES`); the kernel takes
    them and computes the same product (under the interpreter here, where warps and stages
    change nothing but the call must still be valid)."""
    assert values(run_ranks(_tile_and_launch, 1, tmp_path))[0] <= 1e-4
