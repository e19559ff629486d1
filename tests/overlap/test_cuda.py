"""The overlap pieces on a CUDA device (skipped without one): the Triton consumer kernel built
for the GPU against a float64 reference, waiting on flags another stream raises later, and
giving up on a flag nobody raises; the `cuda` symmetric heap (torch's symmetric memory) in one
process; and, with two GPUs, both overlapped operations between two processes.

Two processes sharing one GPU (torch's TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES mode) are no
stand-in for two GPUs: on an H200 the all-gather's first call passed, then the
reduce-scatter's workspace (the group's second symmetric allocation) never saw rank 0's
signals on rank 1 (benchmarks/results/2026-11-30-gpu-session.md). Whether that is this code
or the shared-device mode needs a machine with two GPUs to tell."""

from __future__ import annotations

import time

import pytest
import torch

from tests.overlap.ranks import run_ranks, values

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
# ||y - ref|| / ||ref|| against float64: fp32 operands go through tf32 in Triton's dot by
# default (~3e-4); 16-bit operands are exact products summed in fp32, then the output rounded.
REL = {torch.float32: 2e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_consumer_kernel_on_the_gpu_matches_float64(dtype):
    from slipstream.overlap.kernels.consumer_gemm import consumer_gemm

    world, m, k, n, rank, epoch = 3, 100, 72, 130, 1, 5  # ragged: no block divides a shard
    a = torch.randn(world * m, k, device="cuda").to(dtype)
    b = torch.randn(k, n, device="cuda").to(dtype)
    flags = torch.zeros(world, world, dtype=torch.int64, device="cuda")
    flags.fill_diagonal_(epoch)
    y, failed = consumer_gemm(a, b, flags, rank, epoch)
    assert failed == [] and y.dtype == dtype
    assert _rel(y, a.double() @ b.double()) < REL[dtype]


@CUDA
def test_consumer_kernel_waits_for_flags_another_stream_raises_later():
    from slipstream.overlap.kernels.consumer_gemm import consumer_gemm

    world, m, k, n, rank, epoch = 4, 64, 96, 64, 2, 1
    a = torch.randn(world * m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    flags = torch.zeros(world, world, dtype=torch.int64, device="cuda")
    flags[rank, rank] = epoch  # this rank's own shard only
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU clock, then the peers' flags
        for src in range(world):
            flags[src, src].fill_(epoch)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    y, failed = consumer_gemm(a, b, flags, rank, epoch, timeout_s=30)
    end.record()
    torch.cuda.synchronize()
    assert failed == []
    assert _rel(y, a.double() @ b.double()) < REL[torch.bfloat16]
    assert start.elapsed_time(end) > 10  # ms: the kernel did wait for the late flags


@CUDA
def test_consumer_kernel_gives_up_on_a_flag_nobody_raises():
    from slipstream.overlap.kernels.consumer_gemm import consumer_gemm

    world, rank = 3, 0
    a = torch.randn(world * 32, 32, device="cuda")
    flags = torch.zeros(world, world, dtype=torch.int64, device="cuda")
    flags[0, 0] = flags[1, 1] = 1  # shard 2 never arrives
    t0 = time.monotonic()
    _, failed = consumer_gemm(a, torch.randn(32, 16, device="cuda"), flags, rank, 1, timeout_s=0.2)
    torch.cuda.synchronize()
    assert failed == [2]
    assert time.monotonic() - t0 < 20


def _one_rank_heap(rank: int, world: int) -> float:
    from slipstream.overlap.group import create_heap
    from slipstream.overlap.kernels.consumer_gemm import consumer_gemm

    torch.cuda.set_device(0)
    heap = create_heap("cuda", 1 << 16, 4)
    region = heap.alloc("x", (2 * 16, 8), torch.float32)
    first = heap.add_flags(["ready[0]", "ready[1]"])
    src = torch.randn(2 * 16, 8, device="cuda")
    heap.put(0, region, src)
    heap.signal(0, first, 3)
    heap.signal(0, first + 1, 1)
    heap.signal(0, first + 1, 2, op="add")
    assert heap.wait_until(first, 3, 10) >= 0 and heap.value(first + 1) == 3
    assert torch.equal(heap.local(region), src)
    with pytest.raises(TimeoutError, match=r"flag .*ready\[0\].* >= 4"):
        heap.wait_until(first, 4, 0.2)
    # The kernel waits on the heap's own flag (one shard, written by this rank: [1, 1]).
    flags, eye = heap.flag_tensor(first, 1), torch.eye(8, device="cuda")
    y, failed = consumer_gemm(heap.local(region), eye, flags, 0, 3, 5.0)
    assert failed == []
    _, failed = consumer_gemm(heap.local(region), eye, flags, 0, 4, 0.2)
    assert failed == [0]
    heap.close()
    return float((y - src).abs().max() / src.abs().max())  # tf32 dot: ~1e-3 at most


@CUDA
def test_cuda_heap_put_signal_wait_in_one_process(tmp_path):
    assert values(run_ranks(_one_rank_heap, 1, tmp_path, timeout_s=120))[0] < REL[torch.float32]


def _cuda_heap(rank: int, world: int) -> list[tuple]:
    import faulthandler

    from slipstream.overlap import OverlapGroup, all_gather_matmul, matmul_reduce_scatter

    faulthandler.dump_traceback_later(60)  # a hang shows where each rank stands
    torch.cuda.set_device(rank)
    dev = torch.device("cuda")
    out = []
    m, k, n = 48, 40, 72
    for kernel in ("torch", "triton"):
        group = OverlapGroup(None, "cuda", kernel=kernel, chunks=2, timeout_s=30)
        for dtype in (torch.float32, torch.bfloat16):
            for call in range(3):  # flags are never reset between calls
                # Every rank makes every rank's inputs from seeds: the reference is local.
                xs = [torch.randn(m, k, generator=torch.Generator().manual_seed(10 * r + call))
                      for r in range(world)]  # fmt: skip
                w = torch.randn(k, n, generator=torch.Generator().manual_seed(99))
                y, _ = all_gather_matmul(xs[rank].to(dev, dtype), w.to(dev, dtype), group)
                ref = torch.cat(xs).to(dtype).double() @ w.to(dtype).double()
                out.append((kernel, str(dtype), "ag", _rel(y.cpu(), ref)))
                xr = [torch.randn(m * world, k, generator=torch.Generator().manual_seed(7 * r + call))
                      for r in range(world)]  # fmt: skip
                wr = [torch.randn(k, n, generator=torch.Generator().manual_seed(50 + r))
                      for r in range(world)]  # fmt: skip
                got = matmul_reduce_scatter(xr[rank].to(dev, dtype), wr[rank].to(dev, dtype), group)
                full = sum(x.to(dtype).double() @ v.to(dtype).double() for x, v in zip(xr, wr))
                out.append(
                    (kernel, str(dtype), "rs", _rel(got.cpu(), full[rank * m : (rank + 1) * m]))
                )
        group.close()
    torch.cuda.synchronize()
    return out


@TWO_GPUS
def test_cuda_symmetric_heap_between_two_processes(tmp_path):
    for rank_rows in values(run_ranks(_cuda_heap, 2, tmp_path, timeout_s=80)):
        assert len(rank_rows) == 2 * 2 * 3 * 2
        for kernel, dtype, op, rel in rank_rows:
            tol = REL[torch.bfloat16] if "bfloat16" in dtype else REL[torch.float32]
            assert rel < tol, (kernel, dtype, op, rel)
