"""Communication overlap on GPUs, everything in one run (`make bench-gpu-overlap`):

1. one GPU: the consumer GEMM kernel that waits on shard flags (all set in advance) against
   the same kernel with the waits compiled out, and against torch.matmul (cuBLAS): what the
   flag waits cost (target <= 5%) and how far the plain Triton tile is from cuBLAS;
2. with two or more GPUs (one process each, NCCL): all-gather + GEMM at M x N x K =
   8192 x 28672 x 8192 (x split by rows, w by columns) and GEMM + reduce-scatter at
   8192 x 8192 x 29568 (the inner dimension split), bf16, each as
     nccl            one blocking NCCL collective, then the matmul (torch as users write it)
     torch-fused     torch.distributed._symmetric_memory's fused_all_gather_matmul /
                     fused_matmul_reduce_scatter (torch's async tensor parallel)
     collective      slipstream, chunked async NCCL collectives
     symmetric       slipstream, `cuda` symmetric heap, tile-ordered puts, Triton consumer
   with the speedup of each over nccl and torch-fused (medians of CUDA-event timings).

Every part is timed on its own and a part that fails records its error and the run goes on.
Without CUDA, `--smoke` runs the same code on the CPU at tiny shapes (the interpreter for the
kernel, gloo and the `shm` heap for the ranks): it checks the script, not the numbers.

    python -m benchmarks.gpu_overlap [--smoke] [--repeats 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path

from benchmarks.harness import provenance

AG_SHAPE = (8192, 28672, 8192)  # M, N, K: x [M/W, K] gathered, w [K, N/W]
RS_SHAPE = (8192, 8192, 29568)  # M, N, K: x [M, K/W], w [K/W, N], out [M/W, N]
SMOKE_AG, SMOKE_RS = (64, 96, 48), (64, 48, 96)
# Tiles tried on the GPU beside the default (128 x 128 x 64, Triton's default warps and
# stages): (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
TILES = [(128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4)]


def _timer(smoke: bool):
    import torch

    def median_ms(fn, repeats: int) -> dict:
        for _ in range(2):
            fn()
        times = []
        for _ in range(repeats):
            if smoke:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            else:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
        return {"median_ms": statistics.median(times), "runs_ms": times}

    return median_ms


def kernel_cost(smoke: bool, repeats: int) -> dict:
    """Part 1: one device, flags already set."""
    import torch

    from slipstream.overlap.kernels.consumer_gemm import consumer_gemm

    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    shapes = [(64, 64, 64)] if smoke else [(8192, 8192, 8192), (4096, 14336, 4096)]
    timed = _timer(smoke)
    out = {}
    for m, n, k in shapes:
        world = 8 if not smoke else 2
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        flags = torch.zeros(world, world, dtype=torch.int64, device=device)
        flags.fill_diagonal_(1)
        row = {
            "cublas": timed(lambda a=a, b=b: a @ b, repeats),
            "triton_no_wait": timed(
                lambda a=a, b=b, f=flags: consumer_gemm(a, b, f, 0, 1, wait=False), repeats
            ),
            "triton_wait": timed(lambda a=a, b=b, f=flags: consumer_gemm(a, b, f, 0, 1), repeats),
        }
        med = {key: v["median_ms"] for key, v in row.items()}
        row["wait_cost"] = med["triton_wait"] / med["triton_no_wait"] - 1
        row["vs_cublas"] = med["triton_wait"] / med["cublas"]
        if not smoke:  # other tiles for the same kernel, waits on: what a tuned launch gains
            tiles = {}
            for bm, bn, bk, warps, stages in TILES:
                key = f"{bm}x{bn}x{bk}/w{warps}/s{stages}"
                try:
                    tiles[key] = timed(
                        lambda a=a, b=b, f=flags, t=(bm, bn, bk), w=warps, s=stages: consumer_gemm(
                            a, b, f, 0, 1, block=t, num_warps=w, num_stages=s
                        ),
                        repeats,
                    )["median_ms"]
                except Exception as e:  # a tile too large for shared memory: recorded
                    tiles[key] = f"{type(e).__name__}: {str(e)[:200]}"
            row["tiles_ms"] = tiles
            best = min((v for v in tiles.values() if isinstance(v, float)), default=None)
            if best is not None:
                row["best_tile_vs_cublas"] = best / med["cublas"]
        row["tflops"] = {
            key: 2 * m * n * k / (ms * 1e-3) / 1e12 for key, ms in med.items() if ms > 0
        }
        out[f"{m}x{n}x{k}"] = row
    return out


def _rank(rank: int, world: int, port: int, smoke: bool, repeats: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.distributed as dist

    from slipstream.overlap import OverlapGroup, all_gather_matmul, matmul_reduce_scatter

    if not smoke:
        torch.cuda.set_device(rank)
    dist.init_process_group("gloo" if smoke else "nccl", rank=rank, world_size=world)
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    timed = _timer(smoke)
    results: dict = {}
    (am, an, ak), (rm, rn, rk) = (SMOKE_AG, SMOKE_RS) if smoke else (AG_SHAPE, RS_SHAPE)
    x_ag = torch.randn(am // world, ak, device=device, dtype=dtype)
    w_ag = torch.randn(ak, an // world, device=device, dtype=dtype)
    x_rs = torch.randn(rm, rk // world, device=device, dtype=dtype)
    w_rs = torch.randn(rk // world, rn, device=device, dtype=dtype)
    sides = {
        "nccl": lambda: OverlapGroup(None, "reference"),
        "collective": lambda: OverlapGroup(None, "collective", chunks=4),
        "symmetric": lambda: OverlapGroup(None, "shm" if smoke else "cuda", kernel="triton"),
    }
    for name, make in sides.items():
        try:
            group = make()
            results[f"ag/{name}"] = timed(lambda g=group: all_gather_matmul(x_ag, w_ag, g), repeats)
            results[f"rs/{name}"] = timed(
                lambda g=group: matmul_reduce_scatter(x_rs, w_rs, g), repeats
            )
        except Exception as e:  # recorded, and the other sides still run
            results[f"{name}/error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
    results.update(_torch_fused(x_ag, w_ag, x_rs, w_rs, smoke, timed, repeats))
    if rank == 0:
        queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def _torch_fused(x_ag, w_ag, x_rs, w_rs, smoke: bool, timed, repeats: int) -> dict:
    """torch's own async tensor parallel (symmetric memory; CUDA only: NotImplementedError on
    CPU, recorded as such)."""
    import torch
    import torch.distributed as dist

    try:
        import torch.distributed._symmetric_memory as symm_mem

        name = dist.group.WORLD.group_name
        major_minor = tuple(int(x) for x in torch.__version__.split(".")[:2])
        if major_minor < (2, 9):  # needed before torch 2.9, deprecated after
            symm_mem.enable_symm_mem_for_group(name)
        ops = torch.ops.symm_mem
        return {
            "ag/torch-fused": timed(
                lambda: ops.fused_all_gather_matmul(x_ag, [w_ag], gather_dim=0, group_name=name),
                repeats,
            ),
            "rs/torch-fused": timed(
                lambda: ops.fused_matmul_reduce_scatter(
                    x_rs, w_rs, "sum", scatter_dim=0, group_name=name
                ),
                repeats,
            ),
        }
    except Exception as e:
        return {"torch-fused/error": f"{type(e).__name__}: {str(e)[:500]}"}


def multi_gpu(world: int, smoke: bool, repeats: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_rank, args=(r, world, port, smoke, repeats, queue))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    out = queue.get(timeout=3600)
    for p in procs:
        p.join()
    for op in ("ag", "rs"):
        base = out.get(f"{op}/nccl", {}).get("median_ms")
        fused = out.get(f"{op}/torch-fused", {}).get("median_ms")
        for side in ("collective", "symmetric", "torch-fused"):
            ms = out.get(f"{op}/{side}", {}).get("median_ms")
            if ms and base:
                out[f"{op}/{side}/speedup_vs_nccl"] = base / ms
            if ms and fused and side != "torch-fused":
                out[f"{op}/{side}/speedup_vs_torch_fused"] = fused / ms
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks the script")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import torch

    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_overlap: no CUDA device; run with --smoke to check the script on CPU")
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    world = 2 if args.smoke else torch.cuda.device_count()
    report: dict = {"kernel": kernel_cost(args.smoke, args.repeats)}
    for shape, row in report["kernel"].items():
        print(
            f"consumer GEMM {shape}: flag waits cost {row['wait_cost']:+.1%}; "
            f"{row['vs_cublas']:.2f}x the time of torch.matmul"
            + (
                f"; best tile {row['best_tile_vs_cublas']:.2f}x"
                if "best_tile_vs_cublas" in row
                else ""
            )
        )
    if world >= 2:
        report["multi"] = multi_gpu(world, args.smoke, args.repeats)
        for key, value in sorted(report["multi"].items()):
            if isinstance(value, dict):
                print(f"{key:>24}: {value['median_ms']:.3f} ms")
            elif isinstance(value, float):
                print(f"{key:>40}: {value:.2f}x")
            else:
                print(f"{key}: {value.splitlines()[0]}")
    else:
        report["multi"] = f"skipped: {world} GPU(s); the overlapped collectives need 2 or more"
        print(report["multi"])
    report["world"] = world
    if args.json:
        args.json.write_text(json.dumps({**provenance(("triton",)), **report}, indent=2))


if __name__ == "__main__":
    main()
